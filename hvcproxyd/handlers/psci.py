"""PSCI in userspace: PSCI 0.2 to 1.3 (Arm DEN0022) with per-vCPU power state.

With KVM's SMCCC filter forwarding both PSCI ranges, this handler takes over
what arch/arm64/kvm/psci.c would do, so an operator can offer a PSCI version
the host kernel does not have, or watch and control power events.  Where the
spec leaves a choice it answers as KVM does; docs/handlers/psci.md lists the
few places it differs and why.

Shape (after KVM's psci.c): one table from function ID to the version that
introduced it (``psci_defs.SINCE``) gates every call, one flat dispatch maps
the ID to its operation, and the SMC32 variants are narrowed to 32 bits before
they share the 64-bit code.  Guest mistakes are PSCI codes in x0; exceptions
mean a bug or a missing VMM, and the daemon turns them into INTERNAL_FAILURE
through :meth:`PsciHandler.failure`.

Power state is ON, OFF or ON_PENDING per vCPU.  CPU_ON makes its target
ON_PENDING until the VMM confirms the power-on effect; nothing in ``handle``
awaits, so each call sees and updates the table atomically with respect to
the other vCPUs' calls.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from ..config.diagnostics import Section
from ..smccc import MASK32, SMC64, routing_id
from ..wire import EFFECT_AARCH64, MPIDR_AFF_MASK, EventKind, VmEvent
from . import Call, Effect, EffectKind, Handler, Notes, Result, VmContext
from .psci_defs import (
    AFF_SHIFTS,
    DEFAULT_VERSION,
    EFFECT_OFF_HIBERNATE,
    EFFECT_OFF_PLAIN,
    EFFECT_RESET_COLD,
    EFFECT_RESET_WARM,
    EXT_STATE_TYPE,
    EXT_VALID_MASK,
    FEATURE_EXTENDED_STATE_ID,
    MAX_AFFINITY_LEVEL,
    OFF2_HIBERNATE,
    OFF2_TYPES_SUPPORTED,
    ORIG_STATE_TYPE,
    ORIG_VALID_MASK,
    RESET2_VENDOR,
    RESET2_WARM,
    SINCE,
    SMCCC_VERSION_FN,
    TOS_NOT_PRESENT_MP,
    V1_0,
    VERSIONS,
    Fn,
    Power,
    Ret,
    Version,
)

CpuSuspendMode = Literal["standby-only", "full"]
StateIdFormat = Literal["original", "extended"]
CPU_SUSPEND_MODES: Final = ("standby-only", "full")
STATE_ID_FORMATS: Final = ("original", "extended")
SNAPSHOT_FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class PsciOptions:
    """A ``psci`` handler's ``options:``; the defaults are what KVM offers a guest."""

    #: None: the VM's pinned ``versions.psci``, else 1.3 (current KVM's default).
    version: Version | None = None
    #: KVM offers SYSTEM_SUSPEND only when the VMM enables KVM_CAP_ARM_SYSTEM_SUSPEND.
    allow_system_suspend: bool = False
    #: KVM passes vendor SYSTEM_RESET2 types (bit 31 set) on to the VMM.
    allow_reset2_vendor_types: bool = True
    #: standby-only: every CPU_SUSPEND returns at once, as KVM's WFI does; full:
    #: powerdown states resume at their entry point through a CPU_SUSPEND effect.
    cpu_suspend: CpuSuspendMode = "standby-only"
    #: The power_state format PSCI_FEATURES(CPU_SUSPEND) announces (KVM: original).
    power_state_format: StateIdFormat = "original"


#: An operation gets the call and x1..x3, already narrowed for an SMC32 function.
Op = Callable[["PsciHandler", Call, int, int, int], Result]

_AFFINITY_LEVEL_MASKS: Final = tuple(MPIDR_AFF_MASK & ~((1 << s) - 1) for s in AFF_SHIFTS)


