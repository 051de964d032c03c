"""The project's one root exception, so callers can catch "anything of ours".

Tree::

    HvcproxydError
     ├── ProtocolError (wire.py)                bytes on the socket broke the rules
     │    ├── LocalProtocolError
     │    └── RemoteProtocolError
     ├── ConfigError (config/diagnostics.py)    a config file is wrong; names file:line:col
     ├── GuestMemoryError (core/guestmem.py)    a guest address/length outside its RAM
     ├── ControlError (ops/control.py)          the control socket cannot be reached or refused
     └── TransportError                         the peer went away (wraps trio's errors)
"""

from __future__ import annotations


class HvcproxydError(Exception):
    """Root of every error hvcproxyd raises on purpose."""


class TransportError(HvcproxydError):
    """The connection broke; ``reason`` says how, ``__cause__`` keeps trio's error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
