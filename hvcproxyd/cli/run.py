"""``hvcproxyd run`` and ``hvcproxyd check``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import ConfigError
from ..core.vmconfig import load_config
from ..errors import ExitCode
from ..ops.service import run_service
from ..rules.table import describe_table
from .registry import subcommand

# ----------------------------------------------------------------- run

def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="the VM's YAML config (e.g. /etc/hvcproxyd/vm1.yaml)")
    p.add_argument("--socket", help="listen here instead of the config's socket path")


@subcommand("run", "serve one VM until SIGTERM (SIGHUP reloads the config); exits 78 for a config error, "
                   "73/77 for a socket it cannot create or may not, 1 for anything a restart may fix", _run_args)
def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, socket=args.socket)
    except ConfigError as err:
        print(f"hvcproxyd: {args.config} has errors, not starting:\n{err}", file=sys.stderr)
        return ExitCode.CONFIG  # the unit does not restart it: a restart cannot fix the file
    except Exception as err:  # a bug of ours: one line, the traceback at DEBUG
        logging.getLogger("hvcproxyd").debug("loading %s", args.config, exc_info=True)
        print(f"hvcproxyd: internal error loading {args.config}, not starting: {type(err).__name__}: {err}",
              file=sys.stderr)
        return ExitCode.FAILURE
    for w in config.warnings:
        logging.getLogger("hvcproxyd").warning("%s", w)
    return run_service(config)


# ----------------------------------------------------------------- check

def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, nargs="+", help="one or more VM configs")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")


@subcommand("check", "validate configs and print the compiled rule table", _check_args)
def cmd_check(args: argparse.Namespace) -> int:
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
        except Exception as err:
            # A bug of ours, not a problem in the file: one line, the traceback only when asked for.
            print(f"{path}: internal error in hvcproxyd while loading it (a bug, please report it): "
                  f"{type(err).__name__}: {err}")
            logging.getLogger("hvcproxyd").debug("traceback of the internal error", exc_info=True)
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
