"""A VM's state directory: the compacted snapshot and the write-ahead journal.

Layout of ``<state.dir>/<vm>/``::

    snapshot.json   the state document (hvcproxyd.core.state) plus the replay
                    window and "journal_gen": G, replaced atomically
    journal.G       every record since that snapshot; journal.G+1 while a
                    compaction is writing snapshot G+1

Loading reads the snapshot (gen G, or none: 0), then journal.G, journal.G+1, ...
while they exist, dropping a damaged tail with a log line.  A compaction first
starts journal.G+1, then writes snapshot G+1 (temp, fsync, rename, fsync of the
directory), then removes journal.G, so a crash at any step loads the same state.

Durability: a record is written (``write(2)``, so it survives the daemon's
death) when it is appended, before the reply that reveals it is even built into
a frame; the fsync policy says when it also survives the host's:

- ``always``: fsync in ``append``, on the event loop, one per record;
- ``batch``: one fsync in a worker thread covers every record written before it
  started (group commit); replies wait for it (:meth:`Journal.settle`);
- ``never``: no fsync (the page cache only).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..core import state
from ..core.service import VmService
from ..errors import HvcproxydError
from .records import MAGIC, frame, scan

log = logging.getLogger("hvcproxyd.durable")

SNAPSHOT = "snapshot.json"
#: The journal is compacted into a new snapshot once it grows past this.
COMPACT_BYTES = 16 << 20


class Fsync(enum.Enum):
    ALWAYS = "always"
    BATCH = "batch"
    NEVER = "never"


class DurableError(HvcproxydError):
    """The state directory cannot be used (missing, read-only, full), or what it
    holds cannot be loaded; the daemon does not serve a VM it would forget."""


def vm_dir(base: Path, vm: str) -> Path:
    return base / vm


def _journal_path(path: Path, gen: int) -> Path:
    return path / f"journal.{gen}"


def _gen_of(name: str) -> int | None:
    stem, _, gen = name.partition(".")
    return int(gen) if stem == "journal" and gen.isdigit() else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old file or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def prepare(path: Path) -> None:
    """Create the VM's state directory if need be and prove it takes a synced
    write; DurableError names why not (missing parent, read-only, full)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise DurableError(f"state directory {path} cannot be created: {err.strerror}") from err
    probe = path / ".probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as err:
        raise DurableError(f"state directory {path} cannot be written: {err.strerror}") from err


