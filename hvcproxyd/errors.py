"""The project's one root exception, so callers can catch "anything of ours".

Tree::

    HvcproxydError
     ├── ProtocolError (wire.py)         bytes on the socket broke the rules
     │    ├── LocalProtocolError
     │    └── RemoteProtocolError
     ├── ConfigError (config.py)         a config file is wrong; names file:line:col
     ├── GuestMemoryError (guestmem.py)  a guest address/length outside its RAM
     ├── TransportError                  the peer went away (wraps trio's errors)
     └── StateError                      an operation in the wrong run state
"""

from __future__ import annotations


class HvcproxydError(Exception):
    """Root of every error hvcproxyd raises on purpose."""


class TransportError(HvcproxydError):
    """The connection broke; ``reason`` says how, ``__cause__`` keeps trio's error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StateError(HvcproxydError):
    """Asked to do something the current run state does not allow."""

    def __init__(self, actual: str, required: str) -> None:
        super().__init__(f"in state {actual}, need {required}")
        self.actual = actual
        self.required = required
