"""Prometheus metrics, served over HTTP on a UNIX socket or loopback TCP.

The numbers live in the VM's stats model (:mod:`hvcproxyd.core.stats`), the
daemon's link counters and the handlers' own reports; a custom collector turns
them into metric families only when scraped,
so prometheus-client adds nothing to the per-call path.  The HTTP side is a
minimal GET responder in trio (prometheus-client's own server is threaded and
TCP-only).
"""

from __future__ import annotations

import errno
import logging
import socket as stdsocket
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..config.settings import MetricsConfig
from ..core.stats import OTHER, CallStats
from ..errors import HvcproxydError
from ..smccc.names import function_name
from ..unixsock import UnixListener, local_peer_problem
from .status import flat_report

log = logging.getLogger("hvcproxyd.metrics")

MAX_HEAD = 8192
#: A scraper that has not sent its request head within this is closed (idle timeout).
REQUEST_TIMEOUT = 5.0
#: Scrapes served at once; more are answered 503 and closed, never queued.
MAX_CLIENTS = 8
#: A scraper that does not read its response within this is closed.
SEND_TIMEOUT = 10.0


class DaemonCollector(Collector):
    """Renders the same model ``status`` shows (its dict, taken once per scrape),
    plus the per-function counters and latency histograms of the stats model,
    which are too fine-grained for ``status``."""

    def __init__(self, status: Callable[[], dict[str, Any]], stats: CallStats) -> None:
        self.status = status
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        vm = st["vm"]
        stats = self.stats

        calls = CounterMetricFamily("hvcproxyd_calls", "Calls answered, by function, handler and result class "
                                    "(success, not_supported, error, value)",
                                    labels=["vm", "function", "function_id", "handler", "result"])
        for (fid, handler, result), n in sorted(stats.calls.items()):
            if fid == OTHER:
                name, hexid = "other", "other"
            else:
                hexid = f"{fid:#010x}"
                name = function_name(fid) or hexid
            calls.add_metric([vm, name, hexid, handler, result.value], n)
        yield calls

        latency = HistogramMetricFamily("hvcproxyd_handler_latency_seconds", "Time from dispatch to reply, "
                                        "per handler", labels=["vm", "handler"])
        for handler, hist in sorted(stats.latency.items()):
            latency.add_metric([vm, handler], hist.cumulative(), hist.total)
        yield latency

        handlers = st["calls"]["handlers"]
        failures = CounterMetricFamily("hvcproxyd_handler_failures", "Handler exceptions and timeouts (the guest "
                                       "got the service's error code)", labels=["vm", "handler", "kind"])
        for handler, h in sorted(handlers.items()):
            for kind, key in (("exception", "errors"), ("timeout", "timeouts")):
                if h[key]:
                    failures.add_metric([vm, handler, kind], h[key])
        yield failures

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["vm"])
            c.add_metric([vm], value)
            return c

        links = st["connections"]
        yield counter("hvcproxyd_call_replays", "Calls a reconnecting VMM re-sent, answered from the last reply",
                      st["calls"]["replays"])
        yield counter("hvcproxyd_protocol_errors", "VMM connections closed for breaking the protocol",
                      links["protocol_errors"])
        yield counter("hvcproxyd_vmm_connections", "VMM connections accepted", links["accepted"])
        yield counter("hvcproxyd_vmm_reconnects", "Handshakes from a VMM whose VM had already run", links["reconnects"])
        yield counter("hvcproxyd_vmm_refused", "Connections refused by the SO_PEERCRED check", links["refused_peers"])
        yield counter("hvcproxyd_trace_dropped", "Calls not shown to a trace client that read too slowly",
                      st["trace_dropped"])
        yield counter("hvcproxyd_control_refused", "Control-socket clients refused at the connection cap",
                      st["control_refused"])
        reloads = CounterMetricFamily("hvcproxyd_config_reloads", "SIGHUP reloads", labels=["vm", "result"])
        reloads.add_metric([vm, "applied"], st["reloads"]["applied"])
        reloads.add_metric([vm, "refused"], st["reloads"]["refused"])
        yield reloads
        connected = GaugeMetricFamily("hvcproxyd_vmm_connected", "1 while a VMM is attached", labels=["vm"])
        connected.add_metric([vm], 1 if st["vmm"] is not None else 0)
        yield connected
        start = GaugeMetricFamily("hvcproxyd_start_time_seconds", "When the daemon started (Unix time)",
                                  labels=["vm"])
        start.add_metric([vm], st["started"])
        yield start
        report = GaugeMetricFamily("hvcproxyd_handler_state", "Numbers a handler reports about the state it "
                                   "holds (e.g. memshare shared_bytes, ranges)", labels=["vm", "handler", "key"])
        for handler, h in sorted(handlers.items()):
            for key, value in sorted(flat_report(h["report"])):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    report.add_metric([vm, handler, key], float(value))
        yield report


