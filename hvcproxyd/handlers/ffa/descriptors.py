"""The memory transaction descriptor of MEM_SHARE/LEND/DONATE, parsed and
checked rule by rule (DEN0077 1.2 §10.11; the 1.0 layout of §5.11 for a v1.0
caller), and the partition information descriptors the guest reads back.

Pure functions over bytes: no guest memory, no state.  The caller says what
"inside RAM", "already shared" and "a receiver that takes this access" mean,
so hypothesis can drive the parser on its own.  Every rule raises
:class:`~.defs.FfaError` with the spec's code; nothing else escapes.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .defs import (
    COMPOSITE_SIZE,
    DATA_RO,
    DATA_RW,
    DATA_UNSPECIFIED,
    EMAD_SIZE_V1_1,
    EMAD_SIZE_V1_2,
    INSTR_UNSPECIFIED,
    MEM_ATTR_MASK,
    MEM_CACHE_NON_CACHEABLE,
    MEM_CACHE_WRITE_BACK,
    MEM_FLAG_ZERO,
    MEM_FLAGS_SEND_ALLOWED,
    MEM_SHARE_RESERVED,
    MEM_TYPE_DEVICE,
    MEM_TYPE_NORMAL,
    MEM_TYPE_SHIFT,
    MEM_TYPE_UNSPECIFIED,
    MTD_HEADER,
    MTD_HEADER_V1_0,
    PAGE,
    PARTINFO_SIZE,
    PARTINFO_SIZE_V1_0,
    RANGE_SIZE,
    V1_0,
    V1_2,
    Err,
    FfaError,
    Fn,
)

#: receiver ID -> None when no such endpoint, else the data accesses it accepts.
Receivers = Callable[[int], frozenset[int] | None]
RangeCheck = Callable[[int, int], bool]


@dataclass(frozen=True, slots=True)
class Borrower:
    id: int
    #: Data access (RO/RW, bits 1:0) and instruction access (bits 3:2), as sent.
    access: int


@dataclass(frozen=True, slots=True)
class MemTransaction:
    """One checked transaction: what was sent, to whom, over which pages."""

    kind: Fn
    sender: int
    attributes: int
    flags: int
    tag: int
    borrowers: tuple[Borrower, ...]
    #: (address, pages) in 4 KiB pages, in the order the guest gave them.
    ranges: tuple[tuple[int, int], ...]

    @property
    def pages(self) -> int:
        return sum(n for _, n in self.ranges)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one transaction may hold (the per-VM limits, options.py)."""

    borrowers: int
    ranges: int
    pages: int


def emad_size(version: int) -> int:
    return EMAD_SIZE_V1_2 if version >= V1_2 else EMAD_SIZE_V1_1


def _bad(why: str, code: Err = Err.INVALID_PARAMETERS) -> FfaError:
    return FfaError(code, why)


def _check_attributes(kind: Fn, attributes: int) -> None:
    """Memory region attributes (§10.11.4): SHARE must say Normal memory; LEND and
    DONATE may leave them unspecified for the borrower to choose (Linux sends 0)."""
    if attributes & ~MEM_ATTR_MASK:
        raise _bad(f"memory attributes {attributes:#x}: reserved bits set")
    mtype = attributes >> MEM_TYPE_SHIFT & 3
    cache, share = attributes >> 2 & 3, attributes & 3
    if mtype == MEM_TYPE_UNSPECIFIED:
        if kind == Fn.MEM_SHARE or attributes:
            raise _bad("memory type not specified (SHARE must give Normal memory; unspecified means all zero)")
        return
    if mtype == MEM_TYPE_DEVICE:
        raise _bad("device memory cannot be shared or lent from RAM")
    if mtype != MEM_TYPE_NORMAL:
        raise _bad(f"memory type {mtype} is reserved")
    if cache not in (MEM_CACHE_NON_CACHEABLE, MEM_CACHE_WRITE_BACK):
        raise _bad(f"cacheability {cache} is reserved for Normal memory")
    if share == MEM_SHARE_RESERVED:
        raise _bad("shareability 1 is reserved")


