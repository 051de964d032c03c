"""One target under atheris (libFuzzer), in its own process: ``python -m
bench.fuzz.worker TARGET [libFuzzer options] CORPUS...``.  The runner
(``python -m bench.fuzz``) starts one per target and reads its final stats."""

from __future__ import annotations

import logging
import sys

try:
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # no stubs
except ImportError:
    sys.exit("bench.fuzz needs atheris (pip install 'atheris>=2.3'; ./dev installs it on x86_64)")

with atheris.instrument_imports(include=["hvcproxyd"]):
    from bench.fuzz.targets import TARGETS


def main() -> None:
    target = TARGETS[sys.argv[1]]
    logging.getLogger("hvcproxyd").setLevel(logging.CRITICAL)  # nothing logged per input
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target.check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