def registry_for(status: Callable[[], dict[str, Any]], stats: CallStats) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(status, stats))
    ProcessCollector(namespace="hvcproxyd", registry=registry)
    return registry


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


async def _handle(stream: trio.abc.Stream, render: Callable[[], bytes]) -> None:
    async with stream:
        head = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_HEAD:
                chunk = await stream.receive_some(MAX_HEAD)
                if not chunk:
                    break
                head += chunk
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            reply = _response("400 Bad Request", b"send: GET /metrics HTTP/1.1\n")
        elif parts[0] != b"GET":
            reply = _response("405 Method Not Allowed", b"only GET\n")
        elif parts[1].split(b"?")[0] not in (b"/metrics", b"/"):
            reply = _response("404 Not Found", b"metrics are at /metrics\n")
        else:
            reply = _response("200 OK", render(), CONTENT_TYPE_LATEST)
        with trio.move_on_after(SEND_TIMEOUT), suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(reply)


async def _refuse(stream: trio.abc.Stream) -> None:
    async with stream:
        with trio.move_on_after(1), suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            # Read the request first: closing with it unread would reset the connection
            # before the scraper reads why.
            await stream.receive_some(MAX_HEAD)
            await stream.send_all(_response("503 Service Unavailable",
                                            f"more than {MAX_CLIENTS} scrapes at once\n".encode()))


async def serve_metrics(config: MetricsConfig, registry: CollectorRegistry, *,
                        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; ``task_status.started`` gets the socket path or (host, port)."""
    active = 0

    def render() -> bytes:
        return generate_latest(registry)

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal active
        if isinstance(stream, trio.SocketStream) and stream.socket.family == stdsocket.AF_UNIX:
            why = local_peer_problem(stream.socket, config.group)
            if why:
                log.warning("metrics: refused a scrape: %s", why)
                await stream.aclose()
                return
        if active >= MAX_CLIENTS:
            log.warning("metrics: refused a scrape, %d in progress", active)
            await _refuse(stream)
            return
        active += 1
        try:
            await _handle(stream, render)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the scraper left
        except Exception:
            log.exception("metrics request failed")  # never worth the VM's daemon
        finally:
            active -= 1

    if config.listen is not None:
        host, port = config.listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as err:
            hint = (" (the unit allows only UNIX sockets: install systemd/metrics-tcp.conf as a drop-in)"
                    if err.errno in (errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES) else "")
            raise HvcproxydError(f"metrics.listen: cannot listen on {host}:{port}: {err.strerror}{hint}") from err
        bound = listeners[0].socket.getsockname()
        log.info("metrics on http://%s:%d/metrics", host, bound[1])
        task_status.started((host, bound[1]))
        await trio.serve_listeners(handler, listeners)
    else:
        assert config.socket is not None
        async with UnixListener(config.socket, 0o660, config.group, "metrics.socket") as listener:
            log.info("metrics on %s (GET /metrics)", config.socket)
            task_status.started(config.socket)
            await trio.serve_listeners(handler, [listener])


def scrape_unix(path: str, timeout: float = 5.0) -> bytes:
    """GET /metrics over a UNIX socket: for tests and ``curl``-less hosts."""
    with stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        raise HvcproxydError(f"{path}: {status}")
    return body


__all__ = ["DaemonCollector", "registry_for", "scrape_unix", "serve_metrics"]
