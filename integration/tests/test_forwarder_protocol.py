"""QEMU's hvc-forwarder against a handler scripted frame by frame
(scripted_handler.py): the handshake's contents, register passing, guest
memory access (frames and memfd), replay of a call in flight across a
reconnect, a changed filter on reconnect, the call timeout, and a refusal.

The guest is integration/guests/calls-hvc.elf on -M virt (EL1, HVC).  It makes
these forwarded calls, in order: PSCI_VERSION, PSCI_FEATURES, STATIC
(0xC2000001), STATIC with the SVE hint (0xC2010001), UNKNOWN (0xC20000FF),
AFFINITY_INFO, PSCI_VERSION again (with immediate 1), SYSTEM_OFF; SMCCC_VERSION,
ARCH_FEATURES and the denied call are answered by QEMU.
"""

from __future__ import annotations

import errno
import mmap
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu_harness import Daemon, Qemu, StartQemu, parse_calls
from scripted_handler import ScriptedHandler, Session

from hvcproxyd import wire

FWD, DENY = wire.FilterAction.FORWARD, wire.FilterAction.DENY
RANGES = (
    wire.FilterRange(0x84000000, 0x20, FWD),
    wire.FilterRange(0xC2000000, 0x100, FWD),
    wire.FilterRange(0xC3000000, 0x100, DENY),
    wire.FilterRange(0xC4000000, 0x20, FWD),
)
PSCI_VERSION, PSCI_FEATURES, AFFINITY_INFO64, SYSTEM_OFF = 0x84000000, 0x8400000A, 0xC4000004, 0x84000008
STATIC, STATIC_HINT, UNKNOWN = 0xC2000001, 0xC2010001, 0xC20000FF
U64 = (1 << 64) - 1
NOT_SUPPORTED = U64
RAM_BASE, RAM_SIZE = 0x40000000, 256 << 20
GUEST_LOAD = 0x40200000
FLASH_BANKS = (wire.RamRegion(0, 64 << 20, rom=True), wire.RamRegion(64 << 20, 64 << 20, rom=True))


ANSWERS: dict[int, tuple[int, ...]] = {
    PSCI_VERSION: (0x10001, 0, 0, 0),
    PSCI_FEATURES: (0, 0, 0, 0),
    STATIC: (0, 0x11, 0x22, 0x33),
    STATIC_HINT: (0, 0x11, 0x22, 0x33),
    UNKNOWN: (NOT_SUPPORTED, 0, 0, 0),
    AFFINITY_INFO64: (0, 0, 0, 0),
}


@pytest.fixture
def handler(workdir: Path) -> Iterator[ScriptedHandler]:
    h = ScriptedHandler(workdir / "h.sock")
    yield h
    h.close()


def answer(s: Session, call: wire.Call) -> None:
    if call.func_id == SYSTEM_OFF:
        s.send(wire.Reply(call.seq, call.vcpu, (0,), (wire.Effect(wire.EffectKind.SYSTEM_OFF, call.vcpu),)))
    else:
        s.send(wire.Reply(call.seq, call.vcpu, ANSWERS[call.func_id]))


def serve_until_closed(s: Session) -> list[wire.Event]:
    """Answer calls as ANSWERS says until QEMU closes the connection; return what else arrived."""
    seen: list[wire.Event] = []
    while (ev := s.next_event()) is not None:
        if isinstance(ev, wire.Call):
            answer(s, ev)
        else:
            seen.append(ev)
    return seen


def expect_call(s: Session, func_id: int) -> wire.Call:
    c = s.expect(wire.Call)
    assert c.func_id == func_id, f"expected call {func_id:#x}, got {c}"
    return c


def run_calls_guest(start_qemu: StartQemu, guests: Path, handler: ScriptedHandler, *extra: str,
                    **kw: object) -> Qemu:
    return start_qemu("-kernel", str(guests / "calls-hvc.elf"), *extra, forwarder=handler.path, **kw)


def finish(q: Qemu, s: Session) -> tuple[str, list[wire.Event]]:
    seen = serve_until_closed(s)
    rc = q.wait(60)
    out = q.output()
    assert rc == 0, f"{out}\n--- stderr ---\n{q.messages()}"
    return out, seen


