"""The subcommand table: each CLI module registers its commands here with
:func:`subcommand`, and :mod:`hvcproxyd.cli` builds the parser from it."""

from __future__ import annotations

import argparse
from collections.abc import Callable

#: name -> (help, add_arguments, run); run returns the exit code.
Subcommand = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]
               ) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        SUBCOMMANDS[name] = (help_text, add_arguments, fn)
        return fn
    return register


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number (decimal or 0x hex) in [lo, hi], with an
    error that says what would be valid instead of a list of every choice."""
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            span = f"{lo}..{hi}" if hi is not None else f"{lo} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {span}")
        return value
    parse.__name__ = "number"  # what argparse names in "invalid number value"
    return parse


__all__ = ["SUBCOMMANDS", "Subcommand", "int_in", "subcommand"]
