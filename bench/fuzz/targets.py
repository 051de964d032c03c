"""The fuzz targets: each takes any bytes and must either succeed or raise one
of the exceptions its interface documents.  Anything else is a crash.

They are engine-neutral (plain functions of bytes), so the same code serves the
coverage-guided runner (``python -m bench.fuzz``, atheris/libFuzzer) and the
regression tests that replay every input a run ever crashed on
(``tests/test_fuzz_regressions.py``).  Each target also checks what must hold
whatever the input (a decoded frame re-encodes to the same bytes; a ledger
rebuilt from its change notes equals the ledger), so a silent wrong answer is
a crash too, not only an exception.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from hvcproxyd.config.diagnostics import ConfigError
from hvcproxyd.core.guestmem import GuestMemory
from hvcproxyd.core.service import VmService
from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.handlers.ffa.defs import FfaError
from hvcproxyd.handlers.ffa.defs import Fn as FfaFn
from hvcproxyd.handlers.pkvm_memshare import MEM_SHARE_ID, MEM_UNSHARE_ID, MemshareHandler
from hvcproxyd.handlers.pkvm_memshare.handler import FEATURES_ID, HYP_MEMINFO_ID, MMIO_GUARD_ID
from hvcproxyd.handlers.pkvm_memshare.ledger import Change, Ledger, Replica
from hvcproxyd.handlers.tee_proxy import abi as tee_abi
from hvcproxyd.handlers.tee_proxy.msgarg import MsgArg, MsgError, Param
from hvcproxyd.handlers.tee_proxy.msgarg import pack as pack_msg_arg
from hvcproxyd.handlers.tee_proxy.msgarg import parse as parse_msg_arg
from hvcproxyd.handlers.tee_proxy.shm import Limits as TeeLimits
from hvcproxyd.handlers.tee_proxy.shm import walk_pagelist
from hvcproxyd.wire import (
    MAX_REGS,
    N_ARGS,
    NEED_DATA,
    Call,
    Connection,
    EventKind,
    ProtocolError,
    RamRegion,
    Role,
    State,
    VmEvent,
    encode,
)
from tests.ffa_support import Desc
from tests.test_ffa_descriptors import check_accepted, parse  # the unit tests' world (RAM, receivers) and rules
from tests.test_tee_parsing import BASE as TEE_BASE
from tests.test_tee_parsing import SIZE as TEE_SIZE
from tests.test_tee_parsing import CheckedRam  # guest RAM that asserts every access stays inside it

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    #: What the interface may raise for bad input; anything else is a crash.
    allowed: tuple[type[BaseException], ...]
    #: Valid inputs to start a coverage-guided run from.
    seeds: Callable[[], Iterator[bytes]]

    def check(self, data: bytes) -> None:
        """Run one input; raises only if it crashed the target."""
        try:
            self.run(data)
        except self.allowed:
            pass


# ----------------------------------------------------------------- the wire decoder

_STATES = (State.AWAIT_HELLO, State.AWAIT_WELCOME, State.AWAIT_FILTER_STATUS, State.RUNNING)


def wire(data: bytes) -> None:
    """First byte: which side decodes, in which state, whether the peer then hangs
    up; the rest is the byte stream, fed in two pieces (a frame split across reads
    must decode the same)."""
    if not data:
        return
    role = Role.DAEMON if data[0] & 1 else Role.VMM
    conn = Connection(role)
    conn.state = _STATES[(data[0] >> 1) % len(_STATES)]
    body = data[1:]
    cut = (data[0] >> 4) * 7 % (len(body) + 1)
    for piece in (body[:cut], body[cut:]):
        if piece:  # an empty read is the end of the stream
            conn.receive_data(piece)
    if data[0] & 8:
        conn.receive_data(b"")
    for _ in range(256):
        event = conn.next_event()
        if event is NEED_DATA:
            return
        again = encode(event)  # type: ignore[arg-type]
        # What decoded must re-encode to a frame that decodes to the same event.
        twin = _decode_one(again, role, event)
        if twin != event:
            raise AssertionError(f"{event!r} re-encoded decodes as {twin!r}")


def _decode_one(frame: bytes, role: Role, like: object) -> object:
    for state in _STATES:
        conn = Connection(role)
        conn.state = state
        try:
            conn.receive_data(frame)
            event = conn.next_event()
        except ProtocolError:
            continue
        if type(event) is type(like):
            return event
    raise AssertionError(f"{like!r} re-encoded does not decode in any state")


def wire_seeds() -> Iterator[bytes]:
    call = Call(1, 0, 0x8400_0000, (0,) * N_ARGS, 0)
    yield bytes([0b111]) + encode(call)
    yield bytes([0b111]) + encode(VmEvent(EventKind.VCPU_POWER, 1, 1)) + encode(call)


# ----------------------------------------------------------------- the config loader

_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="hvcproxyd-fuzz-config-"))


def config(data: bytes) -> None:
    """The bytes as a VM's YAML file: a config, or a ConfigError that says where."""
    path = _CONFIG_DIR / "vm.yaml"
    path.write_bytes(data)
    try:
        loaded = load_config(path)
    except ConfigError as err:
        if not err.problems or not all(str(p).startswith(str(path)) for p in err.problems if not p.warning):
            raise AssertionError(f"a config error that does not name the file: {err}") from err
        raise
    if not isinstance(loaded, VmConfig):
        raise AssertionError(f"load_config returned {loaded!r}")


