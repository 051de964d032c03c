"""Logging set-up: journald with fields under systemd, one readable line per
record on a terminal.

Per-call records (logger ``hvcproxyd.calls``) carry their details as
``extra={"hvc": {...}}``; the journal gets them as HVC_* fields, the terminal
line already says them in words.
"""

from __future__ import annotations

import logging
import sys

from .journal import JournalHandler, journal_stream_is

FORMATS = ("auto", "text", "journal")
#: Fields every journal record gets (HVC_VM once the config names the VM).
STATIC_FIELDS: dict[str, str] = {}


def configure(level: str = "INFO", fmt: str = "auto") -> None:
    """``auto`` picks the journal when stderr is this service's journal stream."""
    handler: logging.Handler
    if fmt == "journal" or (fmt == "auto" and journal_stream_is(2)):
        handler = JournalHandler(static=STATIC_FIELDS)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def set_vm(name: str) -> None:
    """Tag every later journal record with HVC_VM (one VM per daemon process)."""
    STATIC_FIELDS["HVC_VM"] = name
