"""``hvcproxyd`` command line: run, check, demo (more subcommands register themselves
through :data:`SUBCOMMANDS`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .config import ConfigError, load_config

#: name -> (help, add_arguments, run); run returns the exit code.
Subcommand = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]
               ) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        SUBCOMMANDS[name] = (help_text, add_arguments, fn)
        return fn
    return register


def setup_logging(level: str, fmt: str = "auto") -> None:
    from .logsetup import configure

    configure(level, fmt)


# ----------------------------------------------------------------- run

def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="the VM's YAML config (e.g. /etc/hvcproxyd/vm1.yaml)")
    p.add_argument("--socket", help="listen here instead of the config's socket path")


@subcommand("run", "serve one VM until SIGTERM (SIGHUP reloads the config)", _run_args)
def cmd_run(args: argparse.Namespace) -> int:
    from .managed import run_service

    try:
        config = load_config(args.config, socket=args.socket)
    except ConfigError as err:
        print(f"hvcproxyd: {args.config} has errors, not starting:\n{err}", file=sys.stderr)
        return 1
    for w in config.warnings:
        logging.getLogger("hvcproxyd").warning("%s", w)
    return run_service(config)


# ----------------------------------------------------------------- check

def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, nargs="+", help="one or more VM configs")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")


@subcommand("check", "validate configs and print the compiled rule table", _check_args)
def cmd_check(args: argparse.Namespace) -> int:
    from .rules import describe_table

    status = 0
    for path in args.config:
        try:
            config = load_config(path)
        except ConfigError as err:
            print(f"{path}: {len(err.problems)} problem(s)")
            for p in err.problems:
                print(f"  {p}")
            status = 1
            continue
        for w in config.warnings:
            print(f"  {w}")
        if args.quiet:
            continue
        print(f"{path}: OK — VM {config.name!r}, socket {config.socket}, {len(config.handlers)} handler(s), "
              f"{len(config.rules)} rule(s)")
        print("  rule table:")
        for line in describe_table(config.table):
            print(f"    {line}")
        print("  filter sent to the VMM:")
        for r in config.table.filter_ranges():
            print(f"    {r.base:#010x}..{r.last:#010x} {r.action.name}")
    return status


# ----------------------------------------------------------------- demo

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="config to serve (default: config/demo.yaml)")
    p.add_argument("--vcpus", type=int, default=4, help="simulated vCPUs (default 4)")
    p.add_argument("--qemu", action="store_true", help="drive the patched QEMU and a test guest instead of the "
                                                       "simulator (needs integration/setup.sh to have run)")


@subcommand("demo", "serve config/demo.yaml and drive it with the built-in VMM simulator", _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# ----------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="hvcproxyd", description="Answer a VM's forwarded SMCCC calls "
                                     "(HVC/SMC) in userspace, beside QEMU.")
    parser.add_argument("--version", action="version", version=f"hvcproxyd {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log verbosity (DEBUG logs every call)")
    parser.add_argument("--log-format", default="auto", choices=["auto", "text", "journal"],
                        help="journal: native journald records with HVC_* fields; text: one line per record; "
                             "auto (default): journal when stderr is the service's journal stream")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _fn) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
    return parser


def _load_plugins() -> None:
    """Modules that add subcommands (trace, status, memshare ...) register on import."""
    import importlib

    for mod in ("hvcproxyd.control_cli", "hvcproxyd.memshare_cli"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.log_level, args.log_format)
    return SUBCOMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
