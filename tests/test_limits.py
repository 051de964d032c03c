"""Listener exhaustion (issue 15 C): the fd limit, and the caps and idle timeouts
of the control socket, the metrics socket and the event stream."""

from __future__ import annotations

import json
import logging
import resource
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from hvcproxyd.config import MetricsConfig
from hvcproxyd.core.service import VmService
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.ops import control, metrics
from hvcproxyd.ops.control import ControlServer, TraceHub
from hvcproxyd.ops.service import raise_fd_limit
from hvcproxyd.sidecars.eventstream import EventStream

from .test_daemon import config_text
from .waiting import wait_until


async def receive_all(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes."""
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def test_the_soft_fd_limit_is_raised_to_the_hard_limit(caplog: pytest.LogCaptureFixture) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256, hard), hard))
    try:
        with caplog.at_level(logging.DEBUG, "hvcproxyd.service"):
            assert raise_fd_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert f"to {hard}" in caplog.text or f"fd limit is {hard}" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_unit_sets_limitnofile() -> None:
    unit = (Path(__file__).parent.parent / "systemd" / "hvcproxyd@.service").read_text()
    assert "\nLimitNOFILE=65536\n" in unit


async def test_control_socket_refuses_clients_over_its_cap_and_closes_idle_ones(
        make_config: Callable[[str], VmConfig], tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(config_text())
    server = ControlServer(tmp_path / "ctl.sock", "e2e", lambda: {"ok": 1}, TraceHub(VmService(config)))
    server.max_clients = 3
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        start = trio.current_time()
        silent = [await trio.open_unix_socket(str(server.path)) for _ in range(3)]
        await wait_until(lambda: server.clients == 3, "three clients being served")
        extra = await trio.open_unix_socket(str(server.path))
        refused = json.loads(await receive_all(extra))
        assert "already has 3 clients" in refused["error"]
        assert server.refused == 1 and trio.current_time() - start < control.REQUEST_TIMEOUT
        # Idle: nothing sent within REQUEST_TIMEOUT, so each is told why and closed.
        for s in silent:
            assert "send one JSON object" in json.loads(await receive_all(s))["error"]
        assert trio.current_time() - start >= control.REQUEST_TIMEOUT
        await wait_until(lambda: server.clients == 0, "the idle clients closed")
        # And the slots are free again.
        ok = await trio.open_unix_socket(str(server.path))
        await ok.send_all(b'{"op": "status"}\n')
        assert json.loads(await receive_all(ok)) == {"ok": 1}
        for s in [*silent, extra, ok]:
            await s.aclose()
        nursery.cancel_scope.cancel()


async def test_metrics_socket_refuses_scrapes_over_its_cap_instead_of_queueing_them(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    cfg = MetricsConfig(socket=tmp_path / "metrics.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics.serve_metrics, cfg, CollectorRegistry())
        start = trio.current_time()
        silent = [await trio.open_unix_socket(str(cfg.socket)) for _ in range(metrics.MAX_CLIENTS)]
        await trio.testing.wait_all_tasks_blocked()
        extra = await trio.open_unix_socket(str(cfg.socket))
        await extra.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert (await receive_all(extra)).startswith(b"HTTP/1.1 503 ")  # refused at once, not queued
        assert trio.current_time() - start < metrics.REQUEST_TIMEOUT
        for s in silent:  # idle: closed after REQUEST_TIMEOUT
            assert (await receive_all(s)).startswith(b"HTTP/1.1 400 ")
        assert trio.current_time() - start >= metrics.REQUEST_TIMEOUT
        ok = await trio.open_unix_socket(str(cfg.socket))
        await ok.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert (await receive_all(ok)).startswith(b"HTTP/1.1 200 ")
        for s in [*silent, extra, ok]:
            await s.aclose()
        nursery.cancel_scope.cancel()


async def test_event_stream_closes_a_subscriber_that_never_reads(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    big = b'{"type":"snapshot","pad":"' + b"x" * (4 << 20) + b'"}\n'  # more than a socket buffer holds
    es = EventStream(tmp_path / "ev.sock", lambda: big, max_subscribers=1, send_timeout=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(es.serve)
        start = trio.current_time()
        stuck = await trio.open_unix_socket(str(es.path))  # connects, never reads
        await wait_until(lambda: es.subscribers, "the subscriber registered")
        over = await trio.open_unix_socket(str(es.path))
        assert b"already has 1 subscribers" in await receive_all(over)  # the cap
        await wait_until(lambda: es.stats.stalled == 1, "the stalled subscriber closed", timeout=120)
        assert not es.subscribers and trio.current_time() - start >= 30.0
        for s in (stuck, over):
            await s.aclose()
        nursery.cancel_scope.cancel()