def _ret(code: Ret, *, effects: tuple[Effect, ...] = ()) -> Result:
    if effects:
        return Result.of(code, effects=effects)
    return _PLAIN[code]  # Results are immutable: one per code, not one per call


_PLAIN: Final[dict[int, Result]] = {code: Result.of(code) for code in Ret}
_VERSION_RESULTS: dict[int, Result] = {}


class PsciHandler(Handler):
    """PSCI 0.2/1.0/1.1/1.2/1.3 for one VM; see the module docstring."""

    SERVICES = {"psci": tuple(VERSIONS)}
    inline = True  # state and guest-RAM bounds checks only, nothing that waits
    #: The delta is the whole (small) snapshot; what the hook saves is building and
    #: comparing one after every PSCI_VERSION or AFFINITY_INFO (see take_delta).
    JOURNAL_DELTAS = True

    def __init__(self, name: str, options: PsciOptions | None, vm: VmContext) -> None:
        super().__init__(name, options if options is not None else PsciOptions(), vm)
        self.options: PsciOptions
        #: vCPU index -> power state.  Empty until a VMM attaches.
        self.power: dict[int, Power] = {}
        #: The vCPUs a VM reset powers on: those on at a fresh handshake.
        self.boot: frozenset[int] = frozenset()
        #: The CPU_ON effect each target's power-on waits for.  A confirmation of an
        #: older one (the target ran, turned off and was turned on again before it
        #: arrived) must not settle the newer power-on.
        self._power_ons: dict[int, Effect] = {}
        #: vCPUs that called CPU_OFF and whose CPU_OFF effect the VMM has not
        #: confirmed: a VMM that reconnects still calling them on has not seen the
        #: reply yet, which it will have replayed (protocol §5), so they stay off.
        self._going_off: set[int] = set()
        #: (power, boot, going off) as last journaled; None before the first time.
        self._journaled: tuple[dict[int, Power], frozenset[int], frozenset[int]] | None = None

    # ------------------------------------------------------------ configuration
    @classmethod
    def parse_options(cls, section: Section) -> PsciOptions:
        section.allow_keys(("version", "allow_system_suspend", "allow_reset2_vendor_types", "cpu_suspend",
                            "power_state_format"))
        version_text = section.string("version", default=None, choices=tuple(VERSIONS))
        fmt = section.string("power_state_format", default="original", choices=STATE_ID_FORMATS)
        version = VERSIONS[version_text] if version_text is not None else None
        if fmt == "extended" and version is not None and version < V1_0:
            section.problem("power_state_format", f"the extended StateID format needs PSCI 1.0 or later; "
                                                  f"version is {version}")
        return PsciOptions(
            version=version,
            allow_system_suspend=section.flag("allow_system_suspend", False),
            allow_reset2_vendor_types=section.flag("allow_reset2_vendor_types", True),
            cpu_suspend=section.string("cpu_suspend", default="standby-only", choices=CPU_SUSPEND_MODES),
            power_state_format=fmt,
        )

    @classmethod
    def provided_versions(cls, options: Any, service: str) -> tuple[str, ...]:
        """An explicit ``version`` option is the only one offered, so a different pin
        fails ``hvcproxyd check``; the extended StateID format rules out 0.2."""
        if service != "psci":
            return ()
        opts = options if isinstance(options, PsciOptions) else PsciOptions()
        if opts.version is not None:
            return (str(opts.version),)
        return tuple(text for text, v in VERSIONS.items()
                     if opts.power_state_format == "original" or v >= V1_0)

    @property
    def version(self) -> Version:
        """Read per call: a live reload updates the VM's pinned versions after the
        new instance is built."""
        if self.options.version is not None:
            return self.options.version
        return VERSIONS.get(self.vm.versions.get("psci", ""), DEFAULT_VERSION)

    def offers(self, fid: int) -> bool:
        """Whether ``fid`` is implemented at this version with these options."""
        since = SINCE.get(fid)
        if since is None or self.version < since:
            return False
        if fid in (Fn.SYSTEM_SUSPEND, Fn.SYSTEM_SUSPEND_64):
            # Offered only if the VMM can carry it out: QEMU cannot, and a guest
            # told it exists would try it and get NOT_SUPPORTED at suspend time.
            return self.options.allow_system_suspend and self.vm.vmm_performs(EffectKind.SYSTEM_SUSPEND)
        return True

    # ------------------------------------------------------------ calls
    async def handle(self, call: Call) -> Result:
        return self.dispatch(call)

    def dispatch(self, call: Call) -> Result:
        """The whole call, synchronously: what ``handle`` answers."""
        fid = routing_id(call.func_id)
        self._note_running(call.vcpu)
        # KVM refuses every SMC64 PSCI function to an AArch32 caller before anything else.
        if fid & SMC64 and call.aarch32:
            return _ret(Ret.NOT_SUPPORTED)
        op = _OPS.get(fid)
        if op is None or not self.offers(fid):
            return _ret(Ret.NOT_SUPPORTED)
        x1, x2, x3 = call.args[0], call.args[1], call.args[2]
        if not fid & SMC64:
            # SMC32 arguments are w registers (DEN0028); KVM narrows the same three.
            x1, x2, x3 = x1 & MASK32, x2 & MASK32, x3 & MASK32
        return op(self, call, x1, x2, x3)

    def failure(self, call: Call) -> Result:
        return _ret(Ret.INTERNAL_FAILURE)

    def _psci_version(self, call: Call, x1: int, x2: int, x3: int) -> Result:
        encoded = self.version.encoded
        result = _VERSION_RESULTS.get(encoded)
        if result is None:
            result = _VERSION_RESULTS[encoded] = Result.of(encoded)
        return result

    def _cpu_suspend(self, call: Call, power_state: int, entry: int, context: int) -> Result:
        # power_state is a uint32 in both variants (DEN0022 §5.4.2).
        power_state &= MASK32
        if self.options.power_state_format == "extended":
            valid, powerdown = EXT_VALID_MASK, bool(power_state & EXT_STATE_TYPE)
        else:
            valid, powerdown = ORIG_VALID_MASK, bool(power_state & ORIG_STATE_TYPE)
        if power_state & ~valid:
            return _ret(Ret.INVALID_PARAMETERS)  # reserved bits set (§5.4.2)
        if not powerdown or self.options.cpu_suspend == "standby-only":
            # Standby returns on a wake-up event, and an implementation may serve a
            # powerdown request with a shallower state (§5.4.2); KVM does both as a WFI.
            # The VMM does the waiting: it has the interrupts.
            return _ret(Ret.SUCCESS, effects=(Effect(EffectKind.CPU_STANDBY, call.vcpu),))
        if not self._executable(entry, call.aarch32):
            return _ret(Ret.INVALID_ADDRESS)
        # x0 stays SUCCESS: what a caller woken early, before the state is entered, reads.
        return _ret(Ret.SUCCESS, effects=(Effect(EffectKind.CPU_SUSPEND, call.vcpu, entry, context),))

    def _cpu_off(self, call: Call, x1: int, x2: int, x3: int) -> Result:
        # CPU_OFF's only error is DENIED for a core hosting a UP trusted OS (§5.5);
        # there is none (MIGRATE_INFO_TYPE = 2).  Turning off the last running vCPU
        # is allowed, as in KVM: the VM idles until it is reset.
        self.power[call.vcpu] = Power.OFF
        self._going_off.add(call.vcpu)
        if all(state is Power.OFF for state in self.power.values()):
            self.log.warning("vCPU %d turned itself off and no vCPU is left on; the VM idles until it is reset",
                             call.vcpu)
        # Success does not return.  DENIED is what the guest reads only if the VMM
        # resumes it without stopping it, the one error CPU_OFF may give.
        return _ret(Ret.DENIED, effects=(Effect(EffectKind.CPU_OFF, call.vcpu),))

    def _cpu_on(self, call: Call, target: int, entry: int, context: int) -> Result:
        if target & ~MPIDR_AFF_MASK:
            return _ret(Ret.INVALID_PARAMETERS)  # bits outside Aff3..Aff0 (§5.6, as KVM)
        index = self.vm.vcpu_by_mpidr(target)
        if index is None:
            return _ret(Ret.INVALID_PARAMETERS)
        state = self.power[index]
        if state is Power.ON:
            return _ret(Ret.ALREADY_ON)
        if state is Power.ON_PENDING:
            return _ret(Ret.ON_PENDING)
        if not self._executable(entry, call.aarch32):
            return _ret(Ret.INVALID_ADDRESS)
        self.power[index] = Power.ON_PENDING
        self._going_off.discard(index)
        # The target starts at the highest non-secure EL the machine implements, as
        # QEMU's own PSCI and TF-A do (an nVHE or pKVM Linux calls CPU_ON from EL1 and
        # expects its secondaries at EL2), in the caller's execution state.
        effect = Effect(EffectKind.CPU_ON, index, entry, context, self.vm.highest_el,
                        0 if call.aarch32 else EFFECT_AARCH64)
        self._power_ons[index] = effect
        self.log.debug("vCPU %d: CPU_ON of vCPU %d at %#x", call.vcpu, index, entry)
        return _ret(Ret.SUCCESS, effects=(effect,))

    def _affinity_info(self, call: Call, target: int, level: int, x3: int) -> Result:
        if target & ~MPIDR_AFF_MASK or level > MAX_AFFINITY_LEVEL:
            return _ret(Ret.INVALID_PARAMETERS)
        mask = _AFFINITY_LEVEL_MASKS[level]
        states = {self.power[v.index] for v in self.vm.vcpus if v.mpidr & mask == target & mask}
        if not states:
            return _ret(Ret.INVALID_PARAMETERS)  # no such affinity instance (as KVM)
        # An instance is ON if any core in it is, ON_PENDING if one is on its way,
        # OFF only if all are (§5.7).  KVM has no ON_PENDING: its CPU_ON is synchronous.
        for state in (Power.ON, Power.ON_PENDING):
            if state in states:
                return Result.of(state)
        return Result.of(Power.OFF)

    def _migrate_info_type(self, call: Call, x1: int, x2: int, x3: int) -> Result:
        return Result.of(TOS_NOT_PRESENT_MP)

    def _system_off(self, call: Call, x1: int, x2: int, x3: int) -> Result:
        # Success does not return; KVM preloads INTERNAL_FAILURE for a VMM that
        # resumes the caller anyway, and so do we for every system-wide stop.
        return _ret(Ret.INTERNAL_FAILURE, effects=(Effect(EffectKind.SYSTEM_OFF, call.vcpu, arg=EFFECT_OFF_PLAIN),))

    def _system_reset(self, call: Call, x1: int, x2: int, x3: int) -> Result:
        return _ret(Ret.INTERNAL_FAILURE,
                    effects=(Effect(EffectKind.SYSTEM_RESET, call.vcpu, arg=EFFECT_RESET_COLD),))

    def _psci_features(self, call: Call, fid: int, x2: int, x3: int) -> Result:
        if fid & SMC64 and call.aarch32:
            return _ret(Ret.NOT_SUPPORTED)  # as the call itself would be
        if fid == SMCCC_VERSION_FN:
            return _ret(Ret.SUCCESS)
        if not self.offers(fid):
            return _ret(Ret.NOT_SUPPORTED)
        if fid in (Fn.CPU_SUSPEND, Fn.CPU_SUSPEND_64):
            # Feature flags: StateID format; OS-initiated mode is not offered.
            extended = self.options.power_state_format == "extended"
            return Result.of(FEATURE_EXTENDED_STATE_ID if extended else 0)
        if fid in (Fn.SYSTEM_OFF2, Fn.SYSTEM_OFF2_64):
            return Result.of(OFF2_TYPES_SUPPORTED)
        return _ret(Ret.SUCCESS)

    def _system_suspend(self, call: Call, entry: int, context: int, x3: int) -> Result:
        if any(state is not Power.OFF for index, state in self.power.items() if index != call.vcpu):
            return _ret(Ret.DENIED)  # every other core must be OFF (DEN0022 SYSTEM_SUSPEND)
        if not self._executable(entry, call.aarch32):
            return _ret(Ret.INVALID_ADDRESS)
        # As for CPU_SUSPEND, SUCCESS is what a caller woken before suspending reads.
        return _ret(Ret.SUCCESS, effects=(Effect(EffectKind.SYSTEM_SUSPEND, call.vcpu, entry, context),))

    def _system_reset2(self, call: Call, reset_type: int, cookie: int, x3: int) -> Result:
        reset_type &= MASK32  # a uint32 in both variants
        if reset_type == RESET2_WARM:
            arg = EFFECT_RESET_WARM
        elif reset_type & RESET2_VENDOR and self.options.allow_reset2_vendor_types:
            arg = reset_type
        else:
            # Architectural types other than warm reset are reserved, and a vendor
            # type this VM does not accept is not a valid type for it either.
            return _ret(Ret.INVALID_PARAMETERS)
        return _ret(Ret.INTERNAL_FAILURE,
                    effects=(Effect(EffectKind.SYSTEM_RESET, call.vcpu, context=cookie, arg=arg),))

    def _system_off2(self, call: Call, off_type: int, cookie: int, x3: int) -> Result:
        # PSCI 1.3 F.b: type 0 means HIBERNATE_OFF too, and the cookie must be zero.
        if off_type & MASK32 not in (0, OFF2_HIBERNATE) or cookie:
            return _ret(Ret.INVALID_PARAMETERS)
        return _ret(Ret.INTERNAL_FAILURE,
                    effects=(Effect(EffectKind.SYSTEM_OFF, call.vcpu, arg=EFFECT_OFF_HIBERNATE),))

    # ------------------------------------------------------------ helpers
    def _executable(self, entry: int, aarch32: bool) -> bool:
        """Whether an entry point's first instruction is where a vCPU can start:
        guest RAM, or ROM and flash (firmware, a kernel in flash), as KVM and QEMU
        accept.  For an AArch32 target bit 0 selects T32 and is not part of the
        address (KVM's vCPU reset and QEMU's arm_set_cpu_on() read it so); an
        AArch64 entry must be 4-byte aligned, or QEMU's arm_set_cpu_on() refuses
        to start the vCPU after the guest was told SUCCESS, and the guest waits
        for a CPU that never comes: INVALID_ADDRESS is the honest answer."""
        if not self.vm.attached:
            raise RuntimeError("PSCI call without a VM map: no VMM has attached")
        if not aarch32 and entry & 3:
            return False
        return self.vm.executable(entry & ~1 if aarch32 else entry, 4)

    def _note_running(self, vcpu: int) -> None:
        """A vCPU that calls is running.  ON_PENDING -> ON here covers a CALL from a
        new vCPU overtaking the EFFECT_DONE for its power-on (the protocol does not
        order them) and a VMM that does not confirm effects at all."""
        state = self.power.get(vcpu)
        if state is None:
            raise LookupError(f"PSCI call from vCPU {vcpu}, which the VMM's handshake did not list")
        if state is Power.OFF:
            self.log.warning("vCPU %d called while off in the power table; the VMM runs it, so it is on", vcpu)
        if state is not Power.ON:
            self.power[vcpu] = Power.ON

    # ------------------------------------------------------------ lifecycle
    def attach(self, reconnect: bool) -> Notes:
        if self.options.allow_system_suspend and not self.vm.vmm_performs(EffectKind.SYSTEM_SUSPEND):
            self.log.warning("allow_system_suspend is set, but the VMM does not carry out SYSTEM_SUSPEND "
                             "(its HELLO does not declare the effect): the guest is not offered it")
        view = {v.index: Power.ON if v.powered_on else Power.OFF for v in self.vm.vcpus}
        if not reconnect or set(view) != set(self.power):
            self.power = view
            self._power_ons.clear()
            self._going_off.clear()
            self.boot = frozenset(i for i, state in view.items() if state is Power.ON)
            return ()
        for index, theirs in view.items():
            ours = self.power[index]
            if ours is Power.ON_PENDING:
                # Its CPU_ON reply may still be replayed to the new connection
                # (protocol §5), so only an on vCPU settles it.
                if theirs is Power.ON:
                    self.power[index] = Power.ON
            elif ours is Power.OFF and index in self._going_off:
                pass  # its CPU_OFF reply is on its way (see _going_off)
            elif ours is not theirs:
                self.log.warning("vCPU %d is %s at reconnect, %s in the power table; taking the VMM's view",
                                 index, theirs.name, ours.name)
                self.power[index] = theirs
        return ()

    def effect_done(self, effect: Effect, status: int) -> Notes:
        if effect.kind is EffectKind.CPU_OFF:
            self._going_off.discard(effect.vcpu)
        if effect.kind is EffectKind.CPU_ON:
            awaited = self._power_ons.get(effect.vcpu)
            if awaited is not None and awaited is not effect:
                return ()  # an older power-on, already overtaken by the target's own calls
            self._power_ons.pop(effect.vcpu, None)
            # -EALREADY: the VMM found the target running (QEMU's arm_set_cpu_on()
            # ALREADY_ON / ON_PENDING); the daemon takes the VMM's word, so the two agree.
            running = status in (0, -errno.EALREADY)
            if self.power.get(effect.vcpu) is Power.ON_PENDING:
                self.power[effect.vcpu] = Power.ON if running else Power.OFF
            if status == -errno.EALREADY:
                self.log.warning("the VMM says vCPU %d was already on; recorded as on", effect.vcpu)
            elif status:
                self.log.warning("the VMM could not power on vCPU %d (status %d); it stays off", effect.vcpu, status)
        elif status == -errno.ESRCH and effect.kind is EffectKind.CPU_OFF:
            self.power[effect.vcpu] = Power.OFF  # the VMM found it off already: it is off either way
        elif status and effect.kind is EffectKind.CPU_OFF:
            if self.power.get(effect.vcpu) is Power.OFF:
                self.power[effect.vcpu] = Power.ON
            self.log.warning("the VMM could not power off vCPU %d (status %d); it is still on", effect.vcpu, status)
        elif status:
            self.log.warning("the VMM could not carry out %s for vCPU %d (status %d)", effect.kind.name,
                             effect.vcpu, status)
        return ()

    def event(self, event: VmEvent) -> Notes:
        if event.kind is EventKind.VM_RESET:
            # Protocol §3.9: the vCPUs are back in their reset state before any runs.
            self.power = {i: Power.ON if i in self.boot else Power.OFF for i in self.power}
            self._power_ons.clear()
            self._going_off.clear()
        elif event.kind is EventKind.VCPU_POWER:
            if event.vcpu not in self.power or event.arg not in (0, 1):
                self.log.warning("ignoring VCPU_POWER for vCPU %d with state %d", event.vcpu, event.arg)
                return ()
            self.power[event.vcpu] = Power.ON if event.arg else Power.OFF
            self._going_off.discard(event.vcpu)
        return ()

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {"format": SNAPSHOT_FORMAT,
                                "power": {str(i): state.name for i, state in sorted(self.power.items())},
                                "boot": sorted(self.boot)}
        if self._going_off:  # only then: a reader of the previous release need not know the key
            snap["going_off"] = sorted(self._going_off)
        return snap

    def take_delta(self) -> Any:
        """The snapshot if the power table changed since the journal last asked:
        comparing the table (a few hundred ns) instead of building a snapshot per call."""
        last = self._journaled
        if last is not None and last[0] == self.power and last[1] == self.boot and last[2] == self._going_off:
            return None
        self._journaled = (dict(self.power), self.boot, frozenset(self._going_off))
        return self.snapshot()

    def apply_delta(self, delta: Any) -> Notes:
        if not isinstance(delta, dict):
            raise ValueError(f"not a PSCI journal record: {type(delta).__name__}")
        return self.restore(delta)

    def guest_abi(self) -> dict[str, Any]:
        return {"version": str(self.version), "power_state_format": self.options.power_state_format,
                "system_suspend": self.options.allow_system_suspend, "cpu_suspend": self.options.cpu_suspend}

    def report(self) -> dict[str, Any]:
        """The power state of every vCPU as this handler holds it (ON_PENDING included)."""
        return {"vcpu_power": {i: state.name.lower() for i, state in sorted(self.power.items())},
                "version": str(self.version)}

    def restore(self, data: dict[str, Any]) -> Notes:
        """Raises ValueError, leaving the state as it was, if ``data`` is not a snapshot."""
        try:
            if data["format"] != SNAPSHOT_FORMAT:
                raise ValueError(f"unknown PSCI snapshot format {data['format']!r}")
            power = {int(i): Power[name] for i, name in data["power"].items()}
            boot = frozenset(int(i) for i in data["boot"])
            going_off = {int(i) for i in data.get("going_off", ())}
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a PSCI snapshot: {err!r}") from err
        if not boot <= set(power):
            raise ValueError("PSCI snapshot names boot vCPUs it has no power state for")
        if not going_off <= set(power):
            raise ValueError("PSCI snapshot names vCPUs going off it has no power state for")
        # A power-on in flight is not state: a confirmation for one is taken as it comes.
        self.power, self.boot, self._power_ons, self._going_off = power, boot, {}, going_off
        return ()