def elf_first_segment(path: Path, n: int) -> bytes:
    """The first n bytes of the first PT_LOAD segment of a little-endian ELF64."""
    data = path.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset = struct.unpack_from("<IIQ", data, phoff + i * phentsize)
        if p_type == 1:
            return data[p_offset:p_offset + n]
    raise AssertionError("no PT_LOAD segment")


def test_handshake_registers_and_guest_memory(start_qemu: StartQemu, guests: Path,
                                              handler: ScriptedHandler, line: bool) -> None:
    q = run_calls_guest(start_qemu, guests, handler, smp=2, forwarder_opts=",vm-name=scripted-vm", line=line)
    s = handler.accept()
    hello = s.handshake(RANGES)
    assert hello.name == "scripted-vm"
    assert hello.accel is wire.Accel.TCG
    assert hello.conduit is wire.PsciConduit.HVC
    assert not hello.reconnect and hello.filter_in_force == ()
    assert hello.features & wire.FEATURE_EFFECT_DONE and not hello.features & wire.FEATURE_MEMFD
    assert not hello.features & wire.FEATURE_INTERRUPT  # -M virt's default GICv2 under TCG: no INTERRUPT
    assert 32 <= hello.ipa_bits <= 52
    assert [(v.index, v.mpidr, v.powered_on, v.aarch32) for v in hello.vcpus] == [(0, 0, True, False),
                                                                                   (1, 1, False, False)]
    # -M virt's two 64 MiB flash banks are executable, not RAM: ROM regions.
    assert hello.regions == (*FLASH_BANKS, wire.RamRegion(RAM_BASE, RAM_SIZE, 0, -1))
    # Every effect but SYSTEM_SUSPEND, which QEMU cannot carry out: a handler must not offer it.
    assert hello.performs == frozenset(wire.EffectKind) - {wire.EffectKind.SYSTEM_SUSPEND}, hello.effects
    assert hello.max_version == 2

    c = expect_call(s, PSCI_VERSION)
    assert c.vcpu == 0 and c.flags == (1 << wire.CALL_EL_SHIFT)  # HVC from EL1, AArch64
    answer(s, c)
    c = expect_call(s, PSCI_FEATURES)
    assert c.args[0] == 0xC4000003
    answer(s, c)

    c = expect_call(s, STATIC)
    assert c.args == (0x1111, 0x2222, 0x3333) + (0,) * 14
    # Guest memory while the call is in flight: QEMU's IOThread serves it.
    r = s.mem_read(1, GUEST_LOAD, 64)
    assert r.status == 0 and r.data == elf_first_segment(guests / "calls-hvc.elf", 64)
    assert s.mem_write(2, RAM_BASE + 0x7000000, b"hvcproxyd was here").status == 0
    assert s.mem_read(3, RAM_BASE + 0x7000000, 18).data == b"hvcproxyd was here"
    assert s.mem_read(4, 0x0, 16).status == -errno.EFAULT  # flash, not RAM
    assert s.mem_read(5, RAM_BASE + RAM_SIZE - 8, 16).status == -errno.EFAULT  # runs off the end of RAM
    assert s.mem_write(6, RAM_BASE - 4, b"12345678").status == -errno.EFAULT
    # Five registers: x0..x4 are written, the guest prints x0..x3.
    s.send(wire.Reply(c.seq, c.vcpu, (0, 0xA1, 0xA2, 0xA3, 0xA4)))

    c = expect_call(s, STATIC_HINT)  # passed on as the guest wrote it, hint bit included
    answer(s, c)
    c = expect_call(s, UNKNOWN)
    # One register: only x0 changes, x1.. keep the guest's values.
    s.send(wire.Reply(c.seq, c.vcpu, (NOT_SUPPORTED,)))

    out, seen = finish(q, s)
    calls = parse_calls(out)
    assert calls["STATIC"] == (0, 0xA1, 0xA2, 0xA3), out
    assert calls["UNKNOWN"] == (NOT_SUPPORTED, 0x1111, 0, 0), out
    assert calls["DENIED"][0] == NOT_SUPPORTED, out
    assert calls["SMCCC_VERSION"][0] == 0x10002, out
    # SYSTEM_OFF: confirmed, then the VM tells it is going away.
    assert any(isinstance(e, wire.EffectDone) and e.status == 0 for e in seen), seen
    assert any(isinstance(e, wire.VmEvent) and e.kind is wire.EventKind.VM_SHUTDOWN for e in seen), seen


