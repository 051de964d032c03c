#!/usr/bin/python3.11
"""The systemd-vm image's control agent (hvc-agent.service): runs each request
read from the virtio-serial port /dev/virtio-ports/ctl and writes the answer back.

One JSON object a line each way: {"id": N, "cmd": "shell text", "timeout": S}
in, {"id": N, "rc": RC, "out": "...", "err": "..."} out (rc 124: timed out)."""

import json
import os
import subprocess
import time

PORT = "/dev/virtio-ports/ctl"


def serve(fd: int) -> None:
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:  # the host side is not connected (yet): poll
            time.sleep(0.2)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            try:
                done = subprocess.run(["/bin/bash", "-c", req["cmd"]], capture_output=True,
                                      timeout=req.get("timeout", 60), stdin=subprocess.DEVNULL)
                rc, out, err = done.returncode, done.stdout, done.stderr
            except subprocess.TimeoutExpired as e:
                rc, out, err = 124, e.stdout or b"", (e.stderr or b"") + b"\nagent: timed out"
            answer = {"id": req["id"], "rc": rc, "out": out.decode(errors="replace"),
                      "err": err.decode(errors="replace")}
            data = memoryview(json.dumps(answer).encode() + b"\n")
            while data:  # the port takes at most 32 KiB a write
                data = data[os.write(fd, data):]


def main() -> None:
    while not os.path.exists(PORT):
        time.sleep(0.2)
    fd = os.open(PORT, os.O_RDWR)
    print("hvc-agent: serving", PORT, flush=True)
    serve(fd)


if __name__ == "__main__":
    main()