#: The flat dispatch: function ID -> operation.  Which IDs a VM may call is
#: decided by ``PsciHandler.offers`` (version and options) before this is used.
_OPS: Final[dict[int, Op]] = {
    Fn.PSCI_VERSION: PsciHandler._psci_version,
    Fn.CPU_SUSPEND: PsciHandler._cpu_suspend,
    Fn.CPU_SUSPEND_64: PsciHandler._cpu_suspend,
    Fn.CPU_OFF: PsciHandler._cpu_off,
    Fn.CPU_ON: PsciHandler._cpu_on,
    Fn.CPU_ON_64: PsciHandler._cpu_on,
    Fn.AFFINITY_INFO: PsciHandler._affinity_info,
    Fn.AFFINITY_INFO_64: PsciHandler._affinity_info,
    Fn.MIGRATE_INFO_TYPE: PsciHandler._migrate_info_type,
    Fn.SYSTEM_OFF: PsciHandler._system_off,
    Fn.SYSTEM_RESET: PsciHandler._system_reset,
    Fn.PSCI_FEATURES: PsciHandler._psci_features,
    Fn.SYSTEM_SUSPEND: PsciHandler._system_suspend,
    Fn.SYSTEM_SUSPEND_64: PsciHandler._system_suspend,
    Fn.SYSTEM_RESET2: PsciHandler._system_reset2,
    Fn.SYSTEM_RESET2_64: PsciHandler._system_reset2,
    Fn.SYSTEM_OFF2: PsciHandler._system_off2,
    Fn.SYSTEM_OFF2_64: PsciHandler._system_off2,
}

__all__ = ["PsciHandler", "PsciOptions"]
