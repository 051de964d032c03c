"""From the guest's shadowed ``optee_msg_arg`` to a backend :class:`Msg` and
back: every memref resolved to validated guest pages and charged to the VM's
account before a byte is read, and on the way back only what the ABI lets
the TEE change (ret, ret_origin, the session of an OPEN_SESSION, output
values, output memref sizes and contents up to their capacity).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...core.guestmem import GuestMemory, GuestMemoryError
from . import abi
from .backend import BParam, Msg
from .msgarg import MsgArg, MsgError, Param
from .shm import Account, Buffer, Limits, walk_pagelist


@dataclass(slots=True)
class Translated:
    """A call's parameters as the backend sees them, with the guest buffer behind
    each memref (None for values and null memrefs), the temporary pages it
    holds against the account and the memref bytes it holds (``moved``)."""

    params: list[BParam]
    buffers: list[Buffer | None]
    temp_pages: int = 0
    moved: int = 0
    _charged: list[int] = field(default_factory=list)


async def to_backend(memory: GuestMemory, arg: MsgArg, arg_page: int, registered: dict[int, Buffer],
                     account: Account, limits: Limits, max_bytes: int) -> Translated:
    """Raises MsgError (EBADADDR, ENOMEM) and charges nothing in that case."""
    out = Translated([], [])
    try:
        for i, p in enumerate(arg.params):
            await _one(memory, i, p, arg_page, registered, account, limits, max_bytes, out)
        account.hold(out.moved)
    except BaseException:
        account.give(out.temp_pages, False)
        raise
    return out


async def _one(memory: GuestMemory, i: int, p: Param, arg_page: int, registered: dict[int, Buffer],
               account: Account, limits: Limits, max_bytes: int, out: Translated) -> None:
    kind, meta = p.type, p.attr & abi.ATTR_META
    if kind == abi.ATTR_TYPE_NONE or kind in abi.VALUE_TYPES:
        out.params.append(BParam(kind | meta, p.a, p.b, p.c))
        out.buffers.append(None)
        return
    if kind in abi.TMEM_TYPES:
        if p.a == 0:  # a null memref (SEC_CAP_MEMREF_NULL): a size, no buffer
            out.params.append(BParam(kind | meta, size=p.b, data=None))
            out.buffers.append(None)
            return
        if not p.attr & abi.ATTR_NONCONTIG:
            # A contiguous temporary memref names reserved (static) SHM, which a guest is never offered.
            raise MsgError(abi.RETURN_EBADADDR, f"parameter {i}: contiguous memref without reserved SHM")
        buf = await walk_pagelist(memory, p.a, p.b, limits, arg_page)
        account.take(len(buf.pages), False)
        out.temp_pages += len(buf.pages)
        start = 0
    elif kind in abi.RMEM_TYPES:
        reg = registered.get(p.c)
        if reg is None or p.a + p.b > reg.size:
            raise MsgError(abi.RETURN_EBADADDR, f"parameter {i}: {p.a:#x}+{p.b:#x} is not inside registered "
                                                f"shared memory {p.c:#x}")
        buf, start = reg, p.a
    else:
        raise MsgError(abi.RETURN_EBADCMD, f"parameter {i}: unknown type {kind:#x}")
    size = p.b
    out.moved += size
    if out.moved > max_bytes or account.inflight + out.moved > limits.shared_pages * abi.PAGE_SIZE:
        raise MsgError(abi.RETURN_ENOMEM, f"the call's memrefs move more than {max_bytes} bytes")
    data = b""
    if kind in abi.INPUT_TYPES and size:
        try:
            data = await buf.read(memory, start, size)
        except GuestMemoryError as err:
            raise MsgError(abi.RETURN_EBADADDR, f"parameter {i}: {err}") from err
    tee_kind = abi.ATTR_TYPE_TMEM_INPUT + (kind & 0x3) - 1  # RMEM_x and TMEM_x share the direction bits
    out.params.append(BParam(tee_kind | meta, size=size, data=data))
    out.buffers.append(_window(buf, start, size))


def _window(buf: Buffer, start: int, size: int) -> Buffer:
    """The part of ``buf`` a parameter covers, so write-back cannot leave it."""
    first, off = divmod(buf.offset + start, abi.PAGE_SIZE)
    last = (buf.offset + start + size + abi.PAGE_SIZE - 1) // abi.PAGE_SIZE
    return Buffer(buf.pages[first:max(last, first)], off, size)


async def from_backend(memory: GuestMemory, shadow: MsgArg, tr: Translated, result: Msg) -> MsgArg:
    """The guest's answer: the shadow with what the TEE may change.  A result whose
    parameters do not line up with the call's is a communication error."""
    out = shadow.copy()
    out.ret, out.ret_origin = result.ret, result.ret_origin
    if shadow.cmd == abi.CMD_OPEN_SESSION:
        out.session = result.session
    if len(result.params) != len(shadow.params):
        out.ret, out.ret_origin = abi.TEEC_ERROR_COMMUNICATION, abi.TEEC_ORIGIN_COMMS
        return out
    for i, (p, r, buf) in enumerate(zip(shadow.params, result.params, tr.buffers, strict=True)):
        kind = p.type
        if kind not in abi.OUTPUT_TYPES:
            continue
        if kind in abi.VALUE_TYPES:
            out.params[i] = Param(p.attr, r.a, r.b, r.c)
            continue
        capacity = p.b
        out.params[i] = Param(p.attr, p.a, r.size, p.c)
        if buf is not None and r.data and result.ret == abi.TEEC_SUCCESS:
            await buf.write(memory, 0, r.data[:capacity])
    return out


__all__ = ["Translated", "from_backend", "to_backend"]
