"""``hvcproxyd memshare watch|ls VM``: read a VM's memshare subscriber stream.

Plain blocking sockets: a reader of a local stream needs no event loop, and
this keeps the commands usable from any shell script.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from ..config import ConfigError
from ..handlers.pkvm_memshare.handler import MemshareOptions, default_socket
from ..handlers.pkvm_memshare.ledger import Replica, StreamError
from .registry import subcommand
from .vmref import config_of


def _socket_of(args: argparse.Namespace) -> Path:
    """--socket, else the stream socket the VM's config gives its pkvm-memshare
    handler, else the default for a VM of that name.  SystemExit with the reason
    if the config has errors or no such handler."""
    if args.socket:
        return Path(args.socket)
    try:
        config = config_of(args.vm)
    except ConfigError as err:
        raise SystemExit(f"hvcproxyd memshare: {args.vm} has errors, cannot find its stream:\n{err}") from None
    if config is None:
        return default_socket(args.vm)
    for spec in config.handlers.values():
        if isinstance(spec.options, MemshareOptions):
            if not spec.options.stream:
                raise SystemExit(f"hvcproxyd memshare: {config.path}: the pkvm-memshare handler has stream: false")
            return spec.options.socket or default_socket(config.name)
    raise SystemExit(f"hvcproxyd memshare: {config.path} has no pkvm-memshare handler")


def size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:g} {unit}" if value.is_integer() else f"{value:.2f} {unit}"
    return f"{n} B"


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1e6):06d}"


def format_record(rec: dict[str, Any]) -> list[str]:
    """Human lines for one stream record (docs/handlers/pkvm-memshare.md)."""
    kind = rec.get("type")
    if kind == "snapshot":
        c = rec["counters"]
        lines = [f"{_clock(rec['time'])} snapshot of {rec['vm']} at change {rec['seq']}: {len(rec['ranges'])} "
                 f"range(s), {size_text(rec['shared'])} shared (peak {size_text(c['peak_bytes'])}, "
                 f"{c['shares']} shares, {c['unshares']} unshares, {c['refused']} refused, "
                 f"granule {rec['granule']})"]
        lines += [f"  {line}" for line in range_lines(rec["ranges"], rec["granule"])]
        return lines
    if kind in ("share", "unshare"):
        return [f"{_clock(rec['time'])} #{rec['seq']:<8} vcpu{rec['vcpu']:<3} {kind:8} {rec['ipa']:#014x} "
                f"+{size_text(rec['size']):>9}  -> {size_text(rec['shared'])} shared"]
    if kind == "reset":
        return [f"{_clock(rec['time'])} #{rec['seq']:<8} VM reset: nothing shared"]
    if kind == "lost":
        return [f"-- this reader fell behind and lost {rec['count']} change(s); a fresh snapshot follows"]
    if kind == "error":
        return [f"-- the daemon refused this reader: {rec.get('reason')}"]
    return [f"-- unknown record {json.dumps(rec)}"]


def range_lines(ranges: list[list[int]], granule: int) -> list[str]:
    return [f"{ipa:#014x}..{ipa + size - 1:#014x}  {size_text(size):>10}  ({size // granule} granules)"
            for ipa, size in ranges]


def _records(sock: socket.socket) -> Iterator[dict[str, Any]]:
    with sock.makefile("rb") as f:
        for raw in f:
            yield json.loads(raw)


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as err:
        sock.close()
        raise SystemExit(f"hvcproxyd memshare: cannot connect to {path}: {err.strerror}; is the VM's daemon running "
                         "with a pkvm-memshare handler (stream: true)?") from err
    return sock


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="memshare_command", metavar="ACTION", required=True)
    for name, text in (("watch", "print the ledger's snapshot, then every share and unshare as it happens"),
                       ("ls", "print the guest's currently shared ranges and the ledger's counters")):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("vm", metavar="VM", nargs="?", help="the VM's name or the path of its config (the stream "
                       "is the one the config's pkvm-memshare handler names, by default "
                       "/run/hvcproxyd/VM.memshare.sock)")
        q.add_argument("--socket", help="the stream's socket path (the handler's socket option)")
        q.add_argument("--json", action="store_true", help="print the stream's JSON lines as they are")


@subcommand("memshare", "show what a pKVM guest shares with the host (ls) or follow it live (watch)", _args)
def cmd_memshare(args: argparse.Namespace) -> int:
    if args.vm is None and args.socket is None:
        print("hvcproxyd memshare: give a VM name or --socket", file=sys.stderr)
        return 2
    sock = _connect(_socket_of(args))
    with sock:
        if args.memshare_command == "ls":
            return _ls(sock, args.json, sys.stdout)
        try:
            return _watch(sock, args.json, sys.stdout)
        except KeyboardInterrupt:
            return 0


def _ls(sock: socket.socket, raw: bool, out: TextIO) -> int:
    rec = next(_records(sock), None)
    if rec is None or rec.get("type") != "snapshot":
        print(f"hvcproxyd memshare: expected a snapshot, got {rec!r}", file=sys.stderr)
        return 1
    if raw:
        print(json.dumps(rec), file=out)
        return 0
    print("\n".join(format_record(rec)), file=out)
    return 0


def _watch(sock: socket.socket, raw: bool, out: TextIO) -> int:
    replica = Replica()
    for rec in _records(sock):
        if raw:
            print(json.dumps(rec, separators=(",", ":")), file=out, flush=True)
        else:
            print("\n".join(format_record(rec)), file=out, flush=True)
        try:
            replica.apply(rec)
        except StreamError as err:
            print(f"hvcproxyd memshare: the stream is inconsistent: {err}", file=sys.stderr)
            return 1
    print("hvcproxyd memshare: the daemon closed the stream", file=sys.stderr)
    return 0
