"""The tee-proxy handler's options, checked through :class:`Section` so a bad
one names file:line:key, and the backend they describe."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config.diagnostics import Section
from .backend import Backend
from .optee_host import OpteeHostBackend
from .shm import Limits
from .socket_backend import SocketBackend

BACKENDS = ("socket", "optee-host")
KEYS = ("client_id", "backend", "socket", "device", "allow_shared_host_tee", "shared_pages", "pages_per_buffer",
        "buffers", "max_calls", "max_call_bytes", "slice_ms", "call_timeout_ms", "backend_timeout_ms")


@dataclass(frozen=True, slots=True)
class TeeOptions:
    client_id: int = 1
    backend: str = "socket"
    socket: str | None = None
    device: str = "/dev/tee0"
    #: optee-host only: the host's OP-TEE keeps VMs apart (built with virtualization).
    allow_shared_host_tee: bool = False
    limits: Limits = field(default_factory=Limits)
    #: Memref bytes one call may move in and out (registered buffers included).
    max_call_bytes: int = 4 << 20
    #: How long a call waits on the backend before the guest gets a foreign interrupt.
    slice_ms: int = 100
    #: How long a call may wait on the backend in all before it fails with COMMUNICATION.
    call_timeout_ms: int = 30_000
    #: Connecting, hello, VM_CREATED / VM_DESTROYED.
    backend_timeout_ms: int = 300


def parse_options(s: Section) -> TeeOptions:
    s.allow_keys(KEYS)
    d = TeeOptions()
    backend = s.string("backend", default=d.backend, choices=BACKENDS)
    socket = s.string("socket", default=None)
    if backend == "socket" and socket is None:
        s.problem("socket", "is required with backend: socket (the TEE service's UNIX socket)", mark=s.data.mark)
    limits = Limits(
        shared_pages=s.integer("shared_pages", default=d.limits.shared_pages, lo=1, hi=1 << 20),
        pages_per_buffer=s.integer("pages_per_buffer", default=d.limits.pages_per_buffer, lo=1, hi=1 << 16),
        buffers=s.integer("buffers", default=d.limits.buffers, lo=1, hi=4096),
        max_calls=s.integer("max_calls", default=None, lo=1, hi=1024),
    )
    slice_ms = s.integer("slice_ms", default=d.slice_ms, lo=1, hi=10_000)
    call_timeout_ms = s.integer("call_timeout_ms", default=d.call_timeout_ms, lo=1, hi=3_600_000)
    if slice_ms > call_timeout_ms:
        s.problem("slice_ms", f"must not be longer than call_timeout_ms ({call_timeout_ms})")
    return TeeOptions(
        client_id=s.integer("client_id", lo=1, hi=0xFFFF),
        backend=backend,
        socket=socket,
        device=s.string("device", default=d.device),
        allow_shared_host_tee=s.flag("allow_shared_host_tee", d.allow_shared_host_tee),
        limits=limits,
        max_call_bytes=s.integer("max_call_bytes", default=d.max_call_bytes, lo=4096, hi=1 << 30),
        slice_ms=slice_ms,
        call_timeout_ms=call_timeout_ms,
        backend_timeout_ms=s.integer("backend_timeout_ms", default=d.backend_timeout_ms, lo=1, hi=60_000),
    )


def make_backend(opts: TeeOptions) -> Backend:
    if opts.backend == "optee-host":
        return OpteeHostBackend(opts.device, allow_shared=opts.allow_shared_host_tee)
    assert opts.socket is not None  # parse_options insists
    return SocketBackend(opts.socket, connect_timeout=opts.backend_timeout_ms / 1000)


__all__ = ["BACKENDS", "TeeOptions", "make_backend", "parse_options"]
