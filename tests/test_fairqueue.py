"""The fair order of waiting calls (hvcproxyd.server.fairqueue), by itself: which
call goes next, given what each vCPU was served before."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hvcproxyd import wire
from hvcproxyd.server.fairqueue import FAIR_CREDIT, FairQueue


def call(vcpu: int, seq: int) -> wire.Call:
    return wire.Call(seq, vcpu, 0x8400_0000, (0,) * wire.N_ARGS)


def serve_alone(q: FairQueue, vcpu: int, n: int) -> None:
    for i in range(n):
        q.push(call(vcpu, i))
        assert q.pop()[0].vcpu == vcpu


def test_a_quiet_vcpu_goes_ahead_of_flooding_ones_and_its_reply_is_flagged() -> None:
    q = FairQueue(3)
    serve_alone(q, 0, 10)
    serve_alone(q, 1, 10)
    for i in range(4):
        q.push(call(0, 100 + i))
        q.push(call(1, 200 + i))
    q.push(call(2, 300))  # arrives last, never served before
    first, quiet = q.pop()
    assert (first.vcpu, quiet) == (2, True)
    assert [q.pop()[0].vcpu for _ in range(8)] == [0, 1] * 4  # the flooders take turns
    assert not q


def test_what_an_idle_vcpu_banks_is_bounded() -> None:
    """vCPU 0 was served 1000 calls while vCPU 1 idled; then both keep four calls
    waiting.  vCPU 1 goes first for FAIR_CREDIT calls (and its queue), not 1000,
    and from then on the two take turns."""
    q = FairQueue(2)
    serve_alone(q, 0, 1000)
    seq = iter(range(10_000, 100_000))
    for v in (0, 1):
        for _ in range(4):
            q.push(call(v, next(seq)))
    order = []
    for _ in range(400):
        c, _quiet = q.pop()
        order.append(c.vcpu)
        q.push(call(c.vcpu, next(seq)))  # refilled: each vCPU always has four waiting
    head = order.index(0)
    assert FAIR_CREDIT <= head <= FAIR_CREDIT + 4, head
    tail = order[head + 8:]
    assert abs(tail.count(0) - tail.count(1)) <= 4, tail


@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=300))
def test_each_vcpus_calls_keep_their_order(steps: list[tuple[int, bool]]) -> None:
    """Whatever the interleaving of arrivals and answers, a vCPU's calls come out
    in the order they went in, and nothing is lost."""
    q = FairQueue(4)
    seq, sent, got = 0, {v: [] for v in range(4)}, {v: [] for v in range(4)}  # type: ignore[var-annotated]
    for vcpu, answer in steps:
        if answer and q:
            c, _ = q.pop()
            got[c.vcpu].append(c.seq)
        else:
            seq += 1
            q.push(call(vcpu, seq))
            sent[vcpu].append(seq)
    while q:
        c, _ = q.pop()
        got[c.vcpu].append(c.seq)
    assert got == sent