def _check_access(kind: Fn, access: int) -> None:
    """Permissions in one endpoint memory access descriptor (§10.11.3): data access
    must be given for SHARE and LEND; SHARE leaves instruction access to the
    borrower; DONATE gives neither (the new owner decides)."""
    data, instr = access & 3, access >> 2 & 3
    if access & ~0xF:
        raise _bad(f"access permissions {access:#x}: reserved bits set")
    if data == 3 or instr == 3:
        raise _bad(f"access permissions {access:#x}: reserved value")
    if kind == Fn.MEM_DONATE:
        if data != DATA_UNSPECIFIED or instr != INSTR_UNSPECIFIED:
            raise _bad("DONATE must leave data and instruction access unspecified")
        return
    if data == DATA_UNSPECIFIED:
        raise _bad("data access must be RO or RW")
    if kind == Fn.MEM_SHARE and instr != INSTR_UNSPECIFIED:
        raise _bad("SHARE must leave instruction access unspecified")


def parse_transaction(data: bytes, *, kind: Fn, version: int, sender: int, receivers: Receivers,
                      in_ram: RangeCheck, in_use: RangeCheck, limits: Limits) -> MemTransaction:
    """Check one complete descriptor.  ``in_ram(addr, size)``: the range is guest RAM;
    ``in_use(addr, size)``: it overlaps memory already shared, lent or used as RX/TX."""
    total = len(data)
    v10 = version == V1_0
    header = MTD_HEADER_V1_0 if v10 else MTD_HEADER
    if total < header:
        raise _bad(f"descriptor of {total} bytes is shorter than its {header}-byte header")
    if v10:
        sender_id, attributes, res0, flags, handle, tag, res1, ep_count = struct.unpack_from("<HBBIQQII", data)
        if res0 or res1:
            raise _bad("reserved header fields are not zero")
        ep_size, ep_offset = EMAD_SIZE_V1_1, MTD_HEADER_V1_0
    else:
        sender_id, attributes, flags, handle, tag, ep_size, ep_count, ep_offset = struct.unpack_from(
            "<HHIQQIII", data)
        if any(data[36:48]):
            raise _bad("reserved header bytes 36..47 are not zero")
        if ep_size != emad_size(version):
            raise _bad(f"endpoint descriptor size {ep_size}, v{version >> 16}.{version & 0xFFFF} uses "
                       f"{emad_size(version)}")
        if ep_offset % 16 or ep_offset < MTD_HEADER:
            raise _bad(f"endpoint array offset {ep_offset} is not 16-byte aligned past the header")
    if sender_id != sender:
        raise _bad(f"sender {sender_id:#x} is not the caller {sender:#x}")
    if handle:
        raise _bad("handle must be zero when sending")
    _check_attributes(kind, attributes)
    if flags & ~MEM_FLAGS_SEND_ALLOWED:
        raise _bad(f"transaction flags {flags:#x}: reserved bits (or a retrieve-only type) set")
    if flags & MEM_FLAG_ZERO and kind == Fn.MEM_SHARE:
        raise _bad("SHARE cannot ask for the memory to be zeroed")
    if ep_count == 0:
        raise _bad("no borrower")
    if ep_count > limits.borrowers:
        raise _bad(f"{ep_count} borrowers, at most {limits.borrowers}", Err.NOT_SUPPORTED)
    if ep_offset + ep_count * ep_size > total:
        raise _bad("endpoint array runs past the descriptor")

    borrowers: list[Borrower] = []
    composite: int | None = None
    for i in range(ep_count):
        at = ep_offset + i * ep_size
        receiver, access, ep_flags, comp = struct.unpack_from("<HBBI", data, at)
        if ep_flags or any(data[at + 8:at + 16]):
            raise _bad(f"endpoint {i}: flags or reserved bytes not zero")
        _check_access(kind, access)
        if receiver == sender:
            raise _bad(f"endpoint {i}: the sender cannot borrow from itself")
        if any(b.id == receiver for b in borrowers):
            raise _bad(f"endpoint {i}: receiver {receiver:#x} given twice")
        accepts = receivers(receiver)
        if accepts is None:
            raise _bad(f"endpoint {i}: no endpoint {receiver:#x}")
        wanted = access & 3
        if kind != Fn.MEM_DONATE and wanted not in accepts and not (wanted == DATA_RO and DATA_RW in accepts):
            raise _bad(f"endpoint {i}: {receiver:#x} does not accept this access", Err.DENIED)
        if composite is not None and comp != composite:
            raise _bad("endpoints name different composite descriptors")
        composite = comp
        borrowers.append(Borrower(receiver, access))
    assert composite is not None
    array_end = ep_offset + ep_count * ep_size
    if composite % 8 or composite < array_end or composite + COMPOSITE_SIZE > total:
        raise _bad(f"composite offset {composite} is misaligned, inside the header/array or past the end")
    page_total, range_count, comp_res = struct.unpack_from("<IIQ", data, composite)
    if comp_res:
        raise _bad("composite reserved field is not zero")
    if range_count == 0:
        raise _bad("no address range")
    if range_count > limits.ranges:
        raise _bad(f"{range_count} ranges, at most {limits.ranges}", Err.NO_MEMORY)
    first = composite + COMPOSITE_SIZE
    if first + range_count * RANGE_SIZE != total:
        raise _bad("the range array does not end where the descriptor does")
    if page_total > limits.pages:
        raise _bad(f"{page_total} pages, at most {limits.pages} per transaction", Err.NO_MEMORY)

    ranges: list[tuple[int, int]] = []
    pages = 0
    for i in range(range_count):
        addr, count, res = struct.unpack_from("<QII", data, first + i * RANGE_SIZE)
        if res:
            raise _bad(f"range {i}: reserved field is not zero")
        if count == 0 or addr % PAGE:
            raise _bad(f"range {i}: {addr:#x} is not page-aligned or has no pages")
        pages += count
        if pages > page_total:
            raise _bad("range page counts exceed the total page count")
        if not in_ram(addr, count * PAGE):
            raise _bad(f"range {i}: {addr:#x}+{count} pages is not guest RAM")
        ranges.append((addr, count))
    if pages != page_total:
        raise _bad(f"range page counts add up to {pages}, the total says {page_total}")
    ordered = sorted(ranges)
    for (a, n), (b, _) in itertools.pairwise(ordered):
        if a + n * PAGE > b:
            raise _bad(f"ranges at {a:#x} and {b:#x} overlap")
    for addr, count in ranges:
        if in_use(addr, count * PAGE):
            raise _bad(f"{addr:#x}+{count} pages is already shared, lent or an RX/TX buffer", Err.DENIED)
    return MemTransaction(kind, sender, attributes, flags, tag, tuple(borrowers), tuple(ranges))


