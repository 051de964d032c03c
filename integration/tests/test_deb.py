"""The Debian package: built by scripts/build-deb.sh (cached under
${HVCPROXYD_CACHE}/deb/<key>/, keyed by the hash of its inputs), its contents
and metadata checked with dpkg-deb, lintian's findings reported, and the .deb
installed with dpkg into a throwaway root — an overlay of this machine's root
whose writes go to a tmpfs, in a private mount namespace — where the installed
hvcproxyd runs from its real paths.  Needs root, dpkg-dev, PyPI on a cold cache."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_harness import build_deb

from hvcproxyd.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)
    if check:
        assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def deb() -> Path:
    return build_deb()


def subcommands() -> dict[str, str]:
    """Subcommand -> its man section, from the parser (as scripts/gen-manpages.py has it)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: "1" if name == "demo" else "8" for name in sub.choices}


def contents(deb: Path) -> dict[str, str]:
    """Path (without the leading '.') -> dpkg-deb's line for it."""
    out: dict[str, str] = {}
    for line in run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0]
        out[name.removeprefix(".").rstrip("/") or "/"] = line
    return out


def test_contents(deb: Path) -> None:
    files = contents(deb)
    doc = "/usr/share/doc/hvcproxyd"
    wanted = [
        "/usr/lib/systemd/system/hvcproxyd@.service",
        "/usr/lib/sysusers.d/hvcproxyd.conf",
        "/etc/hvcproxyd/vm-template.yaml",
        f"{doc}/operations.md",  # uncompressed: the unit's Documentation= names it
        f"{doc}/config.md", f"{doc}/protocol.md", f"{doc}/handlers.md", f"{doc}/handlers/psci.md",
        f"{doc}/examples/metrics-tcp.conf", f"{doc}/examples/tee-device.conf", f"{doc}/examples/psci.yaml",
        "/usr/lib/hvcproxyd/pyvenv.cfg", "/usr/lib/hvcproxyd/bin/hvcproxyd",
        "/usr/share/man/man8/hvcproxyd.8.gz", "/usr/share/man/man1/hvcproxyd-reftee.1.gz",
    ]
    wanted += [f"/usr/share/man/man{s}/hvcproxyd-{n}.{s}.gz" for n, s in subcommands().items()]
    # Everything under docs/, every drop-in and every example config but the template (in /etc).
    wanted += [f"{doc}/{p.relative_to(REPO / 'docs')}" for p in (REPO / "docs").rglob("*") if p.is_file()]
    wanted += [f"{doc}/examples/{p.name}" for p in (REPO / "systemd").glob("*.conf")]
    wanted += [f"{doc}/examples/{p.name}" for p in (REPO / "config").glob("*.yaml") if p.name != "vm-template.yaml"]
    missing = [p for p in wanted if p not in files]
    assert not missing, f"not in the package: {missing}"
    for launcher in ("/usr/bin/hvcproxyd", "/usr/bin/hvcproxyd-reftee"):
        assert files[launcher].startswith("l"), files[launcher]
        assert f"-> ../lib/hvcproxyd/bin/{launcher.rsplit('/', 1)[1]}" in files[launcher]
    unit = (REPO / "systemd" / "hvcproxyd@.service").read_text()
    assert "Documentation=file:/usr/share/doc/hvcproxyd/operations.md" in unit
    # The examples are copies of the repo's, the template is not among them (it is in /etc).
    assert f"{doc}/examples/vm-template.yaml" not in files
    # A Python file compiled for its installed path (compileall -s/-p), not the build tree's.
    assert any(p.startswith("/usr/lib/hvcproxyd/lib/python3") and p.endswith(".pyc") for p in files)


def test_metadata(deb: Path) -> None:
    fields = run(["dpkg-deb", "-f", str(deb)]).stdout
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    assert f"Architecture: {arch}" in fields
    depends = next(line for line in fields.splitlines() if line.startswith("Depends:"))
    assert "python3.11" in depends  # the interpreter the venv links to
    assert "systemd | systemd-standalone-sysusers" in depends  # dh_installsysusers'
    assert "python3-venv" not in depends
    info = Path(run(["mktemp", "-d"]).stdout.strip())
    try:
        run(["dpkg-deb", "-e", str(deb), str(info)])
        assert (info / "conffiles").read_text().split() == ["/etc/hvcproxyd/vm-template.yaml"]
        postinst = (info / "postinst").read_text()
        assert "systemd-sysusers ${DPKG_ROOT:+--root=\"$DPKG_ROOT\"} hvcproxyd.conf" in postinst
        scripts = "".join(p.read_text() for p in info.iterdir() if p.name in {"postinst", "prerm", "postrm", "preinst"})
        # Nothing enables or starts an instance: which VMs exist is the admin's to say.
        assert "enable" not in scripts.replace("try-restart", "") and "start hvcproxyd" not in scripts
    finally:
        shutil.rmtree(info)


