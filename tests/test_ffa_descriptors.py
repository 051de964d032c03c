"""The memory transaction descriptor parser: one crafted descriptor per
validation rule, each breaking exactly that rule (the same descriptor with the
rule kept is accepted), and hypothesis over random and mutated descriptors."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvcproxyd.handlers.ffa.defs import V1_0, V1_1, V1_2, Err, FfaError, Fn
from hvcproxyd.handlers.ffa.descriptors import Limits, MemTransaction, encode_transaction, parse_transaction

from .ffa_support import ECHO, PAGE, RAM, RAM_SIZE, STORE, VM_ID, Desc

RO_ONLY = 0x8003
ACCEPTS = {ECHO: frozenset({1, 2}), STORE: frozenset({1, 2}), RO_ONLY: frozenset({1})}
IN_USE = (RAM + 0x80000, RAM + 0x82000)  # two pages some earlier transaction holds
LIMITS = Limits(borrowers=2, ranges=8, pages=64)


def in_ram(addr: int, size: int) -> bool:
    return addr >= RAM and addr + size <= RAM + RAM_SIZE


def in_use(addr: int, size: int) -> bool:
    return addr < IN_USE[1] and IN_USE[0] < addr + size


def parse(data: bytes, kind: Fn = Fn.MEM_SHARE, version: int = V1_1, limits: Limits = LIMITS) -> MemTransaction:
    return parse_transaction(data, kind=kind, version=version, sender=VM_ID, receivers=ACCEPTS.get,
                             in_ram=in_ram, in_use=in_use, limits=limits)


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


TWO = [(ECHO, 2), (STORE, 2)]
# (rule, the descriptor breaking it, the code, kind, version)
Case = tuple[str, Callable[[], bytes], Err, Fn, int]
CASES: list[Case] = [
    ("header too short", lambda: Desc().encode()[:40], Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("reserved header bytes", lambda: Desc(reserved_header=b"\1" + bytes(11)).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("endpoint descriptor size", lambda: Desc(emad_size=32).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("endpoint descriptor size for 1.2", lambda: Desc().encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_2),
    ("endpoint array misaligned", lambda: Desc(ep_offset=56).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("endpoint array inside the header", lambda: Desc(ep_offset=32).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("sender is not the caller", lambda: Desc(sender=2).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("handle not zero", lambda: Desc(handle=5).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("attributes reserved bits", lambda: Desc(attributes=0x6F).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("share without memory type", lambda: Desc(attributes=0).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("unspecified type with other bits", lambda: Desc(attributes=0x03).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_LEND, V1_1),
    ("device memory", lambda: Desc(attributes=0x10).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("reserved memory type", lambda: Desc(attributes=0x3F).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("reserved cacheability", lambda: Desc(attributes=0x23).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("reserved shareability", lambda: Desc(attributes=0x2D).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("reserved transaction flags", lambda: Desc(flags=1 << 5).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("a retrieve-only transaction type", lambda: Desc(flags=1 << 3).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("share asks for zeroing", lambda: Desc(flags=1).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("no borrower", lambda: Desc(receivers=[]).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("more borrowers than allowed", lambda: Desc(receivers=[*TWO, (RO_ONLY, 1)]).encode(), Err.NOT_SUPPORTED,
     Fn.MEM_SHARE, V1_1),
    ("endpoint array past the end", lambda: Desc(ep_offset=4096).encode()[:200], Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("endpoint flags", lambda: Desc(ep_flags=1).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("endpoint reserved bytes", lambda: patch(Desc().encode(), 48 + 8, "<Q", 1), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("access reserved bits", lambda: Desc(receivers=[(ECHO, 0x12)]).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("access reserved data value", lambda: Desc(receivers=[(ECHO, 3)]).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("access reserved instruction value", lambda: Desc(receivers=[(ECHO, 0xE)]).encode(),
     Err.INVALID_PARAMETERS, Fn.MEM_LEND, V1_1),
    ("share without data access", lambda: Desc(receivers=[(ECHO, 0)]).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("share names instruction access", lambda: Desc(receivers=[(ECHO, 0x6)]).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("donate names access", lambda: Desc(attributes=0, receivers=[(ECHO, 2)]).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_DONATE, V1_1),
    ("borrower is the sender", lambda: Desc(receivers=[(VM_ID, 2)]).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("borrower twice", lambda: Desc(receivers=[(ECHO, 2), (ECHO, 1)]).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("no such borrower", lambda: Desc(receivers=[(0x8009, 2)]).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("borrower refuses the access", lambda: Desc(receivers=[(RO_ONLY, 2)]).encode(), Err.DENIED,
     Fn.MEM_SHARE, V1_1),
    ("endpoints disagree on the composite", lambda: patch(Desc(receivers=TWO).encode(), 48 + 16 + 4, "<I", 96),
     Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("composite misaligned", lambda: Desc(composite_offset=68).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("composite inside the endpoint array", lambda: Desc(composite_offset=56).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("composite past the end", lambda: patch(Desc().encode(), 48 + 4, "<I", 4096), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("composite reserved", lambda: Desc(composite_reserved=1).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("no range", lambda: Desc(ranges=[], total_pages=0).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("more ranges than allowed", lambda: Desc(ranges=[(RAM + 0x10000 + i * PAGE, 1) for i in range(9)]).encode(),
     Err.NO_MEMORY, Fn.MEM_SHARE, V1_1),
    ("ranges do not end the descriptor", lambda: Desc(trailing=bytes(16)).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("range array cut short", lambda: Desc().encode()[:-8], Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("more pages than allowed", lambda: Desc(ranges=[(RAM + 0x10000, 65)]).encode(), Err.NO_MEMORY,
     Fn.MEM_SHARE, V1_1),
    ("range reserved", lambda: Desc(range_reserved=1).encode(), Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("range without pages", lambda: Desc(ranges=[(RAM + 0x10000, 0)], total_pages=0).encode(),
     Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("range unaligned", lambda: Desc(ranges=[(RAM + 0x10008, 1)]).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("page counts exceed the total", lambda: Desc(total_pages=1).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("page counts short of the total", lambda: Desc(total_pages=3).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("range outside RAM", lambda: Desc(ranges=[(RAM + RAM_SIZE - PAGE, 2)]).encode(), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_1),
    ("range wraps the address space", lambda: Desc(ranges=[((1 << 64) - PAGE, 2)]).encode(),
     Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("ranges overlap", lambda: Desc(ranges=[(RAM + 0x10000, 2), (RAM + 0x11000, 1)]).encode(),
     Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_1),
    ("range already in use", lambda: Desc(ranges=[(IN_USE[0] + PAGE, 1)]).encode(), Err.DENIED,
     Fn.MEM_SHARE, V1_1),
    ("1.0 reserved header fields", lambda: patch(Desc(v10=True).encode(), 3, "<B", 1), Err.INVALID_PARAMETERS,
     Fn.MEM_SHARE, V1_0),
    ("1.0 header too short", lambda: Desc(v10=True).encode()[:24], Err.INVALID_PARAMETERS, Fn.MEM_SHARE, V1_0),
]


@pytest.mark.parametrize(("rule", "build", "code", "kind", "version"), CASES, ids=[c[0] for c in CASES])
def test_each_rule(rule: str, build: Callable[[], bytes], code: Err, kind: Fn, version: int) -> None:
    with pytest.raises(FfaError) as e:
        parse(build(), kind, version)
    assert e.value.code == code, (rule, e.value)


@pytest.mark.parametrize("version", [V1_0, V1_1, V1_2])
def test_well_formed_descriptors_pass(version: int) -> None:
    """The baselines the cases above break, accepted as they are."""
    v10, size = version == V1_0, 32 if version == V1_2 else 16
    tx = parse(Desc(v10=v10, emad_size=size).encode(), Fn.MEM_SHARE, version)
    assert tx.ranges == ((RAM + 0x10000, 2),) and tx.borrowers[0].id == ECHO
    tx = parse(Desc(v10=v10, emad_size=size, attributes=0, receivers=TWO, flags=1,
                    ranges=[(RAM + 0x20000, 1), (RAM + 0x10000, 3)]).encode(), Fn.MEM_LEND, version)
    assert tx.pages == 4 and [b.id for b in tx.borrowers] == [ECHO, STORE]
    tx = parse(Desc(v10=v10, emad_size=size, attributes=0, receivers=[(ECHO, 0)]).encode(), Fn.MEM_DONATE, version)
    assert tx.kind == Fn.MEM_DONATE
    assert parse(Desc(receivers=[(RO_ONLY, 1)]).encode()).borrowers[0].access == 1
    assert encode_transaction(tx, version) == Desc(v10=v10, emad_size=size, attributes=0,
                                                   receivers=[(ECHO, 0)]).encode()


# ----------------------------------------------------------------- hypothesis

def check_accepted(tx: MemTransaction, limits: Limits = LIMITS) -> None:
    """What an accepted descriptor must be, whatever it looked like."""
    assert 1 <= len(tx.borrowers) <= limits.borrowers
    assert all(b.id in ACCEPTS for b in tx.borrowers)
    assert 1 <= tx.pages <= limits.pages and len(tx.ranges) <= limits.ranges
    spans = sorted((a, a + n * PAGE) for a, n in tx.ranges)
    for a, end in spans:
        assert a % PAGE == 0 and in_ram(a, end - a) and not in_use(a, end - a)
    for (_, end), (b, _) in itertools.pairwise(spans):
        assert end <= b


@given(st.binary(max_size=600), st.sampled_from([V1_0, V1_1, V1_2]),
       st.sampled_from([Fn.MEM_SHARE, Fn.MEM_LEND, Fn.MEM_DONATE]))
def test_random_bytes_never_crash(data: bytes, version: int, kind: Fn) -> None:
    try:
        tx = parse(data, kind, version)
    except FfaError:
        return
    check_accepted(tx)


pages = st.integers(0, RAM_SIZE // PAGE + 4)
descs = st.builds(
    Desc,
    attributes=st.sampled_from([0x2F, 0x27, 0x24, 0x2E, 0]),
    flags=st.sampled_from([0, 0, 2]),
    receivers=st.lists(st.tuples(st.sampled_from([ECHO, STORE, RO_ONLY]), st.sampled_from([1, 2, 5, 6])),
                       min_size=1, max_size=2),
    ranges=st.lists(st.tuples(pages.map(lambda p: RAM - 2 * PAGE + p * PAGE), st.integers(1, 12)),
                    min_size=1, max_size=6),
)


@given(descs, st.sampled_from([Fn.MEM_SHARE, Fn.MEM_LEND]))
def test_structured_descriptors(desc: Desc, kind: Fn) -> None:
    """Near-valid descriptors: accepted exactly when an independent reading of the
    rules says so, and then with the ranges the guest wrote."""
    spans = sorted((a, a + n * PAGE) for a, n in desc.ranges)
    ids = [r for r, _ in desc.receivers]
    valid = (
        (desc.attributes != 0 or kind == Fn.MEM_LEND)
        and len(set(ids)) == len(ids)
        and all(acc & 3 and not (kind == Fn.MEM_SHARE and acc >> 2) and (acc & 3) in ACCEPTS[r]
                for r, acc in desc.receivers)
        and sum(n for _, n in desc.ranges) <= LIMITS.pages
        and all(in_ram(a, end - a) and not in_use(a, end - a) for a, end in spans)
        and all(e <= b for (_, e), (b, _) in itertools.pairwise(spans))
    )
    try:
        tx = parse(desc.encode(), kind)
    except FfaError:
        assert not valid, desc
        return
    assert valid, desc
    check_accepted(tx)
    assert list(tx.ranges) == desc.ranges


@given(descs, st.integers(0, 200), st.integers(0, 255))
def test_one_byte_mutations_never_crash(desc: Desc, where: int, value: int) -> None:
    data = bytearray(desc.encode())
    data[where % len(data)] = value
    try:
        tx = parse(bytes(data), Fn.MEM_LEND, V1_1, replace(LIMITS, pages=1 << 20))
    except FfaError:
        return
    check_accepted(tx, replace(LIMITS, pages=1 << 20))
