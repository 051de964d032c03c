"""``status`` as data: one JSON-able dict built from the daemon, the VM's stats
model and each handler's own report.  ``hvcproxyd status`` prints it, the
control socket sends it, and the systemd STATUS= line is its first line."""

from __future__ import annotations

import os
import time
from typing import Any

from .. import __version__
from ..server.daemon import Daemon
from ..wire import negotiate_version
from .control import TraceHub


def status_line(d: Daemon) -> str:
    name, session, cfg = d.config.name, d.session, d.config
    if d.draining:
        return f"{name}: stopping, {session.in_flight if session else 0} call(s) in flight"
    if session is not None and session.hello is not None:
        return (f"serving {name}: {len(session.hello.vcpus)} vCPUs, {len(cfg.rules)} rules, "
                f"{d.vm.stats.total():,} calls")
    return f"{name}: waiting for the VMM on {cfg.socket} ({len(cfg.rules)} rules)"


def vcpu_power(d: Daemon, reports: dict[str, dict[str, Any]]) -> tuple[dict[int, str], str]:
    """Each vCPU's power state and who says so: the handler that holds power state
    (PSCI, ON_PENDING included), else the VMM's own word."""
    for name, report in reports.items():
        power = report.get("vcpu_power")
        if isinstance(power, dict):
            return {int(i): str(state) for i, state in power.items()}, f"handler {name}"
    return {i: "on" if on else "off" for i, on in d.vm.vmm_power.items()}, "the VMM"


def flat_report(report: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A handler's report as (dotted key, scalar) pairs: a nested report (a sidecar's)
    becomes ``Sidecar.key``; the power states, shown per vCPU, are left out."""
    out: list[tuple[str, Any]] = []
    for key, value in report.items():
        if key == "vcpu_power":
            continue
        if isinstance(value, dict):
            out.extend(flat_report(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _address(addr: Any) -> str | None:
    if addr is None:
        return None
    if isinstance(addr, tuple):
        return f"http://{addr[0]}:{addr[1]}/metrics"
    return f"unix:{addr}"


def status_of(d: Daemon, *, config_loaded: float, last_reload: dict[str, Any] | None, metrics_address: Any,
              hub: TraceHub, control_refused: int = 0) -> dict[str, Any]:
    cfg, vm, now = d.config, d.vm, time.time()
    stats = vm.stats
    session = d.session
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
    reports = vm.reports()
    power, power_source = vcpu_power(d, reports)
    per_handler = stats.by_handler()
    handlers: dict[str, Any] = {}
    for name in sorted(set(per_handler) | {h for h, _ in stats.failures} | set(cfg.handlers)):
        hist = stats.latency.get(name)
        p50 = hist.quantile(0.5) if hist else None
        p99 = hist.quantile(0.99) if hist else None
        spec = cfg.handlers.get(name)
        handlers[name] = {"type": spec.type_name if spec else "built-in", "calls": per_handler[name],
                          "errors": stats.failures[name, "exception"], "timeouts": stats.failures[name, "timeout"],
                          "p50_us": None if p50 is None else round(p50 * 1e6, 1),
                          "p99_us": None if p99 is None else round(p99 * 1e6, 1),
                          "report": reports.get(name, {})}
    links = d.links
    return {
        "vm": cfg.name, "version": __version__, "pid": os.getpid(), "started": vm.started,
        "uptime_s": round(now - vm.started, 1),
        "state": "stopping" if d.draining else "serving" if vmm else "waiting",
        "status_line": status_line(d),
        "config": {"path": str(cfg.path), "loaded": config_loaded, "rules": len(cfg.rules),
                   "handlers": len(cfg.handlers), "log_calls": cfg.log_calls},
        "reloads": {"applied": d.reloads, "refused": d.reloads_refused, "last": last_reload},
        "socket": str(cfg.socket), "metrics": _address(metrics_address),
        "vmm": vmm,
        "qemu": None if d.qmp is None else {"qmp": d.qmp.path, "qmp_state": d.qmp.state.value,
                                            "run_state": d.qmp.run_status, "events": d.qmp.events_seen},
        "connections": {"accepted": links.accepted, "reconnects": links.reconnects,
                        "refused_peers": links.refused_peers, "protocol_errors": links.protocol_errors},
        "vcpus": [{"index": v.index, "mpidr": f"{v.mpidr:#x}", "power": power.get(v.index, "unknown")}
                  for v in vm.ctx.vcpus],
        "vcpu_power_source": power_source,
        "calls": {"total": stats.total(), "replays": stats.replays, "results": dict(stats.by_result()),
                  "handlers": handlers},
        "trace_clients": len(hub.subscribers), "trace_dropped": hub.dropped, "control_refused": control_refused,
        "durable": None if d.journal is None else d.journal.report(),
    }


__all__ = ["flat_report", "status_line", "status_of", "vcpu_power"]