def config_seeds() -> Iterator[bytes]:
    for path in sorted((REPO / "config").glob("*.yaml")):
        yield path.read_bytes()
    yield (REPO / "hvcproxyd" / "cli" / "demo.yaml").read_bytes()


# ----------------------------------------------------------------- pkvm-memshare's guest-facing parser

RAM, RAM_SIZE = 0x4000_0000, 1 << 24
_FIDS = (MEM_SHARE_ID, MEM_UNSHARE_ID, HYP_MEMINFO_ID, MMIO_GUARD_ID, FEATURES_ID, 0x8600_FF01, 0xC600_0005)
_RECORD = struct.Struct("<BBBQQQ")


@cache
def _memshare_config(abi: str) -> VmConfig:
    path = _CONFIG_DIR / f"memshare-{abi}.yaml"
    path.write_text("\n".join([
        "vm: fuzz", "handlers:", "  ms:", "    type: pkvm-memshare", "    options:", f"      abi: {abi}",
        "      mmio_guard: true", "      stream: false", "      max_ranges: 64", "      max_pages_per_call: 64",
        "rules:", "  - match: kvm-vendor", "    action: ms", ""]))
    return load_config(path)


@cache
def _memshare_service(abi: str) -> VmService:
    svc = VmService(_memshare_config(abi))
    svc.facts.memory = GuestMemory((RamRegion(RAM, RAM_SIZE),), 40)
    return svc


def _now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never really awaits (memshare without delegates, a
    parser over in-process guest RAM) to its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        coro.close()
    raise AssertionError("awaited something real where nothing should block")


def _address(kind: int, raw: int) -> int:
    """Mostly addresses near guest RAM (where the interesting cases are), some raw."""
    if kind & 3 == 0:
        return raw
    return RAM + ((raw & 0xFFFF) << 12) + (raw >> 16 & 0xFFF if kind & 3 == 3 else 0) - (RAM_SIZE if kind & 4 else 0)


