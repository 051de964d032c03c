"""``hvcproxyd`` command line: the parser is built from the subcommands that
:mod:`.run`, :mod:`.control`, :mod:`.memshare`, :mod:`.state` and :mod:`.demo` register."""

from __future__ import annotations

import argparse

from .. import __version__
from ..ops.logsetup import FORMATS
from ..ops.logsetup import configure as setup_logging
from . import control, demo, memshare, run, state  # noqa: F401  (each registers its subcommands)
from .registry import SUBCOMMANDS

# ----------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hvcproxyd", description="Answer a VM's forwarded SMCCC calls "
                                     "(HVC/SMC) in userspace, beside QEMU.")
    parser.add_argument("--version", action="version", version=f"hvcproxyd {__version__}")
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _fn) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        _everywhere_below(p)
    return parser


def _everywhere_below(p: argparse.ArgumentParser) -> None:
    """The global options, accepted after a subcommand too (`hvcproxyd run X
    --log-level DEBUG`, `hvcproxyd memshare ls vm1 --log-level DEBUG`): given
    there, they win; not given, the value from before the subcommand stands."""
    _global_options(p, top=False)
    for action in p._actions:  # argparse has no public walk of nested subcommands
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _everywhere_below(child)


def _global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every subcommand shares; below the top level they only override."""
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   default="INFO" if top else argparse.SUPPRESS,
                   help="log verbosity (DEBUG logs every call; default INFO)")
    p.add_argument("--log-format", choices=FORMATS, default="auto" if top else argparse.SUPPRESS,
                   help="journal: native journald records with HVC_* fields; text: one line per record; "
                        "auto (default): journal when stderr is the service's journal stream")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.log_level, args.log_format)
    return SUBCOMMANDS[args.command][2](args)


__all__ = ["build_parser", "main"]
