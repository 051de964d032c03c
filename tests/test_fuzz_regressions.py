"""Every input a fuzz run ever crashed a target with (bench/fuzz/regressions/<target>/),
and every target's seeds, replayed through the same targets as ``python -m bench.fuzz``
runs them: each must now succeed or fail only as its interface documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz.targets import TARGETS, Target

REGRESSIONS = Path(__file__).resolve().parents[1] / "bench" / "fuzz" / "regressions"
CASES = sorted(REGRESSIONS.glob("*/*"))


def test_every_regression_names_a_target() -> None:
    assert {p.parent.name for p in CASES} <= set(TARGETS)


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.name[:18]}")
def test_crash_input_no_longer_crashes(case: Path) -> None:
    TARGETS[case.parent.name].check(case.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_pass_their_target(name: str) -> None:
    seeds = list(TARGETS[name].seeds())
    assert seeds
    for seed in seeds:
        TARGETS[name].run(seed)  # valid inputs: not even a documented error


def test_check_passes_documented_errors_and_raises_the_rest() -> None:
    """The harness itself: what the fuzzer would call a crash still reads as one."""
    def run(data: bytes) -> None:
        if data == b"documented":
            raise ValueError("refused as the interface says")
        raise KeyError(data)  # the first crash the fuzzer found was of this kind
    target = Target("demo", run, (ValueError,), lambda: iter(()))
    target.check(b"documented")
    with pytest.raises(KeyError):
        target.check(b"anything else")
