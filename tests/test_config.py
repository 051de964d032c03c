"""Config validation: each rule, with its message and its file:line:column."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from hvcproxyd.cli import main
from hvcproxyd.config import ConfigError, Problem
from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.rules.targets import ToHandler
from hvcproxyd.server import daemon as daemon_mod
from hvcproxyd.wire import FilterAction, FilterRange

Make = Callable[[str], VmConfig]
HEAD = """\
vm: t
handlers:
  id6: {type: discovery, options: {uid: 28b46fb6-2ec5-11e9-a9ca-4b564d003a74}}
  hello: {type: static, options: {regs: [0, 1]}}
  probe: {type: log}
rules:
"""


def problems(make: Make, text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        make(text)
    return info.value.problems


def only(make: Make, text: str) -> Problem:
    found = [p for p in problems(make, text) if not p.warning]
    assert len(found) == 1, found
    return found[0]


def test_valid_config_compiles_to_table_and_filter(make_config: Make) -> None:
    config = make_config(HEAD + """\
  - {match: 0x82000001, action: hello}
  - {match: trng, action: deny}
  - {match: psci, action: kvm}
""")
    assert config.name == "t"
    assert config.table.filter_ranges() == (
        FilterRange(0x8200_0001, 1, FilterAction.FORWARD),
        FilterRange(0x8400_0050, 0x10, FilterAction.DENY),
        FilterRange(0xC400_0050, 0x10, FilterAction.DENY),
    )


def test_overlap_on_the_same_conduit_is_refused(make_config: Make) -> None:
    p = only(make_config, HEAD + """\
  - {match: [0x82000000, 0x820000FF], action: hello}
  - {match: 0x82000010, conduit: hvc, action: probe}
""")
    assert (p.mark.line, p.key) == (8, "rules[1].match")
    assert "overlaps rules[0]" in p.message and "0x82000010" in p.message and "hvc" in p.message


def test_different_conduits_or_disjoint_vcpus_do_not_overlap(make_config: Make) -> None:
    config = make_config(HEAD + """\
  - {match: 0x82000010, conduit: hvc, action: hello}
  - {match: 0x82000010, conduit: smc, action: probe}
  - {match: 0x82000011, vcpus: [0, 1], action: hello}
  - {match: 0x82000011, vcpus: [2], action: probe}
""")
    def name(fid: int, conduit: int, vcpu: int) -> str | None:
        target = config.table.lookup(fid, conduit, vcpu)
        return None if target is None else target.name

    assert (name(0x8200_0010, 0, 0), name(0x8200_0010, 1, 0)) == ("hello", "probe")
    assert (name(0x8200_0011, 0, 1), name(0x8200_0011, 0, 2), name(0x8200_0011, 0, 3)) == ("hello", "probe", None)


def test_overlapping_vcpu_sets_are_refused(make_config: Make) -> None:
    p = only(make_config, HEAD + """\
  - {match: 0x82000011, vcpus: [0, 1], action: hello}
  - {match: 0x82000011, vcpus: [1, 2], action: probe}
""")
    assert "overlaps rules[0]" in p.message


@pytest.mark.parametrize("match", ["0x80000000", "[0xC0000000, 0xC000FFFF]", "0x80008000"])
def test_arm_architecture_range_is_never_forwarded(make_config: Make, match: str) -> None:
    p = only(make_config, HEAD + f"  - {{match: {match}, action: hello}}\n")
    assert "Arm architecture range" in p.message and "only valid action here is kvm" in p.message
    assert p.mark.line == 7


def test_arm_architecture_range_may_be_left_to_kvm(make_config: Make) -> None:
    config = make_config(HEAD + "  - {match: 0x80000000, action: kvm}\n")
    assert config.table.filter_ranges() == ()


def test_half_owned_vendor_range_is_refused(make_config: Make) -> None:
    p = only(make_config, HEAD + "  - {match: 0xC6000003, action: hello}\n")
    assert p.key == "rules[0].match"
    assert "owner 6 has an ABI identity" in p.message and "must forward all of it" in p.message


def test_whole_vendor_range_with_its_identity_is_accepted(make_config: Make) -> None:
    config = make_config(HEAD + """\
  - {match: 0xC6000003, action: hello}
  - {match: [0x86000000, 0x8600FEFF], action: id6}
  - {match: [0x8600FF00, 0x8600FFFF], action: id6}
  - {match: [0xC6000000, 0xC6000002], action: deny}
  - {match: [0xC6000004, 0xC600FFFF], action: deny}
