"""The sans-IO codec: round trips, states, malformed input, fuzzing."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvcproxyd import wire
from hvcproxyd.wire import (
    HEADER,
    NEED_DATA,
    Connection,
    LocalProtocolError,
    MsgType,
    ProtocolError,
    RemoteProtocolError,
    Role,
    State,
)

HELLO = wire.Hello("vm1", wire.Accel.KVM, 40,
                   (wire.VcpuInfo(0, 0x0, True), wire.VcpuInfo(1, 0x1, False, aarch32=True),
                    wire.VcpuInfo(2, 0x100, False)),
                   (wire.RamRegion(0x4000_0000, 1 << 30, 0, 0), wire.RamRegion(0x1_0000_0000, 1 << 20)),
                   wire.FEATURE_MEMFD | wire.FEATURE_EFFECT_DONE, conduit=wire.PsciConduit.SMC, fds=(7,))
RANGES = (wire.FilterRange(0x8400_0000, 0x20, wire.FilterAction.FORWARD),
          wire.FilterRange(0x95C1_BA5E, 4, wire.FilterAction.DENY))
WELCOME = wire.Welcome(1, RANGES, 1000)


def running_pair(welcome: wire.Welcome = WELCOME) -> tuple[Connection, Connection]:
    """A daemon and a VMM connection, handshaken through each other."""
    vmm, daemon = Connection(Role.VMM), Connection(Role.DAEMON)
    for event, src, dst in ((HELLO, vmm, daemon), (welcome, daemon, vmm), (wire.FilterStatus(0), vmm, daemon)):
        assert through(event, src, dst) == event
    assert vmm.state is daemon.state is State.RUNNING
    return vmm, daemon


def through(event: wire.Event, src: Connection, dst: Connection) -> wire.Event:
    """Push one event through an encoder and a decoder, byte by byte for good measure."""
    data = src.send(event)
    for i in range(len(data)):
        dst.receive_data(data[i:i + 1], (7,) if isinstance(event, wire.Hello) and i == 0 else ())
    out = dst.next_event()
    assert dst.next_event() is NEED_DATA
    return out  # type: ignore[return-value]


def call(seq: int, vcpu: int = 0, fid: int = 0x8400_0000) -> wire.Call:
    return wire.Call(seq, vcpu, fid, tuple(range(100, 117)), wire.CALL_SMC | (1 << wire.CALL_EL_SHIFT))


def test_handshake_round_trips_and_keeps_fds() -> None:
    vmm, daemon = Connection(Role.VMM), Connection(Role.DAEMON)
    got = through(HELLO, vmm, daemon)
    assert got == HELLO
    assert isinstance(got, wire.Hello) and got.fds == (7,)


def test_hello_declares_the_effects_the_vmm_carries_out() -> None:
    qemu = 0b1101_1110  # CPU_ON, CPU_OFF, SYSTEM_OFF, SYSTEM_RESET, CPU_SUSPEND, CPU_STANDBY
    got = wire.decode_payload(wire.MsgType.HELLO, 0, memoryview(wire.encode(
        dataclasses.replace(HELLO, effects=qemu))[wire.HEADER.size:]), (7,))
    assert isinstance(got, wire.Hello) and got.effects == qemu
    assert got.performs == frozenset(wire.EffectKind) - {wire.EffectKind.SYSTEM_SUSPEND}
    assert HELLO.performs == wire.EFFECTS_UNDECLARED  # a VMM that does not say: all but SYSTEM_SUSPEND
    assert dataclasses.replace(HELLO, effects=1 << 31 | 1 << 1).performs == {wire.EffectKind.CPU_ON}


def test_rom_regions_round_trip_and_are_not_ram() -> None:
    flash = wire.RamRegion(0x0400_0000, 0x0400_0000, rom=True)
    hello = dataclasses.replace(HELLO, regions=(flash, *HELLO.regions))
    got = wire.decode_payload(wire.MsgType.HELLO, 0, memoryview(wire.encode(hello)[wire.HEADER.size:]), (7,))
    assert isinstance(got, wire.Hello) and got.regions == hello.regions and got.ram == HELLO.regions
    with pytest.raises(LocalProtocolError, match="names an fd"):
        wire.RamRegion(0, 4096, 0, 0, rom=True)
    with pytest.raises(LocalProtocolError, match="no RAM region"):
        dataclasses.replace(HELLO, regions=(flash,), fds=())


def test_reconnect_hello_carries_filter_in_force() -> None:
    hello = wire.Hello("vm1", wire.Accel.TCG, 48, (wire.VcpuInfo(0, 0, True),), (wire.RamRegion(0, 4096),),
                       reconnect=True, filter_in_force=RANGES)
    assert through(hello, Connection(Role.VMM), Connection(Role.DAEMON)) == hello


@pytest.mark.parametrize("event", [
    call(1),
    wire.Reply(1, 0, (0, 1, 2, 3)),
    wire.Reply(1, 2, tuple(range(18)), (
        wire.Effect(wire.EffectKind.CPU_ON, 1, 0x4008_0000, 0xC0FFEE, 1, wire.EFFECT_AARCH64),
        wire.Effect(wire.EffectKind.SYSTEM_RESET, 0, 0, 0x1234, 0x8000_0001))),
    wire.MemRead(5, 0x4000_1000, 4096),
    wire.MemWrite(6, 0x4000_1000, b"\x01\x02"),
    wire.VmEvent(wire.EventKind.VM_RESET),
    wire.Error(wire.ErrorCode.SHUTDOWN, "bye"),
])
def test_running_messages_round_trip(event: wire.Event) -> None:
    vmm, daemon = running_pair()
    if isinstance(event, (wire.Reply,)):
        through(call(event.seq, event.vcpu), vmm, daemon)
    src, dst = (daemon, vmm) if wire._SENDER[wire._TYPE_OF[type(event)]] is Role.DAEMON else (vmm, daemon)
    assert through(event, src, dst) == event


def test_memory_responses_and_effect_done_round_trip() -> None:
    vmm, daemon = running_pair()
    through(wire.MemRead(9, 0x4000_0000, 3), daemon, vmm)
    assert through(wire.MemReadResp(9, 0, b"abc"), vmm, daemon) == wire.MemReadResp(9, 0, b"abc")
    through(wire.MemWrite(10, 0x4000_0000, b"x"), daemon, vmm)
    assert through(wire.MemWriteResp(10, -14), vmm, daemon) == wire.MemWriteResp(10, -14)
    through(call(3), vmm, daemon)
    through(wire.Reply(3, 0, (0, 0, 0, 0), (wire.Effect(wire.EffectKind.CPU_ON, 1),)), daemon, vmm)
    assert through(wire.EffectDone(3, 0), vmm, daemon) == wire.EffectDone(3, 0)


def test_replies_may_come_in_any_order() -> None:
    vmm, daemon = running_pair()
    for seq in (1, 2, 3):
        through(call(seq, vcpu=seq - 1), vmm, daemon)
    for seq in (3, 1, 2):
        through(wire.Reply(seq, seq - 1, (0,)), daemon, vmm)
    assert vmm.calls_in_flight == frozenset()


def test_reply_to_a_call_never_made_is_a_protocol_error() -> None:
    vmm, _daemon = running_pair()
    rogue = Connection(Role.DAEMON)
    rogue.state = State.RUNNING
    rogue._calls_in_flight.add(99)
    vmm.receive_data(rogue.send(wire.Reply(99, 0, (0,))))
    with pytest.raises(RemoteProtocolError, match="not an outstanding CALL"):
        vmm.next_event()
    assert vmm.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        vmm.next_event()  # once in ERROR, later calls are refused


@pytest.mark.parametrize("make, match", [
    (lambda: wire.MemReadResp(42, 0, b"x"), "not an outstanding MEM_READ"),
    (lambda: wire.MemWriteResp(42, 0), "not an outstanding MEM_WRITE"),
    (lambda: wire.EffectDone(42, 0), "was not sent"),
])
def test_unsolicited_responses_are_protocol_errors(make, match) -> None:  # type: ignore[no-untyped-def]
    _, daemon = running_pair()
    daemon.receive_data(wire.encode(make()))
    with pytest.raises(RemoteProtocolError, match=match):
        daemon.next_event()


def test_duplicate_call_in_flight_is_a_protocol_error() -> None:
    _vmm, daemon = running_pair()
    frame = wire.encode(call(5))
    daemon.receive_data(frame + frame)
    assert isinstance(daemon.next_event(), wire.Call)
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        daemon.next_event()


def test_messages_out_of_state_are_refused_both_ways() -> None:
    daemon = Connection(Role.DAEMON)
    daemon.receive_data(wire.encode(call(1)))
    with pytest.raises(RemoteProtocolError, match="not allowed in state AWAIT_HELLO"):
        daemon.next_event()
    vmm = Connection(Role.VMM)
    with pytest.raises(LocalProtocolError, match="not allowed"):
        vmm.send(call(1))
    with pytest.raises(LocalProtocolError, match="only be sent by the daemon"):
        vmm.send(WELCOME)


def test_wrong_sender_is_a_remote_protocol_error() -> None:
    vmm = Connection(Role.VMM)
    vmm.receive_data(wire.encode(HELLO))
    with pytest.raises(RemoteProtocolError, match="only be sent by the vmm"):
        vmm.next_event()


def test_error_closes_the_connection() -> None:
    vmm, daemon = running_pair()
    vmm.receive_data(daemon.send(wire.Error(wire.ErrorCode.SHUTDOWN, "stop")))
    assert daemon.state is State.CLOSED
    assert vmm.next_event() == wire.Error(wire.ErrorCode.SHUTDOWN, "stop")
    assert vmm.state is State.CLOSED


@pytest.mark.parametrize("length", [0, 15, wire.MAX_FRAME + 1, 0xFFFF_FFFF])
def test_frame_length_out_of_range(length: int) -> None:
    daemon = Connection(Role.DAEMON)
    daemon.receive_data(HEADER.pack(length, MsgType.HELLO, 0, 0))
    with pytest.raises(RemoteProtocolError, match="frame length"):
        daemon.next_event()


def test_truncated_frame_waits_then_eof_is_an_error() -> None:
    daemon = Connection(Role.DAEMON)
    data = wire.encode(HELLO)
    daemon.receive_data(data[:-1])
    assert daemon.next_event() is NEED_DATA
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        daemon.receive_data(b"")


def test_clean_eof_closes() -> None:
    daemon = Connection(Role.DAEMON)
    daemon.receive_data(b"")
    assert daemon.state is State.CLOSED


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b[:16] + struct.pack("<I", 0xDEADBEEF) + b[20:], "bad magic"),
    (lambda b: b[:6] + b"\x01\x00" + b[8:], "reserved header flags"),
    (lambda b: struct.pack("<I", len(b) + 4) + b[4:] + b"\0\0\0\0", "counts say"),
    (lambda b: b[:4] + struct.pack("<H", 77) + b[6:], "unknown message type 77"),
])
def test_malformed_hello(mutate, match) -> None:  # type: ignore[no-untyped-def]
    daemon = Connection(Role.DAEMON)
    daemon.receive_data(mutate(wire.encode(HELLO)))
    with pytest.raises(RemoteProtocolError, match=match):
        daemon.next_event()


def test_call_with_wrong_payload_size() -> None:
    _, daemon = running_pair()
    frame = wire.encode(call(1))
    bad = struct.pack("<I", len(frame) - 8) + frame[4:-8]
    daemon.receive_data(bad)
    with pytest.raises(RemoteProtocolError, match="CALL payload must be 152 bytes"):
        daemon.next_event()


@pytest.mark.parametrize("make", [
    lambda: wire.Call(1, 0, 0x8400_0000, (0,) * 16),
    lambda: wire.Call(1, 0, 1 << 32, (0,) * 17),
    lambda: wire.Reply(1, 0, ()),
    lambda: wire.Reply(1, 0, (0,) * 19),
    lambda: wire.MemRead(1, 0, 0),
    lambda: wire.MemRead(1, 0, wire.MAX_MEM_CHUNK + 1),
    lambda: wire.FilterRange(0xFFFF_FFFF, 2, wire.FilterAction.DENY),
    lambda: wire.VcpuInfo(0, 1 << 40, True),
    lambda: wire.Hello("", wire.Accel.TCG, 40, (wire.VcpuInfo(0, 0, True),), (wire.RamRegion(0, 1),)),
    lambda: wire.Hello("x", wire.Accel.TCG, 40, (wire.VcpuInfo(1, 0, True),), (wire.RamRegion(0, 1),)),
    lambda: wire.Hello("x", wire.Accel.TCG, 32, (wire.VcpuInfo(0, 0, True),), (wire.RamRegion(1 << 32, 1),)),
    lambda: wire.Hello("x", wire.Accel.TCG, 40, (wire.VcpuInfo(0, 0, True), wire.VcpuInfo(1, 0, True)),
                       (wire.RamRegion(0, 1),)),
])
def test_constructors_validate_fields(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LocalProtocolError):
        make()


def test_state_save_and_load_round_trip_in_order() -> None:
    vmm, daemon = running_pair(wire.Welcome(2, RANGES, 1000))
    assert through(wire.MigrationBlocker("tee-proxy: sessions at the TEE"), daemon, vmm) == \
        wire.MigrationBlocker("tee-proxy: sessions at the TEE")
    assert through(wire.MigrationBlocker(), daemon, vmm) == wire.MigrationBlocker()
    # a save: the VMM asks, the daemon answers in chunks; a call may cross it
    assert through(wire.StateSave(5), vmm, daemon) == wire.StateSave(5)
    assert through(call(9), vmm, daemon) == call(9)
    for chunk in (wire.StateData(5, b"{" * wire.MAX_MEM_CHUNK), wire.StateData(5, b"}", last=True)):
        assert through(chunk, daemon, vmm) == chunk
    with pytest.raises(LocalProtocolError, match="not part of the transfer"):
        daemon.send(wire.StateData(5, b"more"))
    # a load: the VMM sends, then waits for the daemon's word
    for chunk in (wire.StateData(6, b"ab"), wire.StateData(6, b"", last=True)):
        assert through(chunk, vmm, daemon) == chunk
    refused = wire.StateStatus(6, -22, "the guest would see a different machine")
    assert through(refused, daemon, vmm) == refused
    # a save the daemon cannot give ends with a status instead of data
    through(wire.StateSave(7), vmm, daemon)
    through(wire.StateStatus(7, -16, "blocked"), daemon, vmm)
    assert vmm.state is daemon.state is State.RUNNING


@pytest.mark.parametrize(("steps", "match"), [
    ([("vmm", wire.StateSave(1)), ("vmm", wire.StateSave(2))], "in progress"),
    ([("vmm", wire.StateData(1, b"x")), ("vmm", wire.StateData(2, b"y"))], "not part of the transfer"),
    ([("vmm", wire.StateData(1, b"x")), ("daemon", wire.StateStatus(1))], "ends no transfer"),
    ([("daemon", wire.StateStatus(3))], "ends no transfer"),
    ([("daemon", wire.StateData(3, b""))], "not part of the transfer"),
    ([("vmm", wire.StateSave(1)), ("vmm", wire.StateData(1, b"x"))], "not part of the transfer"),
])
def test_state_transfers_out_of_order_are_refused(steps: list[tuple[str, wire.Event]], match: str) -> None:
    vmm, daemon = running_pair(wire.Welcome(2, RANGES, 1000))
    *before, (who, last) = steps
    for side, event in before:
        src, dst = (vmm, daemon) if side == "vmm" else (daemon, vmm)
        through(event, src, dst)
    sender = vmm if who == "vmm" else daemon
    with pytest.raises(LocalProtocolError, match=match):
        sender.send(last)


def test_state_frames_need_protocol_v2() -> None:
    vmm, daemon = running_pair()  # WELCOME chose version 1
    with pytest.raises(LocalProtocolError, match="needs protocol version 2"):
        vmm.send(wire.StateSave(1))
    with pytest.raises(LocalProtocolError, match="needs protocol version 2"):
        daemon.send(wire.MigrationBlocker("x"))
    raw = wire.encode(wire.StateSave(1))
    daemon.receive_data(raw)
    with pytest.raises(RemoteProtocolError, match="needs protocol version 2"):
        daemon.next_event()


def test_version_negotiation() -> None:
    assert wire.negotiate_version(1, 5) == 2
    assert wire.negotiate_version(1, 1) == 1  # a v1 VMM: no state transfer
    assert wire.negotiate_version(2, 2) == 2
    assert wire.negotiate_version(3, 5) is None


@settings(deadline=None)  # examples: the profile (tests/conftest.py)
@given(st.binary(max_size=600), st.sampled_from(list(State)[:4]), st.sampled_from(list(Role)))
def test_fuzz_any_bytes_give_events_or_protocol_errors(data: bytes, state: State, role: Role) -> None:
    conn = Connection(role)
    conn.state = state
    try:
        conn.receive_data(data)
        for _ in range(50):
            if conn.next_event() is NEED_DATA:
                break
    except ProtocolError:
        pass


@settings(deadline=None)  # examples: the profile (tests/conftest.py)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=8), st.binary(min_size=1, max_size=200))
def test_fuzz_valid_header_random_payload(types: list[int], payload: bytes) -> None:
    conn = Connection(Role.DAEMON)
    conn.state = State.RUNNING
    try:
        for t in types:
            conn.receive_data(HEADER.pack(HEADER.size + len(payload), t, 0, 1) + payload)
            conn.next_event()
    except ProtocolError:
        pass


# -- the fast CALL decoder and REPLY encoder agree with the general codec

_U64 = st.integers(0, wire.U64)
_U32 = st.integers(0, wire.U32)
_FLAGS = st.one_of(st.integers(0, wire.CALL_FLAGS_KNOWN), _U32)  # mostly valid, sometimes unknown bits


@given(seqs=st.lists(_U64, min_size=1, max_size=6), vcpu=_U32, flags=_FLAGS, fid=_U32, reserved=_U32,
       args=st.lists(_U64, min_size=wire.N_ARGS, max_size=wire.N_ARGS), split=st.integers(0, 168 * 6))
def test_the_fast_call_decoder_decodes_what_the_general_one_does(
        seqs: list[int], vcpu: int, flags: int, fid: int, reserved: int, args: list[int], split: int) -> None:
    """Connection.next_event's CALL fast path (a running daemon) against
    decode_payload, over the same frames, fed in two arbitrary pieces."""
    _vmm, daemon = running_pair()
    payload = wire._CALL.pack(vcpu, flags, fid, reserved, *args)
    frames = b"".join(HEADER.pack(HEADER.size + len(payload), MsgType.CALL, 0, seq) + payload for seq in seqs)
    for piece in (frames[:split], frames[split:]):
        if piece:  # b"" would mean the peer closed
            daemon.receive_data(piece)
    seen: set[int] = set()
    for seq in seqs:
        try:
            want: wire.Event | type[RemoteProtocolError] = wire.decode_payload(MsgType.CALL, seq, memoryview(payload))
        except RemoteProtocolError:
            want = RemoteProtocolError
        if want is not RemoteProtocolError and seq in seen:
            want = RemoteProtocolError  # the same seq twice in flight
        if want is RemoteProtocolError:
            with pytest.raises(RemoteProtocolError):
                daemon.next_event()
            assert daemon.state is State.ERROR
            return
        got = daemon.next_event()
        assert got == want and type(got.args) is tuple  # type: ignore[union-attr]
        seen.add(seq)
    assert daemon.next_event() is NEED_DATA


@given(seq=_U64, vcpu=_U32, regs=st.lists(_U64, min_size=1, max_size=wire.MAX_REGS))
def test_the_one_pack_reply_frame_is_the_general_layout(seq: int, vcpu: int, regs: list[int]) -> None:
    reply = wire.Reply(seq, vcpu, tuple(regs))
    general = wire._frame(MsgType.REPLY, seq, wire._REPLY_FIXED.pack(len(regs), 0, 0, vcpu)
                          + wire._REGS[len(regs)].pack(*regs))
    assert wire.encode(reply) == general
    assert wire.decode_payload(MsgType.REPLY, seq, memoryview(general)[HEADER.size:]) == reply


@given(regs=st.lists(st.integers(-1, wire.U64 + 1), min_size=0, max_size=wire.MAX_REGS + 1),
       n_effects=st.integers(0, wire.MAX_EFFECTS + 1))
def test_reply_to_accepts_and_refuses_what_the_constructor_does(regs: list[int], n_effects: int) -> None:
    c = call(5, vcpu=3)
    effects = (wire.Effect(wire.EffectKind.CPU_OFF, 3),) * n_effects
    try:
        want: wire.Reply | None = wire.Reply(c.seq, c.vcpu, tuple(regs), effects)
    except LocalProtocolError:
        want = None
    if want is None:
        with pytest.raises(LocalProtocolError):
            wire.reply_to(c, tuple(regs), effects)
    else:
        assert wire.reply_to(c, tuple(regs), effects) == want


def _interrupt_pair(features: int) -> tuple[Connection, Connection]:
    hello = wire.Hello("vm", wire.Accel.TCG, 40, (wire.VcpuInfo(0, 0, True), wire.VcpuInfo(1, 1, False)),
                       (wire.RamRegion(0x4000_0000, 1 << 20),), features)
    vmm, daemon = Connection(Role.VMM), Connection(Role.DAEMON)
    for event, src, dst in ((hello, vmm, daemon), (wire.Welcome(2, RANGES, 1000), daemon, vmm),
                            (wire.FilterStatus(0), vmm, daemon)):
        through(event, src, dst)
    return vmm, daemon


def test_interrupt_goes_to_a_vmm_that_offered_it() -> None:
    vmm, daemon = _interrupt_pair(wire.FEATURE_INTERRUPT)
    assert through(wire.Interrupt(1, 8), daemon, vmm) == wire.Interrupt(1, 8)
    assert through(wire.Interrupt(0, 31), daemon, vmm) == wire.Interrupt(0, 31)
    with pytest.raises(LocalProtocolError, match="vCPU 2, HELLO has 2"):
        daemon.send(wire.Interrupt(2, 8))
    with pytest.raises(LocalProtocolError, match="may only be sent by the daemon"):
        vmm.send(wire.Interrupt(0, 8))
    with pytest.raises(LocalProtocolError, match=r"INTID 0\.\.31"):
        wire.Interrupt(0, 32)


def test_interrupt_needs_the_feature() -> None:
    vmm, daemon = _interrupt_pair(0)
    with pytest.raises(LocalProtocolError, match="INTERRUPT feature"):
        daemon.send(wire.Interrupt(0, 8))
    # and the VMM refuses one it did not offer
    vmm.receive_data(wire.encode(wire.Interrupt(0, 8)))
    with pytest.raises(RemoteProtocolError, match="INTERRUPT feature"):
        vmm.next_event()
