"""The backend interface: what the mediator asks of a TEE, in OP-TEE message terms.

The mediator has already checked and resolved everything the guest sent, so a
backend never sees a guest address: it gets a :class:`Msg` whose memrefs carry
their bytes (``data``) and capacity (``size``), and a client ID it must keep
each VM's sessions apart by.  Its operations:

========================  =====================================================
``open()``                connect; learn ``threads``, ``sec_caps``, ``revision``
``vm_created(client)``    OPTEE_SMC_VM_CREATED for that client; an SMC code
``vm_destroyed(client)``  OPTEE_SMC_VM_DESTROYED; the TEE drops its sessions
``call(client, msg)``     a yielding call (open/invoke/close session, cancel)
``rpc_return(...)``       the answer to an RPC the call made (``None`` after a
                          foreign interrupt), resuming it
``wait(client, ticket)``  keep waiting for an answer that did not come within
                          the budget of the previous operation
``close()``               disconnect
========================  =====================================================

``call``, ``rpc_return`` and ``wait`` return a :data:`Step`: the call finished
(:class:`Done`), the TEE needs the normal world (:class:`RpcCmd`,
:class:`ForeignIntr`), the TEE refused to start it (:class:`Refused`, with an
OPTEE_SMC_RETURN_* code), or no answer came within ``budget`` seconds
(:class:`Pending`: the mediator lets the guest take its interrupts and asks
again later).  A backend that fails raises :class:`BackendError`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from . import abi
from .msgarg import Header


class BackendError(Exception):
    """The backend is unreachable, died, or broke its protocol."""


@dataclass(slots=True)
class BParam:
    """A parameter as a backend sees it: ``attr`` is an OPTEE_MSG_ATTR_TYPE_*
    (memrefs always as TMEM types) plus ATTR_META; ``data`` is None for a null
    memref.  In an RPC, a memref names shared memory the normal world allocated
    (``shm``, its cookie) at offset ``a``."""

    attr: int
    a: int = 0
    b: int = 0
    c: int = 0
    size: int = 0
    data: bytes | None = None
    shm: int = 0

    @property
    def type(self) -> int:
        return self.attr & abi.ATTR_TYPE_MASK

    @property
    def is_memref(self) -> bool:
        return self.type in abi.TMEM_TYPES

    def to_json(self) -> dict[str, Any]:
        if self.is_memref:
            out: dict[str, Any] = {"attr": self.attr, "size": self.size, "shm": self.shm, "offs": self.a,
                                   "data": None if self.data is None else base64.b64encode(self.data).decode()}
            return out
        return {"attr": self.attr, "a": self.a, "b": self.b, "c": self.c}

    @classmethod
    def from_json(cls, d: Any) -> BParam:
        if not isinstance(d, dict):
            raise BackendError(f"a parameter must be an object, not {type(d).__name__}")
        attr = _u(d, "attr", 32)
        if (attr & abi.ATTR_TYPE_MASK) in abi.TMEM_TYPES:
            raw = d.get("data")
            if raw is not None and not isinstance(raw, str):
                raise BackendError("memref data must be base64 text or null")
            try:
                data = None if raw is None else base64.b64decode(raw, validate=True)
            except ValueError as err:
                raise BackendError(f"memref data is not base64: {err}") from None
            return cls(attr, _u(d, "offs", 64, 0), size=_u(d, "size", 64), data=data, shm=_u(d, "shm", 64, 0))
        return cls(attr, _u(d, "a", 64, 0), _u(d, "b", 64, 0), _u(d, "c", 64, 0))


@dataclass(slots=True)
class Msg(Header):
    """An optee_msg_arg without addresses."""

    params: list[BParam] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"cmd": self.cmd, "func": self.func, "session": self.session, "cancel_id": self.cancel_id,
                "ret": self.ret, "ret_origin": self.ret_origin, "params": [p.to_json() for p in self.params]}

    @classmethod
    def from_json(cls, d: Any, max_params: int = abi.MAX_PARAMS_PER_PAGE) -> Msg:
        if not isinstance(d, dict):
            raise BackendError(f"a message must be an object, not {type(d).__name__}")
        params = d.get("params", [])
        if not isinstance(params, list) or len(params) > max_params:
            raise BackendError(f"params must be a list of at most {max_params}")
        return cls(_u(d, "cmd", 32), _u(d, "func", 32, 0), _u(d, "session", 32, 0), _u(d, "cancel_id", 32, 0),
                   _u(d, "ret", 32, 0), _u(d, "ret_origin", 32, 0), [BParam.from_json(p) for p in params])


def _u(d: dict[str, Any], key: str, bits: int, default: int | None = None) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise BackendError(f"{key!r} must be an unsigned {bits}-bit integer, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Done:
    msg: Msg


@dataclass(frozen=True, slots=True)
class RpcCmd:
    """The TEE asks the normal world to carry out ``msg`` (an OPTEE_RPC_CMD_*)."""

    thread: int
    msg: Msg


@dataclass(frozen=True, slots=True)
class ForeignIntr:
    thread: int


@dataclass(frozen=True, slots=True)
class Refused:
    code: int


@dataclass(frozen=True, slots=True)
class Pending:
    ticket: int


Step = Done | RpcCmd | ForeignIntr | Refused | Pending


@dataclass(frozen=True, slots=True)
class BackendInfo:
    threads: int
    sec_caps: int
    revision: tuple[int, int] = (0, 0)


class Backend:
    """Base class; see the module docstring for the contract.  ``SHAREABLE`` says
    whether one TEE behind this backend may serve several VMs (it keeps clients
    apart itself)."""

    SHAREABLE = True
    info: BackendInfo | None = None

    async def open(self) -> BackendInfo:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def vm_created(self, client: int, budget: float) -> int:
        raise NotImplementedError

    async def vm_destroyed(self, client: int, budget: float) -> int:
        raise NotImplementedError

    async def call(self, client: int, msg: Msg, budget: float) -> Step:
        raise NotImplementedError

    async def rpc_return(self, client: int, thread: int, msg: Msg | None, budget: float) -> Step:
        raise NotImplementedError

    async def wait(self, client: int, ticket: int, budget: float) -> Step:
        raise NotImplementedError

    def forget(self, client: int) -> None:
        """Drop whatever is kept for answers nobody will ask for (the VM went)."""


def step_from_json(d: Any, ticket: int) -> Step:
    """A reply frame of the socket protocol as a Step (docs/handlers/tee-proxy.md)."""
    if not isinstance(d, dict):
        raise BackendError("a reply must be an object")
    if "done" in d:
        return Done(Msg.from_json(d["done"]))
    if "rpc" in d:
        return RpcCmd(_u(d, "thread", 32), Msg.from_json(d["rpc"], max_params=abi.MAX_PARAMS_PER_PAGE))
    if "intr" in d:
        return ForeignIntr(_u(d, "intr", 32))
    if "code" in d:
        return Refused(_u(d, "code", 32))
    raise BackendError(f"reply to request {ticket} has none of done/rpc/intr/code")


def step_to_json(step: Step) -> dict[str, Any]:
    if isinstance(step, Done):
        return {"done": step.msg.to_json()}
    if isinstance(step, RpcCmd):
        return {"rpc": step.msg.to_json(), "thread": step.thread}
    if isinstance(step, ForeignIntr):
        return {"intr": step.thread}
    if isinstance(step, Refused):
        return {"code": step.code}
    raise ValueError(f"{step!r} does not travel on the wire")


__all__ = ["BParam", "Backend", "BackendError", "BackendInfo", "Done", "ForeignIntr", "Msg", "Pending", "Refused",
           "RpcCmd", "Step", "step_from_json", "step_to_json"]