""")
    assert config.table.lookup(0x8600_FF01, 1, 3) == ToHandler("id6")


def test_vendor_range_whose_uid_goes_to_a_non_discovery_handler(make_config: Make) -> None:
    p = only(make_config, HEAD + "  - {match: kvm-vendor, action: probe}\n")
    assert "does not answer call-count/UID/revision" in p.message


def test_identity_queries_split_across_conduits_are_refused(make_config: Make) -> None:
    p = only(make_config, HEAD + """\
  - {match: kvm-vendor, conduit: hvc, action: id6}
  - {match: kvm-vendor, conduit: smc, action: hello}
""")
    assert "must all go to one handler instance" in p.message


def test_half_owned_trusted_os_range_is_refused(make_config: Make) -> None:
    p = only(make_config, HEAD + "  - {match: [0xB2000000, 0xB200FFFF], action: hello}\n")
    assert "owner 50 has an ABI identity" in p.message
    assert "0x32000000" in p.message  # the yielding range is part of the owner's range


def test_vendor_range_limited_to_some_vcpus_is_refused(make_config: Make) -> None:
    p = only(make_config, HEAD + "  - {match: kvm-vendor, vcpus: [0], action: id6}\n")
    assert "limited to some vCPUs" in p.message


def test_pinned_version_a_handler_cannot_provide(make_config: Make) -> None:
    p = only(make_config, """\
vm: t
versions: {psci: "1.1"}
handlers:
  old: {type: "tests.plugins:OldPsci"}
rules:
  - {match: psci, action: old}
""")
    assert (p.key, p.mark.line) == ("handlers.old", 4)
    assert "pins 1.1" in p.message and "offers: 0.2" in p.message


def test_mixing_kvm_with_forwarding_on_one_function_is_refused(make_config: Make) -> None:
    p = only(make_config, HEAD + """\
  - {match: 0x82000001, conduit: hvc, action: kvm}
  - {match: 0x82000001, conduit: smc, action: hello}
""")
    assert "cannot tell conduits" in p.message


def test_rule_range_must_stay_in_one_block(make_config: Make) -> None:
    p = only(make_config, HEAD + "  - {match: [0x82000000, 0x8201FFFF], action: hello}\n")
    assert "within one 64K call block" in p.message


def test_yielding_call_of_a_non_trusted_owner_is_refused(make_config: Make) -> None:
    p = only(make_config, HEAD + "  - {match: 0x02000001, action: hello}\n")
    assert "only trusted apps and OSes" in p.message


@pytest.mark.parametrize("rule, key, text", [
    ("{match: 0x82000001, action: nobody}", "rules[0].action", "valid actions: kvm, deny, id6, hello, probe"),
    ("{match: psi, action: hello}", "rules[0].match", "unknown service 'psi'"),
    ("{match: 0x82000001, conduit: both, action: hello}", "rules[0].conduit", "one of: hvc, smc, any"),
    ("{match: 0x82000001, action: hello, when: always}", "rules[0].when", "valid keys: match, except, conduit"),
    ("{match: 0x82000001, vcpus: [0, x], action: hello}", "rules[0].vcpus", "list of 1.."),
    ("{match: [1, 2, 3], action: hello}", "rules[0].match", "service name, a function ID"),
])
def test_rule_field_errors(make_config: Make, rule: str, key: str, text: str) -> None:
    p = only(make_config, HEAD + f"  - {rule}\n")
    assert p.key == key and text in p.message and p.mark.line == 7, p


def test_every_problem_is_reported_at_once(make_config: Make) -> None:
    found = problems(make_config, """\
vm: t
colour: blue
handler_timeout_ms: -5
handlers:
  a: {type: static, options: {regs: "zero"}}
  b: {type: nosuch}
rules:
  - {match: 0x82000001, action: a}
