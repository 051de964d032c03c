#!/usr/bin/python3
"""Attacks on a running hvcproxyd, as an unprivileged local user would make them.

Standard library only: the security tier copies this file somewhere any user
can read and runs it with the system's python3 under another uid, so it needs
nothing of the project's (the frames it sends are built by the test and given
as hex).  Prints one JSON object with what each attack observed.

    attack.py flood   --unix PATH [--unix PATH ...] [--tcp HOST:PORT] [--count N] [--hold S]
    attack.py request --unix PATH --hex FRAME_OR_REQUEST [--expect-close]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import time
from typing import Any


def raise_fd_limit() -> int:
    """As far as the hard limit allows: an attacker uses all it may."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def connect(kind: str, where: str) -> socket.socket:
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(where)
    else:
        host, port = where.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=2)
    return s


def flood(targets: list[tuple[str, str]], count: int, hold: float, garbage: bytes) -> dict[str, Any]:
    """Open ``count`` connections to each target, send garbage on every other one,
    hold them all for ``hold`` seconds, then see which the daemon has closed."""
    out: dict[str, Any] = {"fd_limit": raise_fd_limit()}
    held: list[tuple[str, socket.socket]] = []
    for kind, where in targets:
        stats = {"connected": 0, "refused": 0, "errors": {}}
        for i in range(count):
            try:
                s = connect(kind, where)
            except OSError as err:
                stats["refused"] += 1
                name = type(err).__name__
                stats["errors"][name] = stats["errors"].get(name, 0) + 1
                continue
            stats["connected"] += 1
            if i % 2:
                try:
                    s.sendall(garbage)
                except OSError:
                    pass
            held.append((where, s))
        out[where] = stats
    time.sleep(hold)
    closed: dict[str, int] = {}
    for where, s in held:
        s.setblocking(False)
        try:
            data = s.recv(65536)
            gone = data == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        closed[where] = closed.get(where, 0) + gone
        s.close()
    for where, n in closed.items():
        out[where]["closed_by_daemon"] = n
    return out


def request(path: str, payload: bytes) -> dict[str, Any]:
    """Send one frame or request and report everything the daemon answers until it closes."""
    s = connect("unix", path)
    got = b""
    try:
        s.sendall(payload)
    except OSError:  # the daemon hung up before it had read everything: refused
        s.close()
        return {"answer_hex": "", "closed": True}
    closed = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            closed = True
            break
        if not data:
            closed = True
            break
        got += data
    s.close()
    return {"answer_hex": got.hex(), "closed": closed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="attack", required=True)
    f = sub.add_parser("flood", help="hold many connections open, some sending garbage")
    f.add_argument("--unix", action="append", default=[], help="a UNIX socket to flood")
    f.add_argument("--tcp", action="append", default=[], help="HOST:PORT to flood")
    f.add_argument("--count", type=int, default=1200, help="connections per target")
    f.add_argument("--hold", type=float, default=2.0, help="seconds to hold them")
    f.add_argument("--garbage-hex", default="ffffffff00000000" * 4, help="what every other connection sends")
    r = sub.add_parser("request", help="send one frame or request, report the answer")
    r.add_argument("--unix", required=True)
    r.add_argument("--hex", required=True)
    args = parser.parse_args()
    if args.attack == "flood":
        targets = [("unix", p) for p in args.unix] + [("tcp", t) for t in args.tcp]
        result = flood(targets, args.count, args.hold, bytes.fromhex(args.garbage_hex))
    else:
        result = request(args.unix, bytes.fromhex(args.hex))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
