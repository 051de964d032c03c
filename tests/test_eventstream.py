"""The subscriber stream over a real UNIX socket: snapshot first, order, overflow, hang-ups."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from hvcproxyd.errors import HvcproxydError
from hvcproxyd.handlers.pkvm_memshare.ledger import Ledger, RangeSet, Replica, SnapshotView
from hvcproxyd.sidecars.eventstream import EventStream


class LineReader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        raw, _, self.buf = self.buf.partition(b"\n")
        return json.loads(raw)  # type: ignore[no-any-return]


class State:
    """The producer's state: the number of events so far."""

    def __init__(self) -> None:
        self.n = 0
        self.snapshots = 0

    def snapshot(self) -> bytes:
        self.snapshots += 1
        return json.dumps({"type": "snapshot", "n": self.n}).encode() + b"\n"

    def event(self) -> bytes:
        self.n += 1
        return json.dumps({"type": "event", "n": self.n}).encode() + b"\n"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[EventStream, State]]:
    state = State()
    es = EventStream(tmp_path / "ev.sock", state.snapshot, queue_limit=8, max_subscribers=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(es.serve)
        yield es, state
        nursery.cancel_scope.cancel()


async def subscribe(es: EventStream) -> LineReader:
    before = len(es.subscribers)
    reader = LineReader(await trio.open_unix_socket(str(es.path)))
    await trio.testing.wait_all_tasks_blocked()
    assert len(es.subscribers) == before + 1
    return reader


async def test_snapshot_then_live_in_order(served: tuple[EventStream, State]) -> None:
    es, state = served
    es.publish(state.event())  # nobody listens yet: dropped, not queued
    reader = await subscribe(es)
    assert await reader.line() == {"type": "snapshot", "n": 1}
    for _ in range(20):  # more than the queue holds, but the reader keeps up
        es.publish(state.event())
        await trio.testing.wait_all_tasks_blocked()
    assert [(await reader.line())["n"] for _ in range(20)] == list(range(2, 22))
    assert es.stats.lost == 0 and es.stats.writes == 21  # without coalescing, one write per wake-up


async def test_overflow_costs_events_and_resyncs(served: tuple[EventStream, State]) -> None:
    es, state = served
    reader = await subscribe(es)
    assert await reader.line() == {"type": "snapshot", "n": 0}
    for _ in range(es.queue_limit + 5):  # no checkpoint: the writer cannot run in between
        es.publish(state.event())
    assert max(len(s.queue) for s in es.subscribers) <= es.queue_limit
    assert await reader.line() == {"type": "lost", "count": es.queue_limit + 5}
    assert await reader.line() == {"type": "snapshot", "n": es.queue_limit + 5}
    es.publish(state.event())
    assert await reader.line() == {"type": "event", "n": es.queue_limit + 6}
    assert (es.stats.lost, es.stats.resyncs) == (es.queue_limit + 5, 1)


async def test_a_stalled_subscriber_does_not_hold_up_another(served: tuple[EventStream, State]) -> None:
    es, state = served
    stalled = await subscribe(es)
    live = await subscribe(es)
    assert (await live.line())["type"] == "snapshot"
    for _ in range(3000):  # far more than the stalled socket's kernel buffer plus its queue
        es.publish(state.event())
        await trio.testing.wait_all_tasks_blocked()
        assert (await live.line())["n"] == state.n
    assert await stalled.line() == {"type": "snapshot", "n": 0}
    received = 0
    while (rec := await stalled.line())["type"] == "event":
        received += 1
        assert rec["n"] == received
    assert rec["type"] == "lost"
    resync = await stalled.line()
    assert resync == {"type": "snapshot", "n": received + rec["count"]} and resync["n"] == state.n


async def test_coalescing_sends_a_burst_in_one_write(tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    state = State()
    es = EventStream(tmp_path / "ev.sock", state.snapshot, coalesce_s=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(es.serve)
        reader = await subscribe(es)
        assert (await reader.line())["type"] == "snapshot"
        for _ in range(10):
            es.publish(state.event())
            await trio.testing.wait_all_tasks_blocked()
        assert es.stats.writes == 1  # only the snapshot: the writer is still gathering
        mock_clock.jump(0.5)
        assert [(await reader.line())["n"] for _ in range(10)] == list(range(1, 11))
        assert es.stats.writes == 2
        nursery.cancel_scope.cancel()


async def test_hang_up_and_subscriber_limit(served: tuple[EventStream, State]) -> None:
    es, _ = served
    first = await subscribe(es)
    second = await subscribe(es)
    extra = LineReader(await trio.open_unix_socket(str(es.path)))
    assert (await extra.line())["type"] == "error"
    with pytest.raises(EOFError):
        await extra.line()
    await first.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert len(es.subscribers) == 1 and es.stats.refused == 1
    assert (await second.line())["type"] == "snapshot"


async def test_socket_file_lifecycle(tmp_path: Path) -> None:
    path = tmp_path / "ev.sock"
    es = EventStream(path, lambda: b"{}\n")
    async with trio.open_nursery() as nursery:
        await nursery.start(es.serve)
        await nursery.start(es.serve)  # a successor replaces a stale socket
        assert path.is_socket() and oct(os.stat(path).st_mode & 0o777) == "0o660"
        nursery.cancel_scope.cancel()
    assert not path.exists()
    path.write_text("not ours")
    with pytest.raises(HvcproxydError, match="cannot listen"):
        await es.serve()
    assert path.read_text() == "not ours"  # never removes what is not a socket


async def test_a_chunked_snapshot_lets_the_producer_run_and_stays_consistent(tmp_path: Path) -> None:
    """A ledger snapshot of many chunks is sent a chunk at a time: the producer
    keeps publishing while it goes out, and what the reader rebuilds from the
    snapshot plus the changes after it equals the ledger at the end."""
    ledger = Ledger(4096)
    ranges = 20 * SnapshotView.CHUNK
    ledger.shared = RangeSet.from_sorted((2 * i * 4096, (2 * i + 1) * 4096) for i in range(ranges))
    es = EventStream(tmp_path / "ev.sock", lambda: ledger.view("vm", 0.0), queue_limit=1 << 16)
    published = 0

    async def producer() -> None:
        nonlocal published
        for i in range(200):
            change = ledger.share((2 * (ranges + i)) * 4096, 4096, vcpu=0)
            assert change is not None
            es.publish(change.json_line(0.0))
            published += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        await nursery.start(es.serve)
        stream = await trio.open_unix_socket(str(es.path))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(producer)
        reader = LineReader(stream)
        replica = Replica()
        snap = await reader.line()
        assert snap["type"] == "snapshot" and len(snap["ranges"]) == ranges
        # The producer ran while the snapshot was on its way (its writes were chunks, each an await).
        assert published > 0
        replica.apply(snap)
        while replica.seq != 200:
            replica.apply(await reader.line())
        assert replica.shared == ledger.shared
        assert es.stats.writes > 20  # the snapshot alone took one write per chunk
        nursery.cancel_scope.cancel()
