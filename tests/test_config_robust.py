"""A file that cannot be read as a config is a config error, never a crash (issue 15).

Each malformed input is tried three ways: ``load_config`` raises ConfigError with
file:line:column, ``hvcproxyd check`` prints that line and no traceback, and a
live reload is refused with the running config kept and the reason recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz.targets import TARGETS as FUZZ_TARGETS
from hvcproxyd.cli import main
from hvcproxyd.cli import run as run_mod
from hvcproxyd.cli.control import format_status
from hvcproxyd.config import ConfigError
from hvcproxyd.config.diagnostics import Section, shown
from hvcproxyd.config.source import MAX_DEPTH, LocMap, Mark
from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.handlers import Handler, Notes
from hvcproxyd.plugins import load_plugin
from hvcproxyd.server import daemon as daemon_mod
from hvcproxyd.unixsock import resolve_id

from .conftest import Serve

BASE = (b"vm: t\n"
        b"handlers:\n"
        b"  hello: {type: static, options: {regs: [0, 1]}}\n"
        b"rules:\n"
        b"  - {match: 0x82000001, action: hello}\n")


@dataclass(frozen=True)
class Bad:
    data: bytes
    line: int
    column: int
    key: str
    says: str


BAD = {
    "invalid-utf8": Bad(BASE.replace(b"vm: t\n", b"vm: t\n# caf\xe9\n"), 2, 6, "file", "is not UTF-8 text"),
    "complex-key": Bad(BASE + b"? [a, b]\n: 1\n", 6, 3, "yaml", "keys must be scalars"),
    "mapping-key": Bad(BASE + b"? {a: 1}\n: 1\n", 6, 3, "yaml", "keys must be scalars"),
    # The top-level mapping is level 1: the 64th list, at column 4 + 63, is one too many.
    "deep-nesting": Bad(BASE + b"x: " + b"[" * 200 + b"]" * 200 + b"\n", 6, 4 + MAX_DEPTH - 1, "yaml",
                        f"nested more than {MAX_DEPTH}"),
    "deep-block-nesting": Bad(BASE + b"".join(b"  " * i + b"a:\n" for i in range(100)), 6 + MAX_DEPTH,
                              2 * MAX_DEPTH + 1, "yaml", f"nested more than {MAX_DEPTH}"),
    "libyaml-nesting-limit": Bad(BASE + b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n", 6, 1003, "yaml",
                                 "nesting depth"),
    "huge-int": Bad(BASE + b"handler_timeout_ms: " + b"9" * 5000 + b"\n", 6, 21, "yaml", "integer too large"),
    "huge-hex-int": Bad(BASE + b"handler_timeout_ms: 0x" + b"f" * 5000 + b"\n", 6, 21, "yaml",
                        "integer too large"),
    "type-colon-x": Bad(BASE.replace(b"type: static", b"type: ':X'"), 3, 17, "handlers.hello.type",
                        "is not package.module:Class"),
    "nul-in-uid": Bad(BASE + b'vmm: {uid: "a\\0b"}\n', 6, 12, "vmm.uid", "control character"),
    "nul-in-gid": Bad(BASE + b'vmm: {gid: "a\\0b"}\n', 6, 12, "vmm.gid", "control character"),
    "control-char": Bad(BASE + b"x: caf\xc3\xa9\x01\n", 6, 8, "yaml", "U+0001 is not allowed"),
    "no-such-date": Bad(BASE + b"x: 2024-13-45\n", 6, 4, "yaml", "not a valid date"),
}
CASES = pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))


def expected_line(path: Path, bad: Bad) -> str:
    return f"{path}:{bad.line}:{bad.column}: error: {bad.key}: "


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "vm.yaml"
    path.write_bytes(data)
    return path


@CASES
def test_load_config_names_the_place(tmp_path: Path, bad: Bad) -> None:
    path = write(tmp_path, bad.data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    first = next(p for p in info.value.problems if not p.warning)
    assert (first.mark.line, first.mark.column, first.key) == (bad.line, bad.column, bad.key), first
    assert bad.says in first.message


@CASES
def test_check_prints_the_place_not_a_traceback(tmp_path: Path, bad: Bad, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, bad.data)
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert expected_line(path, bad) in out and bad.says in out
    assert "Traceback" not in out + err


@CASES
async def test_reload_refuses_and_keeps_the_running_config(tmp_path: Path, bad: Bad) -> None:
    path = write(tmp_path, BASE)
    running = load_config(path, socket=str(tmp_path / "vm.sock"))
    outcomes: list[daemon_mod.ReloadOutcome] = []
    daemon = daemon_mod.Daemon(running, daemon_mod.DaemonHooks(reloaded=[outcomes.append]))
    path.write_bytes(bad.data)
    assert await daemon.reload() is False
    assert daemon.config is running and daemon.vm.config is running and daemon.reloads_refused == 1
    (outcome,) = outcomes
    assert outcome.error is not None and outcome.new is None
    assert expected_line(path, bad) in outcome.error and bad.says in outcome.error


# ----------------------------------------------------------------- the layers, one by one

def test_integer_problem_formats_a_value_too_long_for_decimal() -> None:
    m = LocMap({"n": 1 << 20_000})
    m.mark, m.key_marks, m.value_marks = Mark("f", 1, 1), {"n": Mark("f", 1, 1)}, {"n": Mark("f", 1, 4)}
    s = Section(m, "", [])
    assert s.integer("n", default=None) is None
    assert "20001 bits" in s.problems[0].message
    assert len(shown(list(range(1000)))) <= 60


@pytest.mark.parametrize("name", [":X", "x:", ":", ".:X", "..:X", "a.:X", "os:", "os:.path", "a\0b:X", "1a:X"])
def test_load_plugin_refuses_malformed_names_with_lookuperror(name: str) -> None:
    with pytest.raises(LookupError, match=r"is not package\.module:Class"):
        load_plugin("hvcproxyd.handlers", name, object, "handler type")


def test_load_plugin_reports_a_module_that_fails_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_plugin_mod.py").write_text("raise RuntimeError('half-installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LookupError, match="importing it raised RuntimeError: half-installed"):
        load_plugin("hvcproxyd.handlers", "broken_plugin_mod:X", object, "handler type")


def test_resolve_id_does_not_raise_on_a_nul() -> None:
    assert resolve_id("a\0b", "user") is None and resolve_id("a\0b", "group") is None


# ----------------------------------------------------------------- bugs of ours

def boom(*args: object, **kwargs: object) -> VmConfig:
    raise RuntimeError("boom")


async def test_reload_survives_an_internal_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, BASE)
    running = load_config(path, socket=str(tmp_path / "vm.sock"))
    outcomes: list[daemon_mod.ReloadOutcome] = []
    daemon = daemon_mod.Daemon(running, daemon_mod.DaemonHooks(reloaded=[outcomes.append]))
    monkeypatch.setattr(daemon_mod, "load_config", boom)
    with caplog.at_level(logging.ERROR, logger="hvcproxyd.daemon"):
        assert await daemon.reload() is False
    assert daemon.config is running and daemon.reloads_refused == 1
    assert outcomes[0].error is not None
    assert "internal error" in outcomes[0].error and "RuntimeError: boom" in outcomes[0].error
    traced = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert traced and "internal error loading" in traced[0].getMessage()


class Fragile(Handler):
    """Refuses every snapshot it is given: a plugin that fails while a reload builds
    its new instance (loaded as ``tests.test_config_robust:Fragile``)."""

    def restore(self, data: dict[str, Any]) -> Notes:
        raise ValueError("this snapshot is not mine")


async def test_reload_survives_a_plugin_that_fails_to_start(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, b"vm: fr\nhandlers:\n  f: {type: 'tests.test_config_robust:Fragile'}\n"
                           b"rules:\n  - {match: 0x82000001, action: f}\n")
    running = load_config(path, socket=str(tmp_path / "vm.sock"))
    daemon = daemon_mod.Daemon(running)
    serving = daemon.vm.instances["f"]
    with caplog.at_level(logging.ERROR, logger="hvcproxyd.daemon"):
        assert await daemon.reload() is False
    # The new instance could not take the old one's state: nothing was swapped.
    assert daemon.config is running and daemon.vm.instances["f"] is serving and daemon.reloads_refused == 1
    assert any("failed to start" in r.getMessage() and "not mine" in r.getMessage() for r in caplog.records)


def test_check_reports_an_internal_error_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE)
    monkeypatch.setattr(run_mod, "load_config", boom)
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"{path}: internal error in hvcproxyd" in out and "RuntimeError: boom" in out
    assert "Traceback" not in out + err
    assert main(["--log-level", "DEBUG", "--log-format", "text", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "RuntimeError: boom" in out and "Traceback" in err


# ----------------------------------------------------------------- status shows why

async def test_status_shows_why_a_reload_was_refused(tmp_path: Path, serve: Serve) -> None:
    path = write(tmp_path, BASE)
    service = await serve.service(load_config(path, socket=str(tmp_path / "vm.sock")))
    bad = BAD["type-colon-x"]
    path.write_bytes(bad.data)
    assert await service.daemon.reload() is False
    st = service.status()
    last = st["reloads"]["last"]
    assert last["ok"] is False and st["reloads"]["refused"] == 1
    assert expected_line(path, bad) in last["error"]
    text = format_status(st)
    assert "REFUSED, running config kept" in text and expected_line(path, bad) in text
    await serve.stop(service.daemon)


# ----------------------------------------------------------------- any input at all

_TOKENS = [*"[]{}:,-?&*!|>#'\"\\%@` \t\n\r\x00\x01é0x9aZ._<", "vm", "rules", "handlers", "type", "match", "action",
           "vmm", "uid", ": ", "- ", "\n  ", "0x", "9" * 50, "!!int", "!!set", "<<", "\ud800"]
_YAMLISH = st.lists(st.sampled_from(_TOKENS), max_size=60).map("".join)


def _nested(leaves: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(inner, inner), max_size=4).map(
            lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"),
    ), max_leaves=30)


def _spliced(snippet: str, at: int) -> bytes:
    """The valid base with ``snippet`` inserted somewhere: reaches the layers past YAML."""
    text = BASE.decode()
    at %= len(text) + 1
    return (text[:at] + snippet + text[at:]).encode("utf-8", "surrogatepass")


def _loads_or_config_error(data: bytes) -> None:
    """The fuzzer's own config target (bench/fuzz): a config, or a ConfigError whose
    every problem names the file; anything else raises."""
    FUZZ_TARGETS["config"].check(data)


_FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_load_or_raise_config_error(data: bytes) -> None:
    _loads_or_config_error(data)


@_FUZZ
@given(st.one_of(_YAMLISH, _nested(_YAMLISH)), st.integers(min_value=0))
def test_random_yamlish_text_loads_or_raises_config_error(snippet: str, at: int) -> None:
    _loads_or_config_error(snippet.encode("utf-8", "surrogatepass"))
    _loads_or_config_error(_spliced(snippet, at))
    _loads_or_config_error(_spliced("\n" + snippet + "\n", at))


@_FUZZ
@given(_nested(st.sampled_from(["a", "1", "0x10", "null", "true", "hello", "[]", "{}", "'x'"])))
def test_random_nested_values_in_every_slot(value: str) -> None:
    for slot in (b"regs: [0, 1]", b"static", b"0x82000001", b"hello}", b"t\n"):
        _loads_or_config_error(BASE.replace(slot, value.encode() + (b"}" if slot == b"hello}" else b"")
                                            + (b"\n" if slot == b"t\n" else b""), 1))