class Loaded:
    """What a state directory holds: the snapshot (None if there is none yet),
    the journal records after it, the generation of the last journal read, and
    the journal files (for removal once compacted)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        self.gen = 0
        self.files: list[Path] = []


def load(path: Path) -> Loaded:
    """Read snapshot and journal; DurableError for a snapshot that cannot be
    read (it was written whole, so damage there is not a torn write)."""
    out = Loaded(path)
    snap = path / SNAPSHOT
    try:
        data = snap.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as err:
        raise DurableError(f"cannot read {snap}: {err.strerror}") from err
    if data is not None:
        try:
            out.doc = state.decode(data)
        except state.StateError as err:
            raise DurableError(f"{snap}: {err}") from err
        gen = out.doc.get("journal_gen", 0)
        if not isinstance(gen, int) or gen < 0:
            raise DurableError(f"{snap}: journal_gen {gen!r} is not a generation")
        out.gen = gen
    try:
        names = os.listdir(path)
    except OSError as err:
        raise DurableError(f"cannot list {path}: {err.strerror}") from err
    gens = sorted(g for g in map(_gen_of, names) if g is not None)
    out.files = [_journal_path(path, g) for g in gens]
    gen = out.gen
    while gen in gens:
        jpath = _journal_path(path, gen)
        try:
            found = scan(jpath.read_bytes())
        except OSError as err:
            raise DurableError(f"cannot read {jpath}: {err.strerror}") from err
        if found.problem is not None:
            log.warning("%s: %s; the %d record(s) before it are kept, the rest is dropped", jpath, found.problem,
                        len(found.records))
        out.records.extend(found.records)
        out.gen = gen
        gen += 1
    return out


class Journal:
    """The VM service's :class:`~hvcproxyd.core.service.StateSink` and the VMM
    transport's barrier: records in, replies held until those before them are
    durable.  ``on_failure`` is told when a write fails (the daemon stops: a
    reply it could not make durable is never sent)."""

    def __init__(self, path: Path, vm: VmService, policy: Fsync = Fsync.BATCH, *,
                 compact_bytes: int = COMPACT_BYTES, on_failure: Callable[[BaseException], object] | None = None
                 ) -> None:
        self.path = path
        self.vm = vm
        self.policy = policy
        self.compact_bytes = compact_bytes
        self.on_failure = on_failure
        self.gen = 0
        self._fd = -1
        self._size = 0
        self._written = 0  # records appended, ever
        self._synced = 0  # of them, known durable
        self._syncing: trio.Event | None = None
        self._compact = trio.Event()
        self.failed: BaseException | None = None
        #: For status and the bench.
        self.records = 0
        self.fsyncs = 0
        self.compactions = 0

    # -- start-up
    def open(self) -> None:
        """Load the directory into the VM service, then compact at once (so the
        journal starts empty and a damaged tail is gone); DurableError if the
        state cannot be taken."""
        prepare(self.path)
        loaded = load(self.path)
        try:
            self.vm.resume(loaded.doc, loaded.records)
        except state.StateError as err:
            raise DurableError(f"the state in {self.path} cannot be restored: {err}; move the directory aside "
                               f"to start this VM afresh, or `hvcproxyd state import` a state it can take") from err
        if loaded.doc is not None or loaded.records:
            log.info("%s: state restored from %s (%d journal record(s))", self.vm.config.name, self.path,
                     len(loaded.records))
        self.gen = loaded.gen + 1
        self._start_journal(self.gen)
        self._write_snapshot(self._document(self.gen))
        for old in loaded.files:
            old.unlink(missing_ok=True)
        self.vm.sink = self

    def _document(self, gen: int) -> Callable[[], dict[str, Any]]:
        """The durable document as it is now, built when called (in a thread)."""
        build = self.vm.frozen_durable_document()
        return lambda: {**build(), "journal_gen": gen}

    def _start_journal(self, gen: int) -> None:
        path = _journal_path(self.path, gen)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
            os.write(fd, MAGIC)
            if self.policy is not Fsync.NEVER:
                os.fsync(fd)
                fsync_dir(self.path)
        except OSError as err:
            raise DurableError(f"cannot start journal {path}: {err.strerror}") from err
        old, self._fd, self._size = self._fd, fd, len(MAGIC)
        if old >= 0:
            os.close(old)

    def _write_snapshot(self, build: Callable[[], dict[str, Any]]) -> None:
        """Build, encode and write the snapshot: in a thread but at start-up and stop."""
        try:
            write_atomic(self.path / SNAPSHOT, state.encode_frozen(build), sync=self.policy is not Fsync.NEVER)
        except OSError as err:
            raise DurableError(f"cannot write {self.path / SNAPSHOT}: {err.strerror}") from err

    # -- the sink
    def append(self, record: dict[str, Any]) -> None:
        if self.failed is not None:
            raise DurableError(f"the journal failed earlier: {self.failed}")
        data = frame(record)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            if self.policy is Fsync.ALWAYS:
                os.fsync(self._fd)
                self.fsyncs += 1
        except OSError as err:
            self._fail(DurableError(f"cannot write journal {_journal_path(self.path, self.gen)}: {err.strerror}"))
            raise self.failed from err  # type: ignore[misc]
        self._written += 1
        self.records += 1
        if self.policy is not Fsync.BATCH:
            self._synced = self._written
        self._size += len(data)
        if self._size > self.compact_bytes:
            self._compact.set()

    def _fail(self, err: DurableError) -> None:
        self.failed = err
        log.error("%s: %s; stopping rather than answering what is not durable", self.vm.config.name, err)
        if self.on_failure is not None:
            self.on_failure(err)

    # -- the barrier
    def pending(self) -> bool:
        """Records written that are not durable yet (a reply must not leave)."""
        return self._synced < self._written

    async def settle(self) -> None:
        """Return once every record appended before this call is durable; one
        fsync serves every caller that arrives while it runs (group commit)."""
        target = self._written
        while self._synced < target:
            if self.failed is not None:
                raise self.failed
            syncing = self._syncing
            if syncing is not None:
                await syncing.wait()
                continue
            syncing = self._syncing = trio.Event()
            upto, fd = self._written, self._fd
            try:
                await trio.to_thread.run_sync(os.fsync, fd)
            except OSError as err:
                self._fail(DurableError(f"cannot fsync the journal: {err.strerror}"))
                raise self.failed from err  # type: ignore[misc]
            finally:
                self._syncing = None
                syncing.set()
            self.fsyncs += 1
            self._synced = max(self._synced, upto)

    # -- compaction
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Compact whenever the journal has grown past ``compact_bytes``."""
        task_status.started()
        while True:
            await self._compact.wait()
            self._compact = trio.Event()
            await self.compact()

    def compact_soon(self) -> None:
        """Ask for a compaction (a reload changed the handler set or the ABI: the
        next snapshot should describe the config now in force)."""
        self._compact.set()

    async def compact(self) -> None:
        """Snapshot the state into snapshot G+1 and start journal G+1.  The state
        is taken and the journal switched in one step on the event loop, so no
        record falls between them; encoding and writing run in a thread."""
        # Every record of the old journal durable, and no fsync of it still running
        # (its fd is closed at the switch), with no checkpoint before the switch.
        while self.pending() or self._syncing is not None:
            if self._syncing is not None:
                await self._syncing.wait()
            else:
                await self.settle()
        gen, old = self.gen, _journal_path(self.path, self.gen)
        build = self._document(gen + 1)  # O(small) on the loop: the walk is in the thread
        try:
            self._start_journal(gen + 1)
        except DurableError as err:
            self._fail(err)
            raise
        self.gen = gen + 1
        try:
            await trio.to_thread.run_sync(self._write_snapshot, build)
        except DurableError as err:
            self._fail(err)
            raise
        old.unlink(missing_ok=True)
        self.compactions += 1

    def close(self) -> None:
        """A clean stop (SIGTERM): compact synchronously, so the next start reads one file."""
        if self._fd < 0:
            return
        if self.failed is None:
            try:
                old = _journal_path(self.path, self.gen)
                self._write_snapshot(self._document(self.gen + 1))
                old.unlink(missing_ok=True)
            except (DurableError, OSError) as err:
                log.error("%s: final compaction failed (the journal stays, and is read at start): %s",
                          self.vm.config.name, err)
        os.close(self._fd)
        self._fd = -1
        self.vm.sink = None

    def report(self) -> dict[str, Any]:
        return {"dir": str(self.path), "fsync": self.policy.value, "generation": self.gen,
                "journal_bytes": self._size, "records": self.records, "fsyncs": self.fsyncs,
                "compactions": self.compactions}


__all__ = ["COMPACT_BYTES", "SNAPSHOT", "DurableError", "Fsync", "Journal", "Loaded", "fsync_dir", "load",
           "prepare", "vm_dir", "write_atomic"]