def test_lintian_report(deb: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lintian's findings are printed, not asserted (many are about the bundled venv);
    an error-level tag that is not one of the venv's expected ones fails."""
    if shutil.which("lintian") is None:
        pytest.skip("lintian not installed (apt-get install lintian)")
    done = run(["lintian", "--tag-display-limit", "0", str(deb)], timeout=600, check=False)
    with capsys.disabled():
        print(f"\nlintian {deb.name}:\n{done.stdout}{done.stderr}")
    expected = {
        # On purpose: the venv ships bytecode compiled for its installed path
        # (debian/rules), so a daemon under ProtectSystem=strict never recompiles.
        "package-installs-python-pycache-dir",
        # PyYAML's manylinux wheel links libyaml statically: the price of PyPI's pinned wheels.
        "embedded-library",
        # The project has no mail address yet (debian/control's Maintainer).
        "bogus-mail-host", "bogus-mail-host-in-debian-changelog",
    }
    errors = [line for line in done.stdout.splitlines() if line.startswith("E: ")]
    unexpected = [line for line in errors if line.split()[2] not in expected]
    assert not unexpected, f"lintian errors: {unexpected}"


@pytest.fixture
def installed_root(deb: Path, tmp_path: Path) -> Iterator[Path]:
    """A script that runs its arguments in a throwaway root where the .deb is installed."""
    if os.geteuid() != 0:
        pytest.skip("the throwaway root needs root (mount namespace, overlayfs, chroot)")
    script = tmp_path / "in-root.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        # In a private mount namespace: / overlaid with a tmpfs upper layer, so
        # dpkg -i, systemd-sysusers and the rest write only there.
        set -euo pipefail
        t={tmp_path}/ovl
        mkdir -p "$t"
        mount -t tmpfs tmpfs "$t"
        mkdir "$t/upper" "$t/work" "$t/root"
        mount -t overlay overlay -o lowerdir=/,upperdir="$t/upper",workdir="$t/work" "$t/root"
        mount --rbind /dev "$t/root/dev"
        mount -t proc proc "$t/root/proc"
        mount -t tmpfs tmpfs "$t/root/tmp"
        mount -t tmpfs tmpfs "$t/root/run"
        cp {deb} "$t/root/tmp/"
        if ! chroot "$t/root" env DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/{deb.name} \
                >{tmp_path}/dpkg.log 2>&1; then
            cat {tmp_path}/dpkg.log >&2; exit 1
        fi
        exec chroot "$t/root" "$@"
        """))
    script.chmod(0o755)
    yield script


def test_installed_package_runs(installed_root: Path) -> None:
    def in_root(*argv: str) -> subprocess.CompletedProcess[str]:
        return run(["timeout", "300", "unshare", "--mount", "--propagation", "private",
                    str(installed_root), *argv], timeout=320)

    help_text = in_root("/usr/bin/hvcproxyd", "--help").stdout
    assert "usage: hvcproxyd" in help_text
    # The copy in /usr/lib/hvcproxyd runs, not the checkout's or the dev venv's.
    where = in_root("/usr/lib/hvcproxyd/bin/python", "-c",
                    "import hvcproxyd, sys; print(hvcproxyd.__file__, sys.prefix)")
    assert where.stdout.split() == ["/usr/lib/hvcproxyd/lib/python3.11/site-packages/hvcproxyd/__init__.py",
                                    "/usr/lib/hvcproxyd"]
    check = in_root("/usr/bin/hvcproxyd", "check", "/etc/hvcproxyd/vm-template.yaml")
    assert "vm-template.yaml" in check.stdout + check.stderr
    # postinst's systemd-sysusers made the unit's user, with the state directory as its home.
    user = in_root("getent", "passwd", "hvcproxyd").stdout
    assert user.split(":")[5] == "/var/lib/hvcproxyd"
    page = in_root("env", "MANWIDTH=80", "man", "--warnings", "-l", "/usr/share/man/man8/hvcproxyd-run.8.gz")
    assert "hvcproxyd-run - serve one VM until SIGTERM" in page.stdout.replace("\u2010", "-")
    assert "EXIT STATUS" in page.stdout and "78" in page.stdout
    assert page.stderr == "", page.stderr  # groff has no warnings about the generated roff
    every = in_root("sh", "-c", "for f in /usr/share/man/man?/hvcproxyd*; do "
                    "MANWIDTH=80 man --warnings -l $f >/dev/null || exit 1; echo $f; done")
    assert every.stderr == "" and len(every.stdout.split()) == len(subcommands()) + 2  # + hvcproxyd, -reftee
    # The installed unit, as systemd reads it: ExecStart= resolves, the user exists, and the
    # sandbox scores as well as the repo's unit (offline: no systemd runs here).
    unit = in_root("sh", "-c", "cp /etc/hvcproxyd/vm-template.yaml /etc/hvcproxyd/vm1.yaml && "
                   "systemd-analyze verify --man=no hvcproxyd@vm1.service && "
                   "systemd-analyze security --offline=yes hvcproxyd@vm1.service")
    score = re.search(r"Overall exposure level for hvcproxyd@vm1\.service: ([0-9.]+)", unit.stdout)
    assert score and float(score.group(1)) <= 2.0, unit.stdout[-500:]  # test_ops_units' bar
    reftee = in_root("/usr/bin/hvcproxyd-reftee", "--help")
    assert "usage: hvcproxyd-reftee" in reftee.stdout
