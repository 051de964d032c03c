"""What a user means by "VM" on the command line: a config file's path, or a
VM's name (whose config, if any, is /etc/hvcproxyd/VM.yaml).  Every subcommand
that talks to a running daemon resolves its sockets through here."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from ..core.vmconfig import VmConfig, load_config

ETC_DIR = Path("/etc/hvcproxyd")


def names_a_file(vm: str) -> bool:
    return vm.endswith((".yaml", ".yml")) or "/" in vm


def config_of(vm: str) -> VmConfig | None:
    """The VM's config.  For a path, its errors raise ConfigError; for a name, a
    config with errors is passed over (the running daemon may have started from
    an older, valid version of it) and None means "use the defaults"."""
    if names_a_file(vm):
        return load_config(vm)
    etc = ETC_DIR / f"{vm}.yaml"
    if etc.is_file():
        try:
            return load_config(etc)
        except ConfigError:
            return None
    return None


def vm_name(vm: str) -> str:
    """The VM's name: the config's ``vm`` for a path, else the word itself."""
    config = config_of(vm) if names_a_file(vm) else None
    return config.name if config is not None else vm


__all__ = ["ETC_DIR", "config_of", "names_a_file", "vm_name"]