def memshare(data: bytes) -> None:
    """First byte: the ABI.  Then 27-byte calls: function, vCPU, address kind,
    x1, x2, x3.  Every reply is 64-bit words, and the ledger rebuilt from the
    change notes equals the handler's ledger."""
    if not data:
        return
    svc = _memshare_service("range" if data[0] & 1 else "mainline")
    svc.event(VmEvent(EventKind.VM_RESET))  # every input starts from a VM with nothing shared
    handler = svc.instances["ms"]
    assert isinstance(handler, MemshareHandler)
    replica = Replica()
    replica.apply(json.loads(handler.ledger.snapshot_line("fuzz", 0.0)))
    for seq, off in enumerate(range(1, len(data) - _RECORD.size + 1, _RECORD.size)):
        fsel, vcpu, kind, x1, x2, x3 = _RECORD.unpack_from(data, off)
        fid = _FIDS[fsel % len(_FIDS)] if fsel < 0xF0 else 0xC600_0000 | fsel
        call = Call(seq, vcpu % 4, fid, (_address(kind, x1), x2 if kind & 8 else x2 & 0xFF, x3 if kind & 16 else 0)
                    + (0,) * (N_ARGS - 3), 0)
        result = _now(handler.handle(call))
        if not (1 <= len(result.regs) <= MAX_REGS and all(0 <= r < 1 << 64 for r in result.regs)):
            raise AssertionError(f"{call!r} answered {result.regs!r}")
        for note in result.notes:
            if isinstance(note, Change):
                replica.apply(json.loads(note.json_line(0.0)))
    if replica.shared != handler.ledger.shared:
        raise AssertionError("the ledger rebuilt from its change notes differs from the ledger")
    if len(handler.ledger.shared) > 64:
        raise AssertionError(f"{len(handler.ledger.shared)} ranges past max_ranges 64")


def memshare_seeds() -> Iterator[bytes]:
    share = _RECORD.pack(0, 0, 1, 3, 0, 0)
    unshare = _RECORD.pack(1, 0, 1, 3, 0, 0)
    yield b"\x00" + share + share + unshare
    yield b"\x01" + _RECORD.pack(0, 1, 9, 5, 8, 0) + _RECORD.pack(1, 1, 9, 6, 2, 0)


# ----------------------------------------------------------------- handler state (restart, migration)

@cache
def _stateful() -> VmService:
    path = _CONFIG_DIR / "state.yaml"
    path.write_text("\n".join([
        "vm: fuzz", "handlers:", "  psci:", "    type: psci", "  ms:", "    type: pkvm-memshare", "    options:",
        "      stream: false", "  ffa:", "    type: ffa", "    options:", "      id: 1", "      partitions:",
        "        echo: {type: echo, id: 0x8001, uuids: [a8f3b9e2-5b9c-4c7d-9f0e-3c8e2d6b1a01]}",
        "rules:", "  - match: psci", "    action: psci", "  - match: kvm-vendor", "    action: ms",
        "  - match: ffa", "    action: ffa", ""]))
    return VmService(load_config(path))


def state(data: bytes) -> None:
    """First byte: which handler; the rest: a JSON state file for it.  Restored,
    or refused with ValueError leaving the handler's state as it was."""
    if not data:
        return
    handlers = _stateful().instances
    handler = list(handlers.values())[data[0] % len(handlers)]
    before = json.dumps(handler.snapshot(), sort_keys=True)
    try:
        snapshot = json.loads(data[1:])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(str(err)) from err
    try:
        handler.restore(snapshot)
    except ValueError:
        if json.dumps(handler.snapshot(), sort_keys=True) != before:
            raise AssertionError(f"{handler.name}: a refused restore changed the state") from None
        raise
    again = handler.snapshot()
    handler.restore(json.loads(json.dumps(again)))  # what it took, it takes again
    if handler.snapshot() != again:
        raise AssertionError(f"{handler.name}: snapshot/restore does not round-trip")


def state_seeds() -> Iterator[bytes]:
    for i, handler in enumerate(_stateful().instances.values()):
        yield bytes([i]) + json.dumps(handler.snapshot()).encode()
    ledger = Ledger(4096)
    ledger.share(RAM, 8192, vcpu=0)
    yield b"\x01" + json.dumps({"ledger": ledger.to_dict(), "mmio_guard": [[0x1000, 0x1000]]}).encode()


# ----------------------------------------------------------------- FF-A memory-transaction descriptors

_FFA_VERSIONS = (0x1_0000, 0x1_0001, 0x1_0002)


