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


__all__ = ["SUBCOMMANDS", "Subcommand", "subcommand"]
