"""``hvcproxyd state export|import``: a VM's durable state, offline.

Both work on the state directory the VM's config names (``state.dir``), not on
a running daemon: export reads snapshot and journal as a restart would (and
writes nothing), import replaces them for a daemon that is stopped.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from ..config import ConfigError
from ..core import state
from ..core.service import VmService
from ..core.vmconfig import VmConfig
from ..durable.store import SNAPSHOT, DurableError, load, prepare, vm_dir, write_atomic
from .registry import subcommand
from .vmref import config_of


class _Refused(Exception):
    """One line for stderr; the command exits 1."""


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="state_command", metavar="ACTION", required=True)
    e = sub.add_parser("export", help="write the VM's state document (snapshot + journal) to stdout or a file",
                       description="Write the VM's current state document, as a restart would load it from "
                                   "snapshot and journal, to stdout or FILE.  Reads only; safe while it runs.")
    e.add_argument("vm", metavar="VM|CONFIG", help="a VM name (/etc/hvcproxyd/VM.yaml) or its config file")
    e.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here (atomically) instead of stdout")
    i = sub.add_parser("import", help="make a state document a stopped VM's state",
                       description="Check a state document (format version, guest ABI against the config, "
                                   "each handler's part) and make it the VM's state: the daemon, started "
                                   "again, restores it when the VMM reconnects.  Refused while the daemon runs.")
    i.add_argument("vm", metavar="VM|CONFIG", help="a VM name (/etc/hvcproxyd/VM.yaml) or its config file")
    i.add_argument("file", type=Path, metavar="FILE", help="the state document (from `state export` or a migration)")


@subcommand("state", "export a VM's durable state, or import one into a stopped VM", _args)
def cmd_state(args: argparse.Namespace) -> int:
    try:
        config = _config(args.vm)
        if args.state_command == "export":
            _export(config, args.output)
        else:
            _import(config, args.file)
    except _Refused as err:
        print(f"hvcproxyd state {args.state_command}: {err}", file=sys.stderr)
        return 1
    return 0


def _config(vm: str) -> VmConfig:
    try:
        config = config_of(vm)
    except ConfigError as err:
        raise _Refused(f"{vm} has errors:\n{err}") from None
    if config is None:
        raise _Refused(f"no config for VM {vm!r} (give its config file)")
    if config.state is None:
        raise _Refused(f"{config.path} has no state: section, so VM {config.name!r} keeps no durable state")
    return config


def _loaded(config: VmConfig) -> tuple[VmService, Path]:
    """The VM service with the directory's state in it, as a restart would have it."""
    assert config.state is not None
    path = vm_dir(config.state.dir, config.name)
    if not path.is_dir():
        raise _Refused(f"{path} does not exist: VM {config.name!r} has no saved state")
    vm = VmService(config)
    try:
        found = load(path)
        vm.resume(found.doc, found.records)
    except (DurableError, state.StateError) as err:
        raise _Refused(str(err)) from None
    return vm, path


def _export(config: VmConfig, output: Path | None) -> None:
    vm, _path = _loaded(config)
    data = state.encode(vm.state_document()) + b"\n"
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        write_atomic(output, data)
    except OSError as err:
        raise _Refused(f"cannot write {output}: {err.strerror}") from None


def _import(config: VmConfig, file: Path) -> None:
    if _daemon_running(config):
        raise _Refused(f"VM {config.name!r}'s daemon is running (its control socket {config.control_socket} "
                       "answers); stop it first")
    try:
        doc = state.decode(file.read_bytes())
    except OSError as err:
        raise _Refused(f"cannot read {file}: {err.strerror}") from None
    except state.StateError as err:
        raise _Refused(f"{file}: {err}") from None
    assert config.state is not None
    path = vm_dir(config.state.dir, config.name)
    vm = VmService(config)
    try:
        prepare(path)
        gen = load(path).gen if (path / SNAPSHOT).exists() or any(path.glob("journal.*")) else 0
        vm.load_state(doc)
    except DurableError as err:
        raise _Refused(str(err)) from None
    except state.StateError as err:
        raise _Refused(f"{file} does not fit {config.path}: {err}") from None
    out = vm.durable_document()
    out["journal_gen"] = gen + 1  # the journals before it are not read again
    try:
        write_atomic(path / SNAPSHOT, state.encode(out))
    except OSError as err:
        raise _Refused(f"cannot write {path / SNAPSHOT}: {err.strerror}") from None
    for old in path.glob("journal.*"):
        old.unlink(missing_ok=True)
    print(f"hvcproxyd state import: {file} is now the state of VM {config.name!r} ({path})")


def _daemon_running(config: VmConfig) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(config.control_socket))
        except OSError:
            return False
    return True


__all__ = ["cmd_state"]
