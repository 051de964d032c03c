#!/usr/bin/env python3
"""Write hvcproxyd's man pages, generated from its argparse parser
(``hvcproxyd.cli.build_parser()``): hvcproxyd(8) and one page per subcommand
(hvcproxyd-run(8), ..., hvcproxyd-demo(1)); memshare's actions are sections of
hvcproxyd-memshare(8).  Also hvcproxyd-reftee(1), the reference TEE's.

    python scripts/gen-manpages.py OUTDIR

Run it with an interpreter that can import hvcproxyd's dependencies (the
repo's .venv, or the package's build venv); the parser is always the checkout's.
The page date is SOURCE_DATE_EPOCH's (dpkg-buildpackage sets it from
debian/changelog), so a package build is reproducible.

Why not argparse-manpage (PyPI): it renders a whole parser tree as one page,
with nested subcommands inlined, and has no per-subcommand split nor the EXIT
STATUS, FILES and SEE ALSO sections below; this is less code than adapting it,
and no extra pinned build dependency.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# argparse wraps usage at $COLUMNS; one unwrapped line reads better as roff.
os.environ["COLUMNS"] = "10000"

from hvcproxyd import __version__  # noqa: E402
from hvcproxyd.cli import build_parser  # noqa: E402
from hvcproxyd.errors import ExitCode  # noqa: E402

PROG = "hvcproxyd"
# Section 1 for what any user may run without the daemon's sockets; 8 for the rest.
SECTIONS = {"demo": "1"}
DOC = "/usr/share/doc/hvcproxyd"

EXIT_STATUS = [
    (ExitCode.OK, "success"),
    (ExitCode.FAILURE, "anything a restart may fix: an internal error, a lost VMM, the watchdog"),
    (ExitCode.CANTCREAT, "a socket cannot be created (its directory, a file in the way, a missing group), "
                         "or the state directory cannot be created or written (read-only, full)"),
    (ExitCode.NOPERM, "permission denied on a socket or its directory"),
    (ExitCode.CONFIG, "the config is missing or has errors, or the saved state does not fit it"),
]

FILES = [
    ("/etc/hvcproxyd/VM.yaml", "the config of the VM named VM (hvcproxyd@VM.service serves it)"),
    ("/run/hvcproxyd/VM.sock", "the VMM socket QEMU connects to (the config's socket path)"),
    ("/run/hvcproxyd/VM.ctl", "the control socket that status, trace and memshare use"),
    ("/var/lib/hvcproxyd/VM/", "the VM's durable state with a state: section (snapshot.json, journal.N); "
                               "state export and import read and write it"),
    ("/usr/lib/systemd/system/hvcproxyd@.service", "the systemd unit, one instance per VM"),
]


def esc(text: str) -> str:
    """Text as roff: backslashes, minus signs (so they copy as ASCII), and a line
    that would start with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in ".'" else line for line in text.splitlines())


def synopsis(parser: argparse.ArgumentParser) -> str:
    """The usage line: the command in bold, options bold, metavars and operands italic."""
    usage = " ".join(parser.format_usage().removeprefix("usage:").split()).removeprefix(parser.prog)

    def one(m: re.Match[str]) -> str:
        word = m.group(0)
        if word.startswith("-"):
            return f"\\fB{esc(word)}\\fR"
        return f"\\fI{esc(word)}\\fR" if word.isupper() or (word.islower() and word.isalpha()) else esc(word)
    return f"\\fB{esc(parser.prog)}\\fR" + re.sub(r"[^\s\[\]{}(),|.]+", one, usage)


def help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split()) if action.help else ""


def invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        name = action.metavar if isinstance(action.metavar, str) else action.dest
        return f"\\fI{esc(name)}\\fR"
    metavar = ""
    if action.nargs != 0:
        if action.choices is not None and action.metavar is None:
            metavar = "{" + ",".join(map(str, action.choices)) + "}"
        else:
            metavar = " ".join(action.metavar) if isinstance(action.metavar, tuple) else \
                action.metavar or action.dest.upper()
    return ", ".join(f"\\fB{esc(o)}\\fR" + (f" \\fI{esc(metavar)}\\fR" if metavar else "")
                     for o in action.option_strings)


def subparsers_of(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    # argparse has no public walk of its subcommands.
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def arguments(parser: argparse.ArgumentParser, heading: str) -> list[str]:
    """An OPTIONS-style section: .TP per argument, positionals first."""
    out: list[str] = []
    actions = [a for a in parser._actions
               if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)]
    positionals = [a for a in actions if not a.option_strings]
    options = [a for a in actions if a.option_strings]
    for title, group in (("ARGUMENTS", positionals), ("OPTIONS", options)):
        if not group:
            continue
        out.append(f"{heading} {title}" if heading.startswith(".SS") else f".SH {title}")
        for action in group:
            out += [".TP", invocation(action), esc(help_of(parser, action))]
    return out


