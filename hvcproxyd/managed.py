"""The daemon as ``hvcproxyd run`` runs it: a :class:`~hvcproxyd.daemon.Daemon`
plus what an operator needs around it.

- systemd: READY=1 once every socket listens, STATUS= lines, WATCHDOG=1 from
  the event loop (a hung loop stops the pings and systemd restarts us),
  RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on SIGTERM;
- the VMM's credentials (SO_PEERCRED) against ``vmm.uid``/``vmm.gid``;
- the control socket (status, trace) and the metrics endpoint;
- per-call logging, only when ``log_calls`` or DEBUG asks for it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from . import __version__
from .callview import CallView
from .config import VmConfig, resolve_id
from .control import ControlServer, TraceHub
from .daemon import DRAIN_TIMEOUT, Daemon
from .errors import HvcproxydError
from .logsetup import set_vm
from .sdnotify import Notifier
from .telemetry import Telemetry
from .unixsock import set_group
from .vm import Observer
from .wire import Call, Reply, negotiate_version

log = logging.getLogger("hvcproxyd.managed")
calls_log = logging.getLogger("hvcproxyd.calls")

#: How often STATUS= is refreshed when there is no watchdog to piggy-back on.
STATUS_INTERVAL = 5.0


class ManagedDaemon(Daemon):
    def __init__(self, config: VmConfig, notifier: Notifier | None = None) -> None:
        super().__init__(config)
        self.notifier = notifier or Notifier()
        self.telemetry = Telemetry(self.vm.ctx)
        self.vm.observers.append(self.telemetry.observe)
        self.vm.event_observers.append(self.telemetry.on_event)
        self.hub = TraceHub(self.vm)
        self.peer_filter = self.check_peer
        self.refused_peers = 0
        self.reloads_refused = 0
        self.last_reload: dict[str, Any] | None = None
        self.config_loaded = time.time()
        self.metrics_address: Any = None
        self._call_logger: Observer | None = None
        self._set_call_logging()
        set_vm(config.name)

    # -- VMM authentication
    def check_peer(self, pid: int, uid: int, gid: int) -> str | None:
        """None if the peer may act as the VMM, else why not (the daemon logs it)."""
        auth = self.config.vmm
        if auth.uid is None and auth.gid is None:
            return None
        wanted = []
        for value, kind, have in ((auth.uid, "user", uid), (auth.gid, "group", gid)):
            if value is None:
                continue
            want = resolve_id(value, kind)
            if want == have:
                return None
            key = "vmm.uid" if kind == "user" else "vmm.gid"
            if want is None:
                wanted.append(f"{key} {value!r} (no such {kind})")
            elif isinstance(value, str):
                wanted.append(f"{key} {value!r} ({want})")
            else:
                wanted.append(f"{key} {value}")
        self.refused_peers += 1
        return f"uid {uid} gid {gid} matches neither " + " nor ".join(wanted)

    # -- per-call logging
    def _set_call_logging(self) -> None:
        """Per-call records cost a CallView each: attach the observer only when they
        are wanted (``log_calls`` at INFO, or the calls logger at DEBUG)."""
        if self._call_logger is not None:
            self.vm.observers.remove(self._call_logger)
            self._call_logger = None
        level = logging.INFO if self.config.log_calls else logging.DEBUG
        if not calls_log.isEnabledFor(level):
            return
        name = self.config.name

        def log_call(call: Call, reply: Reply, handler: str, seconds: float) -> None:
            view = CallView.of(call, reply, handler, seconds)
            calls_log.log(level, "%s: %s", name, view.summary(), extra={"hvc": view.journal_fields()})

        self._call_logger = log_call
        self.vm.observers.append(log_call)

    # -- signals
    def reload(self, path: Path | None = None) -> bool:
        self.notifier.reloading()
        old = self.config
        ok = super().reload(path)
        if ok:
            self.config_loaded = time.time()
            for key in ("control_socket", "metrics"):
                if getattr(old, key) != getattr(self.config, key):
                    log.warning("%s: %s changed; it applies when the daemon restarts", self.config.name, key)
            gid = self.config.vmm.gid
            if gid is not None and gid != old.vmm.gid:
                try:
                    set_group(self.config.socket, gid, "vmm.gid")
                except HvcproxydError as err:
                    log.error("%s: %s", self.config.name, err)
            self._set_call_logging()
        else:
            self.reloads_refused += 1
        self.last_reload = {"time": time.time(), "ok": ok, "error": self.reload_error,
                            "path": str(path or self.config.path)}
        self.notifier.notify(READY=1, STATUS=self.status_line())
        return ok

    async def drain_and_stop(self, timeout: float = DRAIN_TIMEOUT) -> None:
        self.notifier.notify(STOPPING=1, STATUS=f"{self.config.name}: stopping")
        await super().drain_and_stop(timeout)

    # -- what it is doing
    def status_line(self) -> str:
        name, session = self.config.name, self.session
        if self.draining:
            return f"{name}: stopping, {session.in_flight if session else 0} call(s) in flight"
        if session is not None and session.hello is not None:
            return (f"serving {name}: {len(session.hello.vcpus)} vCPUs, {len(self.config.rules)} rules, "
                    f"{sum(self.vm.stats.calls.values()):,} calls")
        return f"{name}: waiting for the VMM on {self.config.socket} ({len(self.config.rules)} rules)"

    def status(self) -> dict[str, Any]:
        cfg, vm, now = self.config, self.vm, time.time()
        stats = vm.stats
        session = self.session
        vmm: dict[str, Any] | None = None
        if session is not None and session.hello is not None:
            hello = session.hello
            try:
                pid, uid, gid = session.transport.peer_credentials()
            except OSError:
                pid = uid = gid = -1
            memory = vm.ctx.memory
            vmm = {"name": hello.name, "pid": pid, "uid": uid, "gid": gid, "accel": hello.accel.name.lower(),
                   "protocol": negotiate_version(hello.min_version, hello.max_version),
                   "reconnect": hello.reconnect, "connected_s": round(now - session.connected_at, 1),
                   "in_flight": session.in_flight,
                   "memory": "memfd" if memory is not None and memory.mapped else "through the VMM"}
        power = self.telemetry.power_states()
        handlers: dict[str, Any] = {}
        for name in sorted(set(stats.calls) | set(stats.errors) | set(stats.timeouts) | set(cfg.handlers)):
            hist = self.telemetry.latency.get(name)
            p50 = hist.quantile(0.5) if hist else None
            p99 = hist.quantile(0.99) if hist else None
            spec = cfg.handlers.get(name)
            handlers[name] = {"type": spec.type_name if spec else "built-in", "calls": stats.calls[name],
                              "errors": stats.errors[name], "timeouts": stats.timeouts[name],
                              "p50_us": None if p50 is None else round(p50 * 1e6, 1),
                              "p99_us": None if p99 is None else round(p99 * 1e6, 1)}
        results: Counter[str] = Counter()
        for (_fid, _handler, result), n in self.telemetry.calls.items():
            results[result] += n
        return {
            "vm": cfg.name, "version": __version__, "pid": os.getpid(), "uptime_s": round(now - vm.started, 1),
            "state": "stopping" if self.draining else "serving" if vmm else "waiting",
            "status_line": self.status_line(),
            "config": {"path": str(cfg.path), "loaded": self.config_loaded, "rules": len(cfg.rules),
                       "handlers": len(cfg.handlers), "log_calls": cfg.log_calls},
            "reloads": {"applied": self.reloads, "refused": self.reloads_refused, "last": self.last_reload},
            "socket": str(cfg.socket), "metrics": _address(self.metrics_address),
            "vmm": vmm,
            "qemu": None if self.qmp is None else {"qmp": self.qmp.path, "qmp_state": self.qmp.state.value,
                                                   "run_state": self.qmp.run_status,
                                                   "events": self.qmp.events_seen},
            "connections": {"accepted": self.connections, "reconnects": self.reconnects,
                            "refused_peers": self.refused_peers, "protocol_errors": self.protocol_errors},
            "vcpus": [{"index": v.index, "mpidr": f"{v.mpidr:#x}", "power": power.get(v.index, "unknown")}
                      for v in vm.ctx.vcpus],
            "calls": {"total": sum(stats.calls.values()), "replays": stats.replays, "results": dict(results),
                      "handlers": handlers},
            "trace_clients": len(self.hub.subscribers), "trace_dropped": self.hub.dropped,
        }

    # -- running
    async def heartbeat(self) -> None:
        """WATCHDOG=1 from the event loop itself, and STATUS= when it changed."""
        watchdog = self.notifier.watchdog_s
        interval = max(watchdog / 2, 0.01) if watchdog else STATUS_INTERVAL
        last = ""
        while True:
            fields: dict[str, str | int] = {"WATCHDOG": 1} if watchdog else {}
            line = self.status_line()
            if line != last:
                fields["STATUS"] = last = line
            if fields:
                self.notifier.notify(**fields)
            await trio.sleep(interval)

    async def run(self, *, task_status: trio.TaskStatus[ManagedDaemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM/SIGINT or :meth:`stop`.  READY=1 goes out only once the
        VMM, control and metrics sockets all accept."""
        from .metrics import registry_for, serve_metrics

        cfg = self.config
        control = ControlServer(cfg.control_socket or cfg.socket.with_suffix(".ctl"), cfg.name, self.status,
                                self.hub)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.handle_signals)
            await nursery.start(self.serve)
            await nursery.start(control.serve)
            if cfg.metrics is not None:
                self.metrics_address = await nursery.start(serve_metrics, cfg.metrics, registry_for(self))
            self.notifier.notify(READY=1, STATUS=self.status_line())
            log.info("%s: ready (control socket %s)", cfg.name, control.path)
            if self.notifier.enabled:
                nursery.start_soon(self.heartbeat)
            task_status.started(self)
            await self._stop.wait()
            nursery.cancel_scope.cancel()


def _address(addr: Any) -> str | None:
    if addr is None:
        return None
    if isinstance(addr, tuple):
        return f"http://{addr[0]}:{addr[1]}/metrics"
    return f"unix:{addr}"


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


def run_service(config: VmConfig) -> int:
    """The CLI's ``run``: serve, and turn a startup failure into one clear line."""
    notifier = Notifier()
    problem = None
    try:
        trio.run(ManagedDaemon(config, notifier).run)
    except* HvcproxydError as group:
        problem = "; ".join(str(e) for e in _leaves(group))
    if problem is not None:
        log.error("%s: cannot serve: %s", config.name, problem)
        notifier.notify(STATUS=f"{config.name}: failed: {problem}"[:400])
        return 1
    return 0


__all__ = ["ManagedDaemon", "run_service"]