def ffa_descriptor(data: bytes) -> None:
    """First byte: FF-A version and transaction kind; the rest: the descriptor a
    guest put in its TX buffer.  Accepted only if well-formed, in RAM, not in use,
    within the limits and to receivers that take the access given (the rules of
    tests/test_ffa_descriptors.py, whose guest world this shares)."""
    if not data:
        return
    version = _FFA_VERSIONS[data[0] % 3]
    kind = (FfaFn.MEM_SHARE, FfaFn.MEM_LEND, FfaFn.MEM_DONATE)[data[0] // 3 % 3]
    check_accepted(parse(data[1:], kind, version))


def ffa_descriptor_seeds() -> Iterator[bytes]:
    for v, version in enumerate(_FFA_VERSIONS):
        yield bytes([v]) + Desc(v10=version == 0x1_0000, emad_size=32 if version == 0x1_0002 else 16).encode()


# ----------------------------------------------------------------- OP-TEE argument structures

def optee_arg(data: bytes) -> None:
    """First byte: the num_params limit; the rest: a guest's struct optee_msg_arg.
    Parsed within the limit and re-packed to the same bytes, or refused EBADCMD."""
    if not data:
        return
    limit, body = data[0], data[1:]
    try:
        arg = parse_msg_arg(body, limit)
    except MsgError as err:
        if err.code != tee_abi.RETURN_EBADCMD:
            raise AssertionError(f"a malformed argument refused with {err.code}, not EBADCMD") from err
        raise
    same = body[:16] + b"\0" * 4 + body[20:tee_abi.arg_size(len(arg.params))]  # the padding word is cleared
    if len(arg.params) > limit or pack_msg_arg(arg) != same:
        raise AssertionError(f"{arg!r} does not re-pack to the bytes it came from")


_PAGELIST_HEAD = struct.Struct("<QIB")


def optee_pagelist(data: bytes) -> None:
    """A buffer pointer, size and per-buffer limit, then the guest RAM the walk
    reads (page lists in it): every page accepted lies in RAM, every read stays
    in RAM (CheckedRam asserts it), and refusals are EBADADDR or ENOMEM."""
    if len(data) < _PAGELIST_HEAD.size:
        return
    ptr, size, per_buffer = _PAGELIST_HEAD.unpack_from(data)
    ram = CheckedRam(data[_PAGELIST_HEAD.size:])
    for where in (ptr, TEE_BASE + (ptr & 0xFFFF)):  # raw, and somewhere inside RAM
        try:
            buf = _now(walk_pagelist(ram.memory, where, size & 0xFFFFFF, TeeLimits(pages_per_buffer=per_buffer or 1),
                                     TEE_BASE))
        except MsgError as err:
            if err.code not in (tee_abi.RETURN_EBADADDR, tee_abi.RETURN_ENOMEM):
                raise AssertionError(f"a bad page list refused with {err.code}") from err
            continue
        if len(buf.pages) > (per_buffer or 1) or not all(
                TEE_BASE < page < TEE_BASE + TEE_SIZE and page % 4096 == 0 for page in buf.pages):
            raise AssertionError(f"accepted {buf!r}")


def optee_seeds() -> Iterator[bytes]:
    arg = MsgArg(tee_abi.CMD_INVOKE_COMMAND, 7, 3, 9, 0xFFFF0006, 4,
                 [Param(tee_abi.ATTR_TYPE_VALUE_INOUT, 1, 2, 3),
                  Param(tee_abi.ATTR_TYPE_TMEM_INPUT | tee_abi.ATTR_NONCONTIG, 5, 6)])
    yield b"\x04" + pack_msg_arg(arg)


def optee_pagelist_seeds() -> Iterator[bytes]:
    ram = CheckedRam()
    ram.put_list(1, [TEE_BASE + 10 * 4096, TEE_BASE + 5 * 4096])
    yield _PAGELIST_HEAD.pack(TEE_BASE + 4096 + 100, 5000, 129) + bytes(ram.ram[:3 * 4096])


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("wire", wire, (ProtocolError,), wire_seeds),
    Target("config", config, (ConfigError,), config_seeds),
    Target("memshare", memshare, (), memshare_seeds),
    Target("state", state, (ValueError,), state_seeds),
    Target("ffa-descriptor", ffa_descriptor, (FfaError,), ffa_descriptor_seeds),
    Target("optee-arg", optee_arg, (MsgError,), optee_seeds),
    Target("optee-pagelist", optee_pagelist, (MsgError,), optee_pagelist_seeds),
)}

__all__ = ["TARGETS", "Target"]
