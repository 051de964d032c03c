"""L1, the emulated arm64 KVM host, for the nested integration tests.

L0 is the patched ``qemu-system-aarch64`` under TCG (``-M virt,virtualization=on``);
L1 is Debian's arm64 cloud kernel booted at EL2 in it, with KVM in VHE mode and the
initramfs from ``integration/nested/build-l1.sh`` (``/init`` = ``l1-init``).  L1 runs
its own arm64 QEMU (``/opt/qemu``) with ``-accel kvm`` for the L2 guests.

L0 has two PL011 UARTs: the first is L1's console (ttyAMA0), on L0's stdin and stdout
(pipes to this harness); the second (ttyAMA1, left raw by l1-init) is the host line,
a client of the UNIX socket ``line`` (or a null chardev).  :class:`L1Host` boots it,
parses the report l1-init prints, and runs shell commands on the console.

Every console byte goes to ``workdir/l1-console.log`` as it arrives; L0's own
messages to ``workdir/l0.err``.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from qemu_harness import INTEGRATION, REPO, _run_build, _stop

from tests.waiting import poll

NESTED = INTEGRATION / "nested"
REPORT_BEGIN = "==== L1 REPORT BEGIN ===="
REPORT_END = "==== L1 REPORT END ===="
#: L0's CPU: pauth-impdef=on emulates pointer authentication with a cheap
#: IMPLEMENTATION DEFINED algorithm instead of QARMA5, much faster under TCG.
L0_CPU = "max,pauth-impdef=on"
L0_ACCEL = "tcg,thread=multi,tb-size=512"
L1_CMDLINE = "console=ttyAMA0 rdinit=/init"


def build_l1(qemu_bundle: Path | None = None) -> Path:
    """``build-l1.sh [--qemu DIR]``: the directory with ``vmlinuz`` and ``initramfs.cpio``."""
    args = ["--qemu", str(qemu_bundle)] if qemu_bundle is not None else []
    return _run_build("nested/build-l1.sh", args=args)


def parse_report(text: str) -> dict[str, str]:
    """The ``key: value`` lines between the report markers; a repeated key's values
    are joined with newlines."""
    begin = text.find(REPORT_BEGIN)
    end = text.find(REPORT_END, begin)
    if begin < 0 or end < 0:
        raise ValueError("no complete L1 report in the console output")
    report: dict[str, str] = {}
    for line in text[begin + len(REPORT_BEGIN):end].splitlines():
        key, sep, value = line.partition(": ")
        if not sep:
            key, sep, value = line.partition(":")
        if not sep or not key.strip():
            continue
        key, value = key.strip(), value.strip()
        report[key] = f"{report[key]}\n{value}" if key in report else value
    return report


class L1Host:
    """Boots L0 + L1 on ``with`` and kills L0 (its whole session) on exit, also when
    the body fails.

    ``line``: a host UNIX socket path L0's second UART (L1's ttyAMA1) connects to as a
    client, reconnecting every 100 ms until something listens; None gives it a null
    chardev."""

    def __init__(self, qemu_bin: Path, image_dir: Path, workdir: Path, *, line: Path | None = None,
                 smp: int = 2, mem_mb: int = 2048, boot_timeout: float = 600.0) -> None:
        self.image_dir = image_dir
        self.workdir = workdir
        self.boot_timeout = boot_timeout
        initrd = image_dir / "initramfs.cpio"
        if not initrd.exists():
            initrd = image_dir / "initramfs.cpio.gz"
        serial1 = ["-chardev", f"socket,id=line,path={line},reconnect-ms=100"] if line is not None else \
            ["-chardev", "null,id=line"]
        self.argv = [
            str(qemu_bin), "-M", "virt,virtualization=on,gic-version=3", "-cpu", L0_CPU, "-accel", L0_ACCEL,
            "-smp", str(smp), "-m", str(mem_mb), "-nodefaults", "-no-user-config", "-display", "none",
            "-monitor", "none", "-nic", "none", *serial1, "-serial", "stdio", "-serial", "chardev:line",
            "-kernel", str(image_dir / "vmlinuz"), "-initrd", str(initrd), "-append", L1_CMDLINE,
        ]
        self.log_path = workdir / "l1-console.log"
        self.err_path = workdir / "l0.err"
        self.report: dict[str, str] = {}
        self.boot_seconds = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    # -- lifetime
    def __enter__(self) -> L1Host:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def boot(self) -> None:
        """Start L0, wait for l1-init's report and for the console shell to answer."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "l0.argv").write_text(" ".join(self.argv) + "\n")
        start = time.monotonic()
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         start_new_session=True)
        self._reader = threading.Thread(target=self._read_console, name="l1-console", daemon=True)
        self._reader.start()
        self._wait_for(REPORT_END, "L1's report", self.boot_timeout - (time.monotonic() - start))
        self.report = parse_report(self.console_log())
        (self.workdir / "l1-report.txt").write_text(
            "".join(f"{k}: {line}\n" for k, v in self.report.items() for line in v.splitlines()))
        status, out = self.run("echo ready", timeout=max(30.0, self.boot_timeout - (time.monotonic() - start)))
        if status != 0 or out.strip() != "ready":
            raise AssertionError(f"L1's console shell answered {status} {out!r}:\n{self._tail()}")
        self.boot_seconds = time.monotonic() - start
        with (self.workdir / "l1-boot-time.txt").open("w") as f:
            f.write(f"{self.boot_seconds:.1f}\n")
        print(f"L0+L1 booted in {self.boot_seconds:.1f}s (console log {self.log_path})")

    def close(self) -> None:
        if self.proc is not None:
            _stop(self.proc, signal.SIGKILL, grace=10.0)
            if self.proc.stdin is not None:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
        if self._reader is not None:
            self._reader.join(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- the console
    def _read_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with self.log_path.open("wb") as log:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                with self._lock:
                    self._buf += chunk

    def console_log(self) -> str:
        """Everything L1's console printed so far (carriage returns dropped)."""
        with self._lock:
            data = bytes(self._buf)
        return data.decode(errors="replace").replace("\r", "")

    def _tail(self, n: int = 6000) -> str:
        err = self.err_path.read_text(errors="replace")[-2000:] if self.err_path.exists() else ""
        return f"--- L1 console (tail) ---\n{self.console_log()[-n:]}\n--- L0 stderr ---\n{err}"

    def _wait_for(self, pattern: str, what: str, timeout: float, start: int = 0) -> re.Match[str]:
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            if m := rx.search(self.console_log(), start):
                return m
            if not self.running:
                rc = self.proc.returncode if self.proc is not None else None
                raise AssertionError(f"L0 exited ({rc}) while waiting for {what}:\n{self._tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self._tail()}")
            time.sleep(0.05)

    def send(self, text: str) -> None:
        """Raw input for L1's console."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def start(self, command: str, *, stdin: bool = False) -> Job:
        """Start ``command`` (shell text; a subshell, so ``cd`` or ``exit`` stay inside it)
        in L1 and return at once.  With ``stdin`` the command reads the console (what
        :meth:`send` types), as an L2 QEMU on ``-serial mon:stdio`` must; otherwise
        /dev/null, so it cannot eat the next command.

        The output is framed by markers with a fresh token that the command line itself
        does not contain (printf joins it), so neither the echo of the input nor earlier
        output can be mistaken for them."""
        token = secrets.token_hex(6)
        mark = len(self.console_log())
        redirect = "" if stdin else " </dev/null"
        self.send(f"printf '%s_%s\\n' @@L1B {token}; ( {command}\n){redirect} 2>&1; "
                  f"printf '%s_%s_%s@@\\n' @@L1E {token} $?\n")
        begin = self._wait_for(rf"@@L1B_{token}$", f"the start of {command!r}", 60.0, mark)
        return Job(self, command, token, begin.end())

    def run(self, command: str, timeout: float) -> tuple[int, str]:
        """:meth:`start` ``command`` and wait for it: its exit status and output (stdout
        and stderr).  Raises with the console's tail on timeout."""
        return self.start(command).wait(timeout)

    def check(self, command: str, timeout: float) -> str:
        """``run`` that fails the test unless the command exits with 0; its output."""
        status, out = self.run(command, timeout)
        if status != 0:
            raise AssertionError(f"L1: {command!r} exited with {status}:\n{out}")
        return out

    def wait_console(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` (multiline regex) in the console output."""
        return poll(lambda: re.search(pattern, self.console_log(), re.MULTILINE), f"L1 console /{pattern}/",
                    timeout=timeout, log=self.log_path)


class Job:
    """A command :meth:`L1Host.start` started on L1's console."""

    def __init__(self, host: L1Host, command: str, token: str, begin: int) -> None:
        self.host = host
        self.command = command
        self.token = token
        self.begin = begin

    def output(self) -> str:
        """What the command printed so far."""
        text = self.host.console_log()[self.begin:]
        end = self._end(text)
        return (text[:end.start()] if end else text).removeprefix("\n")

    def _end(self, text: str) -> re.Match[str] | None:
        return re.search(rf"@@L1E_{self.token}_(\d+)@@$", text, re.MULTILINE)

    def expect(self, pattern: str, timeout: float, count: int = 1) -> re.Match[str]:
        """The ``count``-th match of ``pattern`` (multiline regex) in the command's output."""
        rx = re.compile(pattern, re.MULTILINE)

        def found() -> re.Match[str] | None:
            matches = list(rx.finditer(self.output()))
            if len(matches) >= count:
                return matches[count - 1]
            if not self.host.running:
                raise AssertionError(f"L0 exited while {self.command!r} ran:\n{self.host._tail()}")
            if end := self._end(self.host.console_log()[self.begin:]):
                raise AssertionError(f"{self.command!r} ended (exit {end[1]}) without printing /{pattern}/:\n"
                                     f"{self.output()[-6000:]}")
            return None
        return poll(found, f"/{pattern}/ x{count} from {self.command!r}", timeout=timeout,
                    log=self.host.log_path)

    def send(self, text: str) -> None:
        """Type ``text`` to the command (started with ``stdin=True``)."""
        self.host.send(text)

    def wait(self, timeout: float) -> tuple[int, str]:
        """Its exit status and output, once it ends."""
        end = self.host._wait_for(rf"@@L1E_{self.token}_(\d+)@@$", f"{self.command!r} to finish", timeout,
                                  self.begin)
        return int(end[1]), self.output()


@contextmanager
def line_adapter(line: Path, daemon_socket: Path, log_path: Path) -> Iterator[Path]:
    """``line_adapter.py`` listening on ``line`` (L0's second UART connects to it) and
    connecting to ``daemon_socket`` for each HELLO from L1; yields ``daemon_socket``,
    where the test starts its daemons.  Stopped, its log printed, on exit."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(NESTED / "line_adapter.py"), "--line", str(line),
                                 "--daemon", str(daemon_socket)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
                                start_new_session=True)
    try:
        poll(line.is_socket, f"line_adapter.py listening on {line}", log=log_path)
        yield daemon_socket
    finally:
        _stop(proc)
        print(f"--- line adapter ---\n{log_path.read_text(errors='replace')[-3000:]}")
