"""Harness for the QEMU integration tests (fixtures re-exported by conftest.py): build (or reuse) the patched QEMU,
the bare-metal guests and the Linux guest through the integration/ scripts,
run hvcproxyd and QEMU as child processes, and clean every process up.

This is the one QEMU launcher (``start_qemu``).  The daemon child is the unit
tier's ``tests.process.DaemonProcess`` and every wait is ``tests.waiting.poll``.

Nothing here skips: a missing tool or a failed build fails the test with the
build script's output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.process import DaemonProcess
from tests.waiting import poll

#: The daemon child; the name the integration tests know it by.
Daemon = DaemonProcess
#: The start_daemon fixture's type (it starts `hvcproxyd run`).
StartDaemon = Callable[..., DaemonProcess]

INTEGRATION = Path(__file__).resolve().parent.parent
REPO = INTEGRATION.parent
CONFIGS = INTEGRATION / "configs"
GUESTS_CONFIG = CONFIGS / "guests.yaml"

# Cold builds: QEMU takes ~5-10 minutes on 2 cores, the rest seconds.
BUILD_TIMEOUT = 45 * 60


def _run_build(script: str, timeout: float = BUILD_TIMEOUT, args: Sequence[str] = ()) -> Path:
    """Run an integration build script; it prints its artifact's path last on stdout."""
    cmd = [str(INTEGRATION / script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"{script} did not finish in {timeout:.0f}s:\n{stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        pytest.fail(f"{script} printed no path:\n{proc.stderr[-3000:]}")
    path = Path(lines[-1])
    if not path.exists():
        pytest.fail(f"{script} printed {path}, which does not exist")
    return path


def build_deb() -> Path:
    """The project's .deb: scripts/build-deb.sh --cached (keyed by the hash of its inputs)."""
    if shutil.which("dpkg-deb") is None:
        pytest.fail("dpkg-deb not found: install the Debian package dpkg-dev (scripts/build-deb.sh does)")
    try:
        done = subprocess.run([str(REPO / "scripts" / "build-deb.sh"), "--cached"], capture_output=True, text=True,
                              timeout=2400, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/build-deb.sh --cached did not finish in 2400s")
    assert done.returncode == 0, f"scripts/build-deb.sh --cached failed ({done.returncode}):\n{done.stderr[-3000:]}"
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.name.startswith("hvcproxyd_") and path.suffix == ".deb"
    return path


@pytest.fixture(scope="session")
def qemu_bin() -> Path:
    return _run_build("qemu/build.sh")


@pytest.fixture(scope="session")
def guests() -> Path:
    return _run_build("guests/build.sh")


@pytest.fixture(scope="session")
def linux_guest() -> Path:
    return _run_build("linux/build.sh")


@contextmanager
def scratch_dir(prefix: str = "hvcit-") -> Iterator[Path]:
    """A short directory for sockets (AF_UNIX paths are limited to 108 bytes) and logs,
    removed afterwards; HVCIT_KEEP=1 keeps it."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    yield d
    if os.environ.get("HVCIT_KEEP"):
        print(f"logs kept in {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    with scratch_dir() as d:
        yield d


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def start_daemon(workdir: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start `hvcproxyd run CONFIG --socket PATH` and wait until it listens; every
    daemon is stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(config: Path = GUESTS_CONFIG, socket: Path | None = None, extra_yaml: str = "",
              qmp: bool = True) -> DaemonProcess:
        """qmp: point the daemon at the QMP socket of the test's first QEMU (start_qemu)."""
        sock = socket or workdir / "vm.sock"
        if qmp:
            extra_yaml += f"\nqmp: {workdir / 'qmp0.sock'}\n"
        if extra_yaml:
            cfg = workdir / f"config{len(started)}.yaml"
            cfg.write_text(config.read_text() + "\n" + extra_yaml + "\n")
            config = cfg
        d = DaemonProcess(config, socket=sock, log_path=workdir / f"daemon{len(started)}.log", log_level="DEBUG")
        started.append(d.start())
        d.wait_listening()
        return d

    yield start
    for d in started:
        d.stop()


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    log_path: Path  # the guest's serial port (QEMU's stdout)
    err_path: Path  # QEMU's own messages (stderr)
    qmp_path: Path  # its QMP socket (server=on, wait=off)
    argv: list[str] = field(default_factory=list)
    #: line=True: integration/nested/line_adapter.py, joining QEMU's pty to the handler's socket.
    adapter: subprocess.Popen[bytes] | None = None

    def wait_qmp(self, timeout: float = 30.0) -> Path:
        """The QMP socket, once QEMU listens on it."""
        def listening() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited ({self.proc.returncode}) before opening QMP:\n{self.messages()[-3000:]}")
            return self.qmp_path.is_socket()
        poll(listening, f"QEMU's QMP socket {self.qmp_path}", timeout=timeout, log=self.err_path)
        return self.qmp_path

    def monitor(self) -> QEMUMonitorProtocol:
        """A synchronous QMP client on its socket, connected; close() it when done."""
        mon = QEMUMonitorProtocol(str(self.wait_qmp()))
        mon.connect()
        return mon

    def kill(self) -> None:
        """SIGKILL, as a crash would end it."""
        _stop(self.proc, signal.SIGKILL)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def messages(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_output(self, pattern: str, timeout: float = 60.0, count: int = 1,
                    stderr: bool = False) -> list[re.Match[str]]:
        """Wait for `pattern` in the serial output (or QEMU's messages with stderr=True)."""
        found: list[re.Match[str]] = []
        read = self.messages if stderr else self.output

        def check() -> bool:
            found[:] = list(re.finditer(pattern, read(), re.MULTILINE))
            if len(found) >= count:
                return True
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited ({self.proc.returncode}) before printing /{pattern}/ x{count}:\n"
                            f"{self.output()[-6000:]}\n--- stderr ---\n{self.messages()[-3000:]}")
            return False

        poll(check, f"QEMU output /{pattern}/ x{count}", timeout=timeout,
             log=self.err_path if stderr else self.log_path)
        return found

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(self.proc, signal.SIGKILL)
            pytest.fail(f"QEMU did not exit within {timeout:.0f}s:\n{self.output()[-6000:]}\n"
                        f"--- stderr ---\n{self.messages()[-3000:]}")

    def stop(self) -> None:
        _stop(self.proc)
        if self.adapter is not None:
            _stop(self.adapter)


#: The start_qemu fixture's type.
StartQemu = Callable[..., Qemu]


def _start_line_adapter(pty: Path, handler_socket: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """The line adapter, with a pty whose other end (`pty` links to it) is the forwarder's chardev."""
    argv = [sys.executable, str(INTEGRATION / "nested" / "line_adapter.py"), "--pty", str(pty),
            "--daemon", str(handler_socket)]
    with log_path.open("wb") as log:
        adapter = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def linked() -> bool:
        if adapter.poll() is not None:
            pytest.fail(f"the line adapter exited ({adapter.returncode}):\n{log_path.read_text()[-3000:]}")
        return pty.is_symlink()
    poll(linked, f"the line adapter's pty {pty}", timeout=30, log=log_path)
    return adapter


@pytest.fixture
def start_qemu(qemu_bin: Path, workdir: Path) -> Iterator[Callable[..., Qemu]]:
    """Start qemu-system-aarch64 with the guest's serial port on stdio, logged to a file.

    `forwarder` names the hvcproxyd socket to connect with an hvc-forwarder object;
    None runs QEMU without one (stock behaviour).  line=True puts a serial line
    between them instead of a socket, as the nested-KVM tier has (protocol §1,
    "Serial lines"): the forwarder's chardev is a pty, and the line adapter joins
    it to the socket.  The n-th QEMU of a test listens for QMP on
    workdir/qmp<n>.sock (Qemu.qmp_path).
    """
    started: list[Qemu] = []

    def start(*args: str, forwarder: Path | None = None, machine: str = "virt", smp: int = 1,
              cpu: str = "max", memory: str = "256M", forwarder_opts: str = ",vm-name=guests",
              line: bool = False) -> Qemu:
        qmp = workdir / f"qmp{len(started)}.sock"
        argv = [str(qemu_bin), "-M", machine, "-cpu", cpu, "-smp", str(smp), "-m", memory,
                "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
                "-serial", "stdio", "-nic", "none", "-qmp", f"unix:{qmp},server=on,wait=off"]
        adapter = None
        if forwarder is not None:
            pty = workdir / f"line{len(started)}.pty"
            if line:
                adapter = _start_line_adapter(pty, forwarder, workdir / f"adapter{len(started)}.log")
            chardev = f"serial,id=hvc0,path={pty}" if line else f"socket,id=hvc0,path={forwarder},reconnect-ms=200"
            argv += ["-chardev", chardev, "-object", f"hvc-forwarder,id=hf0,chardev=hvc0{forwarder_opts}"]
        argv += list(args)
        log_path = workdir / f"qemu{len(started)}.log"
        err_path = workdir / f"qemu{len(started)}.err"
        with log_path.open("wb") as log, err_path.open("wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=err, start_new_session=True)
        q = Qemu(proc, log_path, err_path, qmp, argv)
        started.append(q)
        q.adapter = adapter
        return q

    yield start
    for q in started:
        q.stop()


CALL_RE = re.compile(
    r"^CALL (?P<name>\w+) fn=0x(?P<fn>[0-9a-f]+) x0=0x(?P<x0>[0-9a-f]+) x1=0x(?P<x1>[0-9a-f]+)"
    r" x2=0x(?P<x2>[0-9a-f]+) x3=0x(?P<x3>[0-9a-f]+)\s*$", re.MULTILINE)


def parse_calls(transcript: str) -> dict[str, tuple[int, int, int, int]]:
    """The "CALL NAME fn=.. x0=.. x1=.. x2=.. x3=.." lines of a guest transcript."""
    return {m["name"]: (int(m["x0"], 16), int(m["x1"], 16), int(m["x2"], 16), int(m["x3"], 16))
            for m in CALL_RE.finditer(transcript)}