def test_memfd_ram_is_passed_as_fd(start_qemu: StartQemu, guests: Path, handler: ScriptedHandler) -> None:
    q = run_calls_guest(start_qemu, guests, handler,
                        "-object", f"memory-backend-memfd,id=mem,size={RAM_SIZE >> 20}M,share=on",
                        machine="virt,memory-backend=mem", memory=f"{RAM_SIZE >> 20}M")
    s = handler.accept()
    hello = s.handshake(RANGES)
    assert hello.features & wire.FEATURE_MEMFD
    assert len(hello.fds) == 1
    assert hello.regions == (*FLASH_BANKS, wire.RamRegion(RAM_BASE, RAM_SIZE, 0, 0))
    with mmap.mmap(hello.fds[0], RAM_SIZE, mmap.MAP_SHARED) as ram:
        c = expect_call(s, PSCI_VERSION)
        off = GUEST_LOAD - RAM_BASE
        assert ram[off:off + 64] == s.mem_read(1, GUEST_LOAD, 64).data
        ram[0x100000:0x100008] = b"via-mmap"
        assert s.mem_read(2, RAM_BASE + 0x100000, 8).data == b"via-mmap"
        answer(s, c)
    finish(q, s)


def test_call_in_flight_is_replayed_after_reconnect(start_qemu: StartQemu, guests: Path,
                                                    handler: ScriptedHandler, line: bool) -> None:
    q = run_calls_guest(start_qemu, guests, handler, line=line)
    s = handler.accept()
    s.handshake(RANGES)
    answer(s, expect_call(s, PSCI_VERSION))
    answer(s, expect_call(s, PSCI_FEATURES))
    c = expect_call(s, STATIC)
    s.close()  # the handler dies with the call in flight

    s2 = handler.accept()
    hello = s2.expect(wire.Hello)
    assert hello.reconnect
    assert hello.filter_in_force == RANGES
    assert [v.powered_on for v in hello.vcpus] == [True]
    s2.send(wire.Welcome(version=1, ranges=RANGES))
    assert s2.expect(wire.FilterStatus).status == 0
    again = expect_call(s2, STATIC)
    assert (again.seq, again.vcpu, again.args, again.flags) == (c.seq, c.vcpu, c.args, c.flags)
    s2.send(wire.Reply(again.seq, again.vcpu, (0, 0x77, 0x88, 0x99)))
    out, _ = finish(q, s2)
    assert parse_calls(out)["STATIC"] == (0, 0x77, 0x88, 0x99), out
    msgs = q.messages()
    assert "lost the connection to the handler" in msgs and "reconnected to the handler" in msgs, msgs


def test_changed_filter_on_reconnect_is_refused(start_qemu: StartQemu, guests: Path,
                                                handler: ScriptedHandler, line: bool) -> None:
    q = run_calls_guest(start_qemu, guests, handler, line=line)
    s = handler.accept()
    s.handshake(RANGES)
    c = expect_call(s, PSCI_VERSION)
    s.close()

    s2 = handler.accept()
    assert s2.expect(wire.Hello).reconnect
    changed = (*RANGES[:2], wire.FilterRange(0xC3000000, 0x100, FWD), RANGES[3])
    s2.send(wire.Welcome(version=1, ranges=changed))
    status = s2.expect(wire.FilterStatus)
    assert status.status == -errno.EBUSY and status.failed_index == 2, status
    s2.send(wire.Error(wire.ErrorCode.FILTER_REJECTED, "test: filter differs"))
    s2.close()

    s3 = handler.accept()
    s3.handshake(RANGES)
    again = expect_call(s3, PSCI_VERSION)
    assert again.seq == c.seq
    answer(s3, again)
    finish(q, s3)
    assert "changed the filter on reconnect" in q.messages(), q.messages()