""")
    keys = [(p.mark.line, p.key) for p in found if not p.warning]
    assert keys == [(2, "colour"), (3, "handler_timeout_ms"), (5, "handlers.a.options.regs"), (6, "handlers.b.type")]
    errors = [p for p in found if not p.warning]
    assert "no handler type 'nosuch'; installed:" in errors[3].message and "static" in errors[3].message
    assert "vm.yaml:2:1: error: colour: unknown key; valid keys: vm, socket, qmp, handler_timeout_ms" in str(errors[0])
    assert "must be an integer in 1..600000, not -5" in errors[1].message


def test_yaml_syntax_error_names_the_position(make_config: Make) -> None:
    p = only(make_config, "vm: t\nrules:\n  - {match: 1, action: [\n")
    assert p.key == "yaml" and p.mark.line >= 3


def test_duplicate_key_names_both_positions(make_config: Make) -> None:
    p = only(make_config, "vm: t\nvm: u\nrules: []\n")
    assert p.mark.line == 2 and "appears twice (first at line 1)" in p.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_check_command(write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    good = write_config(HEAD + "  - {match: 0x82000001, action: hello}\n", "good.yaml")
    bad = write_config(HEAD + "  - {match: 0x80000000, action: hello}\n  - {match: 0x1, action: x}\n", "bad.yaml")
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "0x82000001" in out and "FORWARD" in out
    assert main(["check", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.yaml: 2 problem(s)" in out and "bad.yaml:7:" in out and "bad.yaml:8:" in out


def test_shipped_configs_pass_check() -> None:
    configs = sorted((Path(__file__).parent.parent / "config").glob("*.yaml"))
    assert configs, "config/ holds the example configs"
    for path in configs:
        load_config(path)


async def test_reload_compiles_off_the_event_loop(write_config: Callable[..., Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGHUP's load (parse + compile) runs in a worker thread while the loop keeps
    running tasks, and the new config is swapped in whole."""
    rules = "".join(f"  - {{match: {0x8200_1000 + i:#x}, action: hello}}\n" for i in range(200))
    path = write_config(HEAD + rules)
    old = load_config(path, socket=str(tmp_path / "vm.sock"))
    daemon = daemon_mod.Daemon(old)
    write_config(HEAD.replace("regs: [0, 1]", "regs: [0, 2]") + rules)  # same filter: live-compatible
    loaded: list[VmConfig] = []
    threads: list[threading.Thread] = []
    loop_ran = trio.Event()

    def load_in_worker(*args: Any, **kwargs: Any) -> VmConfig:
        threads.append(threading.current_thread())
        # Returns only once the event loop has run the callback: the loop is not blocked
        # while the config loads (on the loop's own thread this raises RuntimeError).
        trio.from_thread.run_sync(loop_ran.set)
        loaded.append(load_config(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(daemon_mod, "load_config", load_in_worker)
    assert await daemon.reload()
    assert loop_ran.is_set()
    assert threads and threads[0] is not threading.main_thread()
    assert daemon.config is loaded[0] and daemon.vm.config is loaded[0] and daemon.config is not old
    assert daemon.config.handlers["hello"].options != old.handlers["hello"].options
    assert len(daemon.config.rules) == 200 and daemon.reloads == 1


@pytest.mark.parametrize(("socket", "message", "warning"), [
    ("/etc/passwd/vm.sock", "/etc/passwd exists and is not a directory", False),
    ("relative/vm.sock", "is relative; give an absolute path", False),
    ("/run/" + "x" * 120 + ".sock", "a UNIX socket path may have at most 107", False),
    ("/run/hvcproxy-typo/vm.sock", "does not exist; the daemon would create it", True),
])
def test_a_socket_path_that_cannot_work_is_caught_by_check(tmp_path: Path, socket: str, message: str,
                                                           warning: bool) -> None:
    path = tmp_path / "vm.yaml"
    path.write_text(f"vm: a\nsocket: {socket}\nhandlers:\n  p:\n    type: psci\n"
                    "rules:\n  - match: psci\n    action: p\n")
    if warning:
        (problem,) = [w for w in load_config(path).warnings if "socket" in w.key]
    else:
        with pytest.raises(ConfigError) as err:
            load_config(path)
        (problem,) = err.value.problems
    assert problem.key == "socket" and message in problem.message and problem.mark.line == 2


def test_a_handler_with_an_unknown_type_is_one_problem_not_two(tmp_path: Path) -> None:
    path = tmp_path / "vm.yaml"
    path.write_text("vm: a\nhandlers:\n  p:\n    type: nosuch\nrules:\n  - match: psci\n    action: p\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert [p.key for p in err.value.problems] == ["handlers.p.type"]  # not also "rules[0].action: no handler p"
