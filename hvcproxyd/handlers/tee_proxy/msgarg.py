"""``struct optee_msg_arg`` as bytes: parse the guest's copy into a shadow,
and pack the shadow back.  Pure functions; the guest's bytes are read once, so
a guest that rewrites its argument page while the call runs changes nothing
the mediator acts on (Xen shadows the page for the same reason).

Layout (optee_msg.h): eight u32 (cmd, func, session, cancel_id, pad, ret,
ret_origin, num_params), then ``num_params`` times ``u64 attr`` plus a
three-u64 union (value a/b/c, tmem buf_ptr/size/shm_ref, rmem
offs/size/shm_ref).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from . import abi

_HEADER = struct.Struct("<8I")
_PARAM = struct.Struct("<4Q")


class MsgError(Exception):
    """A malformed argument structure; ``code`` is the SMC return value for it."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


@dataclass(frozen=True, slots=True)
class Param:
    """One ``optee_msg_param``: the attribute and the union's three words."""

    attr: int
    a: int = 0
    b: int = 0
    c: int = 0

    @property
    def type(self) -> int:
        return self.attr & abi.ATTR_TYPE_MASK


@dataclass(slots=True)
class Header:
    """The fields of an optee_msg_arg besides its parameters, shared by the
    guest's shadow and the backend's address-free message."""

    cmd: int
    func: int = 0
    session: int = 0
    cancel_id: int = 0
    ret: int = 0
    ret_origin: int = 0


@dataclass(slots=True)
class MsgArg(Header):
    params: list[Param] = field(default_factory=list)

    def copy(self) -> MsgArg:
        return replace(self, params=list(self.params))


def num_params_at(header: bytes) -> int:
    """num_params from the first 32 bytes, so the caller can bound the read."""
    return int(_HEADER.unpack_from(header)[7])


def parse(data: bytes, max_params: int) -> MsgArg:
    """The shadow of a guest's argument bytes; EBADCMD if num_params exceeds
    ``max_params`` or the data is short, EBADCMD for an unknown attribute bit."""
    if len(data) < abi.ARG_HEADER_SIZE:
        raise MsgError(abi.RETURN_EBADCMD, f"{len(data)} bytes is shorter than optee_msg_arg")
    cmd, func, session, cancel_id, _pad, ret, origin, n = _HEADER.unpack_from(data)
    if n > max_params:
        raise MsgError(abi.RETURN_EBADCMD, f"num_params {n} is over the limit of {max_params}")
    if len(data) < abi.arg_size(n):
        raise MsgError(abi.RETURN_EBADCMD, f"{len(data)} bytes cannot hold {n} parameters")
    params = []
    for i in range(n):
        attr, a, b, c = _PARAM.unpack_from(data, abi.ARG_HEADER_SIZE + i * abi.PARAM_SIZE)
        if attr & ~abi.ATTR_KNOWN:
            raise MsgError(abi.RETURN_EBADCMD, f"parameter {i} has unknown attribute bits {attr:#x}")
        params.append(Param(attr, a, b, c))
    return MsgArg(cmd, func, session, cancel_id, ret, origin, params)


def pack(arg: MsgArg) -> bytes:
    out = bytearray(_HEADER.pack(arg.cmd & 0xFFFF_FFFF, arg.func & 0xFFFF_FFFF, arg.session & 0xFFFF_FFFF,
                                 arg.cancel_id & 0xFFFF_FFFF, 0, arg.ret & 0xFFFF_FFFF,
                                 arg.ret_origin & 0xFFFF_FFFF, len(arg.params)))
    for p in arg.params:
        out += _PARAM.pack(p.attr, p.a & (1 << 64) - 1, p.b & (1 << 64) - 1, p.c & (1 << 64) - 1)
    return bytes(out)


def fail(arg: MsgArg, ret: int, origin: int = abi.TEEC_ORIGIN_COMMS) -> MsgArg:
    """The guest's message answered with an error and nothing else changed."""
    out = arg.copy()
    out.ret, out.ret_origin = ret, origin
    return out


__all__ = ["Header", "MsgArg", "MsgError", "Param", "fail", "num_params_at", "pack", "parse"]