def test_call_timeout_gives_not_supported(start_qemu: StartQemu, guests: Path,
                                          handler: ScriptedHandler) -> None:
    q = run_calls_guest(start_qemu, guests, handler, forwarder_opts=",timeout-ms=300")
    s = handler.accept()
    s.handshake(RANGES)
    answer(s, expect_call(s, PSCI_VERSION))
    answer(s, expect_call(s, PSCI_FEATURES))
    late = expect_call(s, STATIC)  # never answered in time
    nxt = expect_call(s, STATIC_HINT)  # the guest moved on after timeout-ms
    s.send(wire.Reply(late.seq, late.vcpu, (0, 1, 2, 3)))  # too late: QEMU drops it quietly
    answer(s, nxt)
    out, _ = finish(q, s)
    assert parse_calls(out)["STATIC"][0] == NOT_SUPPORTED, out
    assert re.search(r"call 0xc2000001 from vCPU 0 timed out after 300 ms", q.messages()), q.messages()


def test_a_timed_out_call_gets_its_services_failure_and_a_late_replys_effects_are_reported(
        start_qemu: StartQemu, guests: Path, handler: ScriptedHandler) -> None:
    """§5: PSCI's own failure (INTERNAL_FAILURE) for a PSCI call the VMM gave up on,
    and EFFECT_DONE(-ETIMEDOUT) for each effect of a REPLY that came too late, so
    the handler's state follows the VM's (a CPU_ON it answered never happened)."""
    q = run_calls_guest(start_qemu, guests, handler, smp=2, forwarder_opts=",timeout-ms=300")
    s = handler.accept()
    s.handshake(RANGES)
    late = expect_call(s, PSCI_VERSION)  # never answered in time
    nxt = expect_call(s, PSCI_FEATURES)  # the guest moved on after timeout-ms
    power_on = wire.Effect(wire.EffectKind.CPU_ON, 1, GUEST_LOAD, 0, 1, wire.EFFECT_AARCH64)
    s.send(wire.Reply(late.seq, late.vcpu, (0,), (power_on,)))
    answer(s, nxt)
    done = s.expect(wire.EffectDone)  # the IOThread read the late REPLY first
    assert done == wire.EffectDone(late.seq, 0, -errno.ETIMEDOUT)
    out, _ = finish(q, s)
    assert parse_calls(out)["PSCI_VERSION"][0] == (-6) & U64, out  # PSCI INTERNAL_FAILURE


def test_refused_vm_stops_qemu(start_qemu: StartQemu, guests: Path, handler: ScriptedHandler, line: bool) -> None:
    q = run_calls_guest(start_qemu, guests, handler, line=line)
    s = handler.accept()
    s.expect(wire.Hello)
    s.send(wire.Error(wire.ErrorCode.REFUSED, "not this VM"))
    s.close()
    rc = q.wait(30)
    assert rc == 1, q.messages()
    assert "refused the VM: code 7: not this VM" in q.messages()


def test_interrupt_is_offered_with_a_gicv3_and_checked(start_qemu: StartQemu, guests: Path,
                                                        handler: ScriptedHandler) -> None:
    """With a GICv3 HELLO offers INTERRUPT (§3.16); the forwarder takes a good one
    and drops the connection at one for a vCPU HELLO did not name."""
    q = run_calls_guest(start_qemu, guests, handler, machine="virt,gic-version=3", smp=2)
    s = handler.accept()
    hello = s.expect(wire.Hello)
    assert hello.features & wire.FEATURE_INTERRUPT, hello
    s.send(wire.Welcome(version=2, ranges=RANGES, call_timeout_ms=1000))
    assert s.expect(wire.FilterStatus).status == 0
    c = expect_call(s, PSCI_VERSION)
    s.send(wire.Interrupt(1, 8))  # SGI 8 on vCPU 1 (off): pending, nothing to answer
    answer(s, c)
    expect_call(s, PSCI_FEATURES)
    # Past our own Connection's check, as a broken handler would send it.
    s.sock.sendall(wire.encode(wire.Interrupt(2, 8)))
    while (ev := s.next_event()) is not None:  # QEMU says why (ERROR) and drops the connection
        assert isinstance(ev, wire.Error), ev
    q.kill()
    assert "INTERRUPT 8 for vCPU 2 (INTIDs 0..31 on a vCPU from HELLO)" in q.messages(), q.messages()


