"""Handler plugins.  A plugin author needs only what this package re-exports:
the base class, its result type, the VM context, and the wire types a call and
an effect are made of (docs/handlers.md)."""

from ..core.handler import NOT_SUPPORTED, Handler, Notes, Result, VmContext
from ..wire import Call, Effect, EffectKind, VmEvent

__all__ = ["NOT_SUPPORTED", "Call", "Effect", "EffectKind", "Handler", "Notes", "Result", "VmContext", "VmEvent"]