def encode_transaction(t: MemTransaction, version: int) -> bytes:
    """The descriptor of ``t`` in ``version``'s layout (a partition's retrieve
    response, the tests' crafted descriptors); the inverse of the parser."""
    size = emad_size(version)
    if version == V1_0:
        head = struct.pack("<HBBIQQII", t.sender, t.attributes, 0, t.flags, 0, t.tag, 0, len(t.borrowers))
        ep_offset = MTD_HEADER_V1_0
    else:
        ep_offset = MTD_HEADER
        head = struct.pack("<HHIQQIII12x", t.sender, t.attributes, t.flags, 0, t.tag, size, len(t.borrowers),
                           ep_offset)
    composite = ep_offset + size * len(t.borrowers)
    emads = b"".join(struct.pack("<HBBI8x", b.id, b.access, 0, composite).ljust(size, b"\0") for b in t.borrowers)
    comp = struct.pack("<IIQ", t.pages, len(t.ranges), 0)
    ranges = b"".join(struct.pack("<QII", a, n, 0) for a, n in t.ranges)
    return head + emads + comp + ranges


# ----------------------------------------------------------------- partition info

@dataclass(frozen=True, slots=True)
class PartitionInfo:
    id: int
    exec_contexts: int
    properties: int
    uuid: bytes  # 16 bytes as RFC 4122 lays them out (Linux reads them with import_uuid)


def partition_info_size(version: int) -> int:
    return PARTINFO_SIZE_V1_0 if version == V1_0 else PARTINFO_SIZE


def encode_partition_info(parts: Sequence[PartitionInfo], version: int) -> bytes:
    """The PARTITION_INFO_GET records: 8 bytes each for a v1.0 caller, 24 with the UUID after."""
    if version == V1_0:
        return b"".join(struct.pack("<HHI", p.id, p.exec_contexts, p.properties) for p in parts)
    return b"".join(struct.pack("<HHI16s", p.id, p.exec_contexts, p.properties, p.uuid) for p in parts)
