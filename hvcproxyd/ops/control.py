"""The control socket: ``status`` and live ``trace`` for operators.

Protocol: the client sends one JSON line, ``{"op": "status"}`` or
``{"op": "trace", "filter": {...}}``.  Status answers one JSON line and closes;
trace answers ``{"ok": true, ...}`` and then one JSON line per matching call,
until the client closes.  A client too slow to read loses calls, and is told
how many with a ``{"dropped": N}`` line: tracing must never stall a vCPU.

Only root and the daemon's own user may connect (SO_PEERCRED, on top of the
socket's 0600 mode).  The server side costs nothing while nobody traces: the
hub's observer is on the VmService only while a trace client is connected.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..core.service import VmService
from ..errors import HvcproxydError
from ..smccc import MASK32, routing_id
from ..smccc.names import function_id
from ..smccc.services import SERVICES
from ..unixsock import UnixListener, local_peer_problem, peer_credentials
from ..wire import Call, Reply
from .callview import CallView

log = logging.getLogger("hvcproxyd.control")

MAX_REQUEST = 4096
#: A client that has not sent its request line within this is closed (idle timeout).
REQUEST_TIMEOUT = 5.0
#: Clients served at once (status requests and traces); more are refused, not queued.
MAX_CLIENTS = 16
#: A client that does not read what it is sent within this is closed (a stalled trace).
SEND_TIMEOUT = 30.0
TRACE_QUEUE = 1024


class ControlError(HvcproxydError):
    """The control socket cannot be reached, or answered with an error."""


@dataclass(frozen=True, slots=True)
class TraceFilter:
    """Which calls a trace shows: within a facet any value matches, across facets all
    must (``--vcpu 1 --func PSCI_CPU_ON`` is CPU_ON from vCPU 1).  Empty: everything."""

    funcs: frozenset[int] = frozenset()
    ranges: tuple[tuple[int, int], ...] = ()
    vcpus: frozenset[int] = frozenset()
    handlers: frozenset[str] = frozenset()

    def matches(self, call: Call, handler: str) -> bool:
        fid = routing_id(call.func_id)
        if self.funcs and fid not in self.funcs:
            return False
        if self.ranges and not any(lo <= fid <= hi for lo, hi in self.ranges):
            return False
        if self.vcpus and call.vcpu not in self.vcpus:
            return False
        return not self.handlers or handler in self.handlers

    def to_json(self) -> dict[str, Any]:
        return {"funcs": sorted(self.funcs), "ranges": [list(r) for r in self.ranges], "vcpus": sorted(self.vcpus),
                "handlers": sorted(self.handlers)}

    @classmethod
    def from_json(cls, data: Any) -> TraceFilter:
        """Strict: a malformed filter is refused rather than half-applied."""
        if not isinstance(data, dict) or set(data) - {"funcs", "ranges", "vcpus", "handlers"}:
            raise ValueError("filter must be an object with funcs, ranges, vcpus, handlers")

        def ints(key: str, hi: int) -> list[int]:
            values = data.get(key, [])
            if not isinstance(values, list) or not all(type(v) is int and 0 <= v <= hi for v in values):
                raise ValueError(f"filter {key} must be a list of integers 0..{hi:#x}")
            return values

        ranges = data.get("ranges", [])
        if not isinstance(ranges, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(type(v) is int and 0 <= v <= MASK32 for v in r)
                for r in ranges):
            raise ValueError("filter ranges must be a list of [first, last] function IDs")
        handlers = data.get("handlers", [])
        if not isinstance(handlers, list) or not all(isinstance(h, str) for h in handlers):
            raise ValueError("filter handlers must be a list of names")
        return cls(frozenset(ints("funcs", MASK32)), tuple((r[0], r[1]) for r in ranges),
                   frozenset(ints("vcpus", MASK32)), frozenset(handlers))

    @classmethod
    def parse(cls, funcs: list[str], ranges: list[str], vcpus: list[int], handlers: list[str]) -> TraceFilter:
        """From command-line words; raises ValueError naming the bad one."""
        fids = set()
        for text in funcs:
            fid = function_id(text)
            if fid is None:
                raise ValueError(f"--func {text!r}: not a function ID or a known name (e.g. PSCI_CPU_ON, 0x84000003)")
            fids.add(routing_id(fid))
        spans: list[tuple[int, int]] = []
        for text in ranges:
            if text in SERVICES:
                spans.extend(SERVICES[text])
                continue
            lo_text, sep, hi_text = text.replace("..", "-").partition("-")
            try:
                lo, hi = int(lo_text, 0), int(hi_text, 0) if sep else int(lo_text, 0)
            except ValueError:
                lo, hi = 1, 0
            if not 0 <= lo <= hi <= MASK32:
                raise ValueError(f"--range {text!r}: give FIRST-LAST (0x84000000-0x8400001F) or a service name "
                                 f"({', '.join(SERVICES)})")
            spans.append((lo, hi))
        return cls(frozenset(fids), tuple(spans), frozenset(vcpus), frozenset(handlers))


@dataclass(slots=True)
class _Subscriber:
    filter: TraceFilter
    send: trio.MemorySendChannel[CallView]
    dropped: int = 0


@dataclass(slots=True)
class TraceHub:
    """Fans calls out to trace clients; on the VmService only while one is connected."""

    vm: VmService
    subscribers: list[_Subscriber] = field(default_factory=list)
    dropped: int = 0

    def observe(self, call: Call, reply: Reply, handler: str, seconds: float) -> None:
        view: CallView | None = None
        for sub in self.subscribers:
            if sub.filter.matches(call, handler):
                view = view or CallView.of(call, reply, handler, seconds)
                try:
                    sub.send.send_nowait(view)
                except trio.WouldBlock:
                    sub.dropped += 1
                    self.dropped += 1

    def subscribe(self, flt: TraceFilter) -> tuple[_Subscriber, trio.MemoryReceiveChannel[CallView]]:
        send, receive = trio.open_memory_channel[CallView](TRACE_QUEUE)
        sub = _Subscriber(flt, send)
        if not self.subscribers:
            self.vm.observers.append(self.observe)
        self.subscribers.append(sub)
        return sub, receive

    def unsubscribe(self, sub: _Subscriber) -> None:
        self.subscribers.remove(sub)
        sub.send.close()
        if not self.subscribers:
            self.vm.observers.remove(self.observe)


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class ControlServer:
    def __init__(self, path: Path, vm_name: str, status: Callable[[], dict[str, Any]], hub: TraceHub) -> None:
        self.path = path
        self.vm_name = vm_name
        self.status = status
        self.hub = hub
        self.max_clients = MAX_CLIENTS
        self.clients = 0
        self.refused = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with UnixListener(self.path, 0o600, key="control_socket") as listener:
            task_status.started()
            await trio.serve_listeners(self._client, [listener])

    async def _client(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.clients >= self.max_clients:
                self.refused += 1
                log.warning("%s: control socket: refused a client, %d already connected", self.vm_name, self.clients)
                with trio.move_on_after(1), suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(_line({"error": f"the control socket already has {self.clients} clients"}))
                return
            self.clients += 1
            try:
                await self._serve_client(stream)
            finally:
                self.clients -= 1

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        why = local_peer_problem(stream.socket, None)
        if why:
            pid, _uid, _gid = peer_credentials(stream.socket)
            log.warning("%s: control socket: refused pid %d: %s", self.vm_name, pid, why)
            return
        try:
            request = await self._request(stream)
            op = request.get("op")
            if op == "status":
                with trio.move_on_after(SEND_TIMEOUT):
                    await stream.send_all(_line(self.status()))
            elif op == "trace":
                await self._trace(stream, TraceFilter.from_json(request.get("filter", {})))
            else:
                raise ValueError(f"unknown op {op!r}; valid: status, trace")
        except ValueError as err:
            with trio.move_on_after(1), suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(_line({"error": str(err)}))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left
        except Exception:
            # A bug here must cost one operator's request, never the VM's daemon.
            log.exception("%s: control socket request failed", self.vm_name)

    @staticmethod
    async def _request(stream: trio.SocketStream) -> dict[str, Any]:
        buf = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\n" not in buf and len(buf) <= MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                buf += chunk
        line = buf.partition(b"\n")[0]
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            raise ValueError("send one JSON object on one line, e.g. {\"op\": \"status\"}")
        return request

    async def _trace(self, stream: trio.SocketStream, flt: TraceFilter) -> None:
        sub, receive = self.hub.subscribe(flt)
        try:
            await stream.send_all(_line({"ok": True, "vm": self.vm_name, "filter": flt.to_json()}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_close, stream, nursery.cancel_scope)
                reported = 0
                async for view in receive:
                    with trio.move_on_after(SEND_TIMEOUT) as stalled:
                        try:
                            if sub.dropped != reported:
                                await stream.send_all(_line({"dropped": sub.dropped - reported}))
                                reported = sub.dropped
                            await stream.send_all(_line(view.to_json()))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            # Caught here, inside the nursery: outside it would arrive wrapped in
                            # an ExceptionGroup and read as a failure.  A client may leave at any time.
                            log.debug("%s: control socket: a trace client left", self.vm_name)
                            nursery.cancel_scope.cancel()
                            return
                    if stalled.cancelled_caught:
                        log.warning("%s: control socket: a trace client read nothing for %.0fs; closed",
                                    self.vm_name, SEND_TIMEOUT)
                        nursery.cancel_scope.cancel()
                        return
        finally:
            self.hub.unsubscribe(sub)

    @staticmethod
    async def _watch_close(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        """A trace client never sends after its request; EOF means it left."""
        try:
            while await stream.receive_some(512):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


# ----------------------------------------------------------------- client (blocking: it is a CLI)

def _connect(path: Path, request: dict[str, Any], timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(_line(request))
    except FileNotFoundError as err:
        sock.close()
        raise ControlError(f"no control socket at {path}: is the daemon running? "
                           f"(systemctl status hvcproxyd@{path.stem})") from err
    except PermissionError as err:
        sock.close()
        raise ControlError(f"{path}: permission denied; run as root or as the daemon's user") from err
    except OSError as err:
        sock.close()
        raise ControlError(f"{path}: {err.strerror}") from err
    return sock


def _lines(sock: socket.socket, path: Path) -> Iterator[dict[str, Any]]:
    with sock, sock.makefile("rb") as f:
        for raw in f:
            obj = json.loads(raw)
            if "error" in obj:
                raise ControlError(f"{path}: the daemon refused: {obj['error']}")
            yield obj
    # EOF without a word: the peer check refused us, or the daemon stopped.


def request_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    sock = _connect(path, {"op": "status"}, timeout)
    for obj in _lines(sock, path):
        return obj
    raise ControlError(f"{path}: closed without an answer (only root and the daemon's user may ask)")


def trace_calls(path: Path, flt: TraceFilter) -> Iterator[dict[str, Any]]:
    """Yields the daemon's header, then one dict per call (or ``{"dropped": N}``)."""
    sock = _connect(path, {"op": "trace", "filter": flt.to_json()}, 5.0)
    sock.settimeout(None)
    got_header = False
    for obj in _lines(sock, path):
        got_header = True
        yield obj
    if not got_header:
        raise ControlError(f"{path}: closed without an answer (only root and the daemon's user may trace)")


__all__ = ["ControlError", "ControlServer", "TraceFilter", "TraceHub", "request_status", "trace_calls"]
