"""The project's one root exception, so callers can catch "anything of ours".

Tree::

    HvcproxydError
     ├── ProtocolError (wire.py)                bytes on the socket broke the rules
     │    ├── LocalProtocolError
     │    └── RemoteProtocolError
     ├── ConfigError (config/diagnostics.py)    a config file is wrong; names file:line:col
     ├── GuestMemoryError (core/guestmem.py)    a guest address/length outside its RAM
     ├── ControlError (ops/control.py)          the control socket cannot be reached or refused
     ├── DurableError (durable/store.py)        the state directory cannot be used, or its state loaded
     └── TransportError                         the peer went away (wraps trio's errors)
"""

from __future__ import annotations


class HvcproxydError(Exception):
    """Root of every error hvcproxyd raises on purpose."""


class ExitCode:
    """``hvcproxyd run``'s exit status, so a supervisor can tell a problem that a
    restart cannot fix (the unit's ``RestartPreventExitStatus=``) from one it may.
    The permanent ones are sysexits.h's."""

    OK = 0
    #: Anything else: an internal error, a crash, the watchdog: worth a restart.
    FAILURE = 1
    #: A socket cannot be created (its directory, an existing non-socket file, a missing group),
    #: or the state directory cannot be created or written (read-only, full).
    CANTCREAT = 73
    #: Permission denied on a socket or its directory.
    NOPERM = 77
    #: The config is missing or has errors, or the saved state does not fit it.
    CONFIG = 78
    PERMANENT = (CANTCREAT, NOPERM, CONFIG)


class TransportError(HvcproxydError):
    """The connection broke; ``reason`` says how, ``__cause__`` keeps trio's error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