def test_a_daemon_that_refuses_silently_stops_qemu_cleanly(start_qemu: StartQemu, guests: Path,
                                                            start_daemon: Callable[..., Daemon]) -> None:
    """hvcproxyd's peer check refuses this QEMU's user (``vmm.uid``) by closing the
    connection without a word; with a chardev without reconnect-ms, QEMU exits 1
    and says why, every time.  It used to crash (SIGSEGV) in most runs: the main
    thread set the chardev's handlers on the IOThread's context while the
    IOThread already read the hang-up and dropped the channel."""
    daemon = start_daemon(extra_yaml="vmm: {uid: [nobody]}", qmp=False)
    for _ in range(12):
        q = start_qemu("-kernel", str(guests / "calls-hvc.elf"), "-chardev", f"socket,id=fw,path={daemon.socket}",
                       "-object", "hvc-forwarder,id=hf0,chardev=fw")
        rc = q.wait(30)
        assert rc == 1, (rc, q.messages())
        assert "the handler closed the connection before the handshake ended" in q.messages(), q.messages()
    assert daemon.log.count("refused VMM pid") == 12, daemon.log[-3000:]


CPU_OFF, CPU_ON64 = 0x84000002, 0xC4000003
ALREADY_ON = U64 - 3


def test_vcpus_wait_in_parallel_and_replies_come_out_of_order(start_qemu: StartQemu, guests: Path,
                                                               handler: ScriptedHandler) -> None:
    """smp.elf on four vCPUs, PSCI modelled here.  When the boot CPU releases a
    secondary, it polls AFFINITY_INFO while the secondary calls CPU_OFF.  The handler
    holds whichever of the two comes first until the other arrives: two vCPUs then
    wait at once (impossible if a waiting vCPU kept the BQL), and the later call is
    answered first."""
    q = start_qemu("-kernel", str(guests / "smp.elf"), forwarder=handler.path, smp=4)
    s = handler.accept()
    hello = s.handshake(RANGES)
    power = {v.index: v.powered_on for v in hello.vcpus}
    assert power == {0: True, 1: False, 2: False, 3: False}
    off_phase = False
    held_poll: dict[int, wire.Call] = {}  # target -> the boot CPU's AFFINITY_INFO
    held_off: dict[int, wire.Call] = {}  # vCPU -> its CPU_OFF
    overlaps = 0
    done: list[wire.EffectDone] = []

    while (ev := s.next_event()) is not None:
        if isinstance(ev, wire.EffectDone):
            done.append(ev)
            continue
        if not isinstance(ev, wire.Call):
            continue
        target = ev.args[0]
        if ev.func_id == CPU_ON64:
            if power[target]:
                s.send(wire.Reply(ev.seq, ev.vcpu, (ALREADY_ON,)))
                off_phase = True
            else:
                power[target] = True
                on = wire.Effect(wire.EffectKind.CPU_ON, target, entry=ev.args[1], context=ev.args[2],
                                 arg=ev.el, eflags=wire.EFFECT_AARCH64)
                s.send(wire.Reply(ev.seq, ev.vcpu, (0,), (on,)))
        elif ev.func_id == AFFINITY_INFO64 and off_phase and power[target]:
            held_poll[target] = ev
        elif ev.func_id == CPU_OFF:
            held_off[ev.vcpu] = ev
        else:
            answer(s, ev)
        for cpu in [c for c in held_off if c in held_poll]:
            overlaps += 1
            off, poll = held_off.pop(cpu), held_poll.pop(cpu)
            power[cpu] = False
            replies = [wire.Reply(off.seq, off.vcpu, (0,), (wire.Effect(wire.EffectKind.CPU_OFF, cpu),)),
                       wire.Reply(poll.seq, poll.vcpu, (1,))]  # OFF
            for r in sorted(replies, key=lambda r: -r.seq):  # the later call first
                s.send(r)

    assert q.wait(60) == 0, q.output()
    out = q.output()
    assert "SMP DONE" in out and "TIMEOUT" not in out, out
    assert overlaps == 3, f"expected three overlapping waits, saw {overlaps}"
    assert not held_poll and not held_off
    # CPU_ON x3 (confirmed once the target was set to run), CPU_OFF x3, SYSTEM_OFF.
    assert len([d for d in done if d.status == 0]) == 7, done
    for n in (1, 2, 3):
        assert re.search(rf"^SECONDARY mpidr=0x0*8000000{n} context=0x0*c0de000{n} ", out, re.MULTILINE), out
        assert re.search(rf"^CPU_OFF target=0x0*{n} x0=0x0*1\s*$", out, re.MULTILINE), out