def page(name: str, section: str, summary: str, parser: argparse.ArgumentParser, *, date: str,
         extra: list[str], see_also: list[str]) -> str:
    lines = [
        f'.TH "{name.upper()}" "{section}" "{date}" "hvcproxyd {__version__}" "hvcproxyd manual"',
        ".SH NAME", f"{esc(name)} \\- {esc(summary)}",
        # No hyphenation, ragged right: names and paths must not break at a '-'.
        ".nh", ".ad l",
        ".SH SYNOPSIS", synopsis(parser),
    ]
    if parser.description:
        lines += [".SH DESCRIPTION", esc(parser.description)]
    lines += arguments(parser, ".SH")
    sub = subparsers_of(parser)
    if sub is not None and name != PROG:  # nested actions (memshare ls|watch): one section each
        lines.append(".SH ACTIONS")
        for action_name, child in sub.choices.items():
            lines += [f".SS {esc(action_name)}", synopsis(child)]
            if child.description:
                lines += [".PP", esc(child.description)]
            for action in child._actions:
                if action.help is argparse.SUPPRESS or action.dest in {"help", "log_level", "log_format"}:
                    continue
                lines += [".TP", invocation(action), esc(help_of(child, action))]
    lines += extra
    lines += [".SH SEE ALSO", ",\n".join(see_also),
              ".PP", f"{esc(DOC)}/operations.md, {esc(DOC)}/config.md"]
    return "\n".join(lines) + "\n"


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def reftee_parser() -> argparse.ArgumentParser:
    """hvcproxyd-reftee's parser, which its main() builds and parses at once:
    taken from the parse_args() call, so the page is the parser's, not a copy."""
    from hvcproxyd.handlers.tee_proxy import reftee

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> argparse.Namespace:
        raise _Captured(self)
    saved = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign,assignment]
    try:
        reftee.main([])
    except _Captured as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_args = saved  # type: ignore[method-assign]
    raise RuntimeError("hvcproxyd-reftee's main() parsed no arguments")


def first_clause(text: str) -> str:
    """The NAME line's summary: the help text up to its first ';' or '('."""
    return re.split(r"\s*[;(]", text, maxsplit=1)[0].strip()


def generate(outdir: Path) -> list[Path]:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    parser = build_parser()
    sub = subparsers_of(parser)
    assert sub is not None, "hvcproxyd's parser has no subcommands"
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    refs = {name: f"{PROG}-{name}({SECTIONS.get(name, '8')})" for name in sub.choices}
    exit_status = [".SH EXIT STATUS"]
    for code, text in EXIT_STATUS:
        exit_status += [".TP", f"\\fB{code}\\fR", esc(text)]
    files = [".SH FILES"]
    for path, text in FILES:
        files += [".TP", f"\\fI{esc(path)}\\fR", esc(text)]

    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write(name: str, section: str, text: str) -> None:
        path = outdir / f"{name}.{section}"
        path.write_text(text, encoding="utf-8")
        written.append(path)

    commands = [".SH COMMANDS"]
    for name in sorted(sub.choices):
        commands += [".TP", f"\\fB{esc(name)}\\fR", f"{esc(helps[name])}; see \\fB{esc(refs[name])}\\fR."]
    write(PROG, "8", page(PROG, "8", "SMCCC calls of a VM, answered in userspace beside QEMU", parser,
                          date=date, extra=commands + exit_status + files,
                          see_also=[f"\\fB{esc(r)}\\fR" for _, r in sorted(refs.items())] + ["\\fBsystemctl\\fR(1)"]))
    for name, child in sorted(sub.choices.items()):
        section = SECTIONS.get(name, "8")
        with_files = {"status", "trace", "memshare", "state"}
        extra = (exit_status + files) if name == "run" else files if name in with_files else []
        see = [f"\\fB{PROG}\\fR(8)"] + [f"\\fB{esc(r)}\\fR" for n, r in sorted(refs.items()) if n != name]
        write(f"{PROG}-{name}", section,
              page(f"{PROG}-{name}", section, first_clause(helps[name]), child, date=date, extra=extra, see_also=see))
    tee = reftee_parser()
    write("hvcproxyd-reftee", "1",
          page("hvcproxyd-reftee", "1", tee.description or "", tee, date=date, extra=[],
               see_also=[f"\\fB{PROG}\\fR(8)", "\\fBhvcproxyd-demo\\fR(1)"]))
    return written


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Write hvcproxyd's man pages (roff) into OUTDIR.")
    ap.add_argument("outdir", type=Path)
    args = ap.parse_args(argv)
    for path in generate(args.outdir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
