"""What a rule sends a call to: a typed sum, so the table, the checks and the
VM service never mix handler names with built-in actions in one string."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class LeaveToKvm:
    """KVM answers the call in the kernel; the filter does not forward it."""

    name: ClassVar[str] = "kvm"


@dataclass(frozen=True, slots=True)
class Deny:
    """NOT_SUPPORTED, as KVM's DENY filter action gives."""

    name: ClassVar[str] = "deny"


@dataclass(frozen=True, slots=True)
class ToHandler:
    """The handler instance configured under ``handlers:`` with this name."""

    name: str


Target = LeaveToKvm | Deny | ToHandler
KVM = LeaveToKvm()
DENY = Deny()
BUILTIN_ACTIONS: dict[str, Target] = {KVM.name: KVM, DENY.name: DENY}

__all__ = ["BUILTIN_ACTIONS", "DENY", "KVM", "Deny", "LeaveToKvm", "Target", "ToHandler"]
