"""``hvcproxyd status VM`` and ``hvcproxyd trace VM``: read a running daemon through
its control socket (hvcproxyd/control.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..config import DEFAULT_RUNTIME_DIR, ConfigError
from ..ops.callview import line_of
from ..ops.control import ControlError, TraceFilter, request_status, trace_calls
from ..ops.status import flat_report
from ..smccc.services import SERVICE_NAMES
from .registry import int_in, subcommand
from .vmref import config_of


def control_path(vm: str, override: Path | None) -> Path:
    """The control socket of VM: ``--control-socket``, else the one its config names
    (VM may be a config file, or a name with /etc/hvcproxyd/VM.yaml), else the default."""
    if override is not None:
        return override
    config = config_of(vm)
    return config.control_socket if config is not None else DEFAULT_RUNTIME_DIR / f"{vm}.ctl"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", help="the VM's name (control socket /run/hvcproxyd/VM.ctl, or the one "
                              "/etc/hvcproxyd/VM.yaml names), or the path of its config")
    p.add_argument("--control-socket", type=Path, metavar="PATH", help="connect here instead")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _resolve(args: argparse.Namespace) -> Path | None:
    try:
        return control_path(args.vm, args.control_socket)
    except ConfigError as err:
        print(f"hvcproxyd: {args.vm} has errors, cannot find its control socket:\n{err}", file=sys.stderr)
        return None


# ----------------------------------------------------------------- status

def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}us" if v < 10_000 else f"{v / 1000:.1f}ms"


def format_status(st: dict[str, Any]) -> str:
    out = [st["status_line"]]
    cfg = st["config"]
    out.append(f"  daemon     pid {st['pid']}, hvcproxyd {st['version']}, up {_duration(st['uptime_s'])}")
    out.append(f"  config     {cfg['path']}, loaded {_clock(cfg['loaded'])}: {cfg['rules']} rules, "
               f"{cfg['handlers']} handlers, per-call logging {'on' if cfg['log_calls'] else 'off'}")
    rl = st["reloads"]
    line = f"  reloads    {rl['applied']} applied, {rl['refused']} refused"
    last = rl["last"]
    if last is not None:
        line += f"; last {_clock(last['time'])}: " + ("applied" if last["ok"] else "REFUSED, running config kept")
    out.append(line)
    if last is not None and not last["ok"] and last["error"]:
        out.extend(f"               {err_line}" for err_line in str(last["error"]).splitlines())
    vmm = st["vmm"]
    if vmm is None:
        out.append(f"  VMM        none connected (socket {st['socket']})")
    else:
        out.append(f"  VMM        {vmm['name']!r} pid {vmm['pid']} uid {vmm['uid']} gid {vmm['gid']}, {vmm['accel']}, "
                   f"protocol v{vmm['protocol']}, {'reconnected' if vmm['reconnect'] else 'fresh boot'}, "
                   f"connected {_duration(vmm['connected_s'])}, RAM {vmm['memory']}, "
                   f"{vmm['in_flight']} call(s) in flight")
    qemu = st.get("qemu")
    if qemu is not None:
        out.append(f"  QEMU       run state {qemu['run_state'] or 'unknown'} (QMP {qemu['qmp']}: {qemu['qmp_state']}, "
                   f"{qemu['events']} lifecycle events)")
    c = st["connections"]
    out.append(f"  links      {c['accepted']} accepted, {c['reconnects']} reconnects, {c['refused_peers']} refused "
               f"peers, {c['protocol_errors']} protocol errors")
    if st["vcpus"]:
        out.append("  vCPUs      " + ", ".join(f"{v['index']} {v['power']}" for v in st["vcpus"])
                   + f" (as {st['vcpu_power_source']} holds them)")
    calls = st["calls"]
    results = ", ".join(f"{n} {r}" for r, n in sorted(calls["results"].items())) or "none"
    out.append(f"  calls      {calls['total']} ({results}); {calls['replays']} replays")
    if calls["handlers"]:
        out.append(f"  {'handler':24} {'type':16} {'calls':>10} {'errors':>7} {'timeouts':>8} {'p50':>8} {'p99':>8}")
        for name, h in calls["handlers"].items():
            out.append(f"  {name:24} {h['type']:16} {h['calls']:>10} {h['errors']:>7} {h['timeouts']:>8} "
                       f"{_us(h['p50_us']):>8} {_us(h['p99_us']):>8}")
        for name, h in calls["handlers"].items():
            words = ", ".join(f"{key}={value}" for key, value in flat_report(h.get("report") or {}))
            if words:
                out.append(f"  {name}: {words}")
    out.append(f"  metrics    {st['metrics'] or 'off'}; trace clients {st['trace_clients']}")
    return "\n".join(out)


def _status_args(p: argparse.ArgumentParser) -> None:
    _common(p)


@subcommand("status", "a running daemon's uptime, VMM, vCPU power states, calls per handler, errors "
                      "and p50/p99 handler latency", _status_args)
def cmd_status(args: argparse.Namespace) -> int:
    path = _resolve(args)
    if path is None:
        return 1
    try:
        st = request_status(path)
    except ControlError as err:
        print(f"hvcproxyd status: {err}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


# ----------------------------------------------------------------- trace

def _trace_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--func", action="append", default=[], metavar="F",
                   help="only this function: a name (PSCI_CPU_ON) or an ID (0x84000003); repeatable")
    p.add_argument("--range", action="append", default=[], metavar="R",
                   help=f"only IDs in FIRST-LAST (0x82000000-0x820000ff) or a service ({', '.join(SERVICE_NAMES)}); "
                        "repeatable")
    p.add_argument("--vcpu", action="append", default=[], type=int_in(0, 0xFFFF_FFFF), metavar="N",
                   help="only this vCPU; repeatable")
    p.add_argument("--handler", action="append", default=[], metavar="NAME",
                   help="only calls answered by this handler (or deny, kvm, none); repeatable")
    p.add_argument("-n", "--count", type=int_in(0), default=0, metavar="N",
                   help="stop after N calls (default: run until Ctrl-C)")


@subcommand("trace", "show a running daemon's calls live, one line each (filters: --func, --range, --vcpu, "
                     "--handler)", _trace_args)
def cmd_trace(args: argparse.Namespace) -> int:
    try:
        flt = TraceFilter.parse(args.func, args.range, args.vcpu, args.handler)
    except ValueError as err:
        print(f"hvcproxyd trace: {err}", file=sys.stderr)
        return 2
    path = _resolve(args)
    if path is None:
        return 1
    seen = 0
    try:
        for obj in trace_calls(path, flt):
            if "ok" in obj:
                print(f"hvcproxyd trace: tracing {obj['vm']} (Ctrl-C stops)", file=sys.stderr)
                continue
            if "dropped" in obj:
                print(f"hvcproxyd trace: {obj['dropped']} call(s) not shown: this reader was too slow",
                      file=sys.stderr)
                continue
            print(json.dumps(obj) if args.json else line_of(obj), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    except ControlError as err:
        print(f"hvcproxyd trace: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    return 0

