"""A VM's guest-visible state as one versioned, self-describing document.

The same document carries a VM's state through a live migration (the QEMU
forwarder fetches it from the source daemon and hands it to the destination's
before the destination's vCPUs run), through ``savevm``/``loadvm``, and through
the journal's compacted snapshots.  It names its format and version, the VM,
each handler's type and state, and the *guest ABI*: what the guest has seen and
relies on (the forwarded ranges, each service's version), which a destination
must match exactly or refuse the state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from .handler import Handler, Notes
from .vmconfig import VmConfig

FORMAT: Final = "hvcproxyd-vm-state"
#: Bumped when a reader of the previous version could misread the new one; a
#: reader accepts every version up to its own and refuses newer ones by name.
VERSION: Final = 1


class StateError(ValueError):
    """A state document that cannot be applied here: malformed, from a newer
    release, or describing a guest ABI this VM's config does not give."""


def guest_abi(config: VmConfig, instances: Mapping[str, Handler]) -> dict[str, Any]:
    """What the guest relies on, as plain data that compares with ``==``."""
    return {
        "filter": [[r.base, r.base + r.count - 1, int(r.action)] for r in config.table.filter_ranges()],
        "handlers": {name: {"type": config.handlers[name].type_name, **inst.guest_abi()}
                     for name, inst in instances.items()},
    }


def document(config: VmConfig, instances: Mapping[str, Handler]) -> dict[str, Any]:
    """The whole state of a VM now; every handler's :meth:`Handler.snapshot`."""
    return frozen_document(config, instances)()


def frozen_document(config: VmConfig, instances: Mapping[str, Handler]) -> Callable[[], dict[str, Any]]:
    """The state of a VM as it is now, built later (in a thread, off the event loop)
    from each handler's :meth:`Handler.frozen_snapshot`."""
    head = {
        "format": FORMAT,
        "version": VERSION,
        "vm": config.name,
        "created": round(time.time(), 6),
        "abi": guest_abi(config, instances),
    }
    parts = {name: inst.frozen_snapshot() for name, inst in instances.items()}
    return lambda: {**head, "handlers": {name: build() for name, build in parts.items()}}


#: Items of a list json.dumps encodes at once: a few ms of holding the GIL.
_CHUNK = 4096


def encode(doc: Mapping[str, Any]) -> bytes:
    """The document as compact JSON with sorted keys, the same bytes json.dumps
    gives.  Built a piece at a time so that, run in a thread, it lets the event
    loop run between pieces: json.dumps holds the GIL for the whole of what it
    encodes (seconds for a ledger of millions of ranges, bench/ledger_bench.py)."""
    out: list[str] = []
    _encode(doc, out)
    return "".join(out).encode()


def encode_frozen(build: Callable[[], dict[str, Any]]) -> bytes:
    """Build a document from :func:`frozen_document` and encode it, in the calling
    thread, then take its long lists apart a piece at a time: freed at once,
    millions of ranges are one deallocation of 0.3 s that holds the GIL.  Only
    the handlers' part, which :meth:`Handler.frozen_snapshot` makes the
    document's own; the rest may share data with the live state."""
    doc = build()
    try:
        return encode(doc)
    finally:
        _take_apart(doc.get("handlers"))


def _take_apart(value: object) -> None:
    """Empty, a chunk at a time, every list longer than a chunk inside ``value``."""
    if isinstance(value, dict):
        for item in value.values():
            _take_apart(item)
    elif isinstance(value, list):
        if len(value) > _CHUNK:
            while value:
                del value[-_CHUNK:]
        else:
            for item in value:
                _take_apart(item)


def _encode(value: object, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            name = key if isinstance(key, str) else json.dumps(key)  # as json.dumps names a non-str key
            out.append(("," if i else "") + json.dumps(name) + ":")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, list) and len(value) > _CHUNK:
        out.append("[")
        for i in range(0, len(value), _CHUNK):
            piece = json.dumps(value[i:i + _CHUNK], separators=(",", ":"), sort_keys=True)
            out.append(("," if i else "") + piece[1:-1])
        out.append("]")
    else:
        out.append(json.dumps(value, separators=(",", ":"), sort_keys=True))


def decode(data: bytes) -> dict[str, Any]:
    """Parse and check the envelope; raises StateError naming what is wrong."""
    try:
        doc = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise StateError(f"not a state document: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"not a state document (no \"format\": {FORMAT!r})")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StateError(f"state document version {version!r} is not a positive integer")
    if version > VERSION:
        raise StateError(f"state document version {version} is newer than this hvcproxyd reads ({VERSION}): "
                         "import it with the release that wrote it, or a later one")
    for key, kind in (("vm", str), ("abi", dict), ("handlers", dict)):
        if not isinstance(doc.get(key), kind):
            raise StateError(f"state document has no {key!r} {kind.__name__}")
    return doc


def abi_differences(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between the source's ABI (``have``) and this
    VM's (``want``); empty when a guest could not tell the two apart."""
    out: list[str] = []
    if have.get("filter") != want.get("filter"):
        out.append(f"forwarded ranges differ: the state has {_ranges(have.get('filter'))}, "
                   f"this VM forwards {_ranges(want.get('filter'))}")
    theirs, ours = have.get("handlers", {}), want.get("handlers", {})
    if not isinstance(theirs, dict):
        return [*out, "the state's handler ABI is not a mapping"]
    for name in sorted(set(theirs) | set(ours)):
        if name not in ours:
            out.append(f"handler {name!r} is in the state but not in this VM's config")
        elif name not in theirs:
            out.append(f"handler {name!r} is in this VM's config but not in the state")
        elif theirs[name] != ours[name]:
            keys = sorted(k for k in set(theirs[name]) | set(ours[name])
                          if theirs[name].get(k) != ours[name].get(k))
            out.extend(f"handler {name!r}: {k} is {theirs[name].get(k)!r} in the state, "
                       f"{ours[name].get(k)!r} here" for k in keys)
    return out


def _ranges(ranges: object) -> str:
    if not isinstance(ranges, list):
        return repr(ranges)
    actions = {0: "handle", 1: "deny", 2: "forward"}
    return ", ".join(f"{r[0]:#010x}-{r[1]:#010x} {actions.get(r[2], r[2])}" for r in ranges
                     if isinstance(r, list) and len(r) == 3 and all(isinstance(v, int) for v in r)) or "nothing"


def restore_all(instances: Mapping[str, Handler], states: Mapping[str, Any],
                on_notes: Callable[[str, Notes], None]) -> None:
    """Give every handler its state from ``states``, all or nothing.

    A handler's :meth:`Handler.restore` changes nothing when it refuses, so on a
    refusal the handlers already restored are put back from the snapshots taken
    first; the VM is then exactly as before.  Every restore's notes (the rollback's
    too) go to ``on_notes`` so sidecars follow."""
    before = {name: inst.snapshot() for name, inst in instances.items() if name in states}
    done: list[str] = []
    for name, inst in instances.items():
        if name not in states:
            continue
        try:
            on_notes(name, inst.restore(states[name]))
        except ValueError as err:
            for back in done:
                on_notes(back, instances[back].restore(before[back]))
            raise StateError(f"handler {name!r} refused its state: {err}") from err
        done.append(name)


__all__ = ["FORMAT", "VERSION", "StateError", "abi_differences", "decode", "document", "encode", "guest_abi",
           "restore_all"]
