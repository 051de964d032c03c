"""tee-proxy: an OP-TEE mediator in userspace (docs/handlers/tee-proxy.md).

Modules, one job each: :mod:`.abi` (constants), :mod:`.msgarg` (the argument
structure as bytes), :mod:`.shm` (page lists, buffers, limits),
:mod:`.translate` (guest message <-> backend message), :mod:`.handler` (the
guest-facing dispatcher and the RPC flow), :mod:`.lifecycle` (the sidecar that
sends VM_CREATED/VM_DESTROYED), :mod:`.backend` (the backend interface) with
:mod:`.socket_backend`, :mod:`.optee_host` and the reference TEE
(:mod:`.reftee`).
"""

from .handler import TeeProxyHandler

__all__ = ["TeeProxyHandler"]
