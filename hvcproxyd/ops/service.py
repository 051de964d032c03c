"""The daemon as ``hvcproxyd run`` runs it under systemd: a
:class:`~hvcproxyd.server.daemon.Daemon` composed with what an operator needs.

- systemd: READY=1 once every socket listens, STATUS= lines, WATCHDOG=1 from
  the event loop (a hung loop stops the pings and systemd restarts us),
  RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on SIGTERM;
- the VMM's credentials (SO_PEERCRED) against ``vmm.uid``/``vmm.gid``;
- the control socket (status, trace) and the metrics endpoint;
- per-call logging, only when ``log_calls`` or DEBUG asks for it.

Everything attaches through the daemon's hooks and the VM service's observers:
the daemon class is used as it is.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import trio

from ..core.service import Observer
from ..core.state import StateError
from ..core.vmconfig import VmConfig
from ..durable.store import DurableError
from ..errors import ExitCode, HvcproxydError
from ..server.daemon import Daemon, DaemonHooks, ReloadOutcome
from ..unixsock import set_group
from ..wire import Call, Reply
from .callview import CallView
from .control import ControlServer, TraceHub
from .logsetup import set_vm
from .metrics import registry_for, serve_metrics
from .peers import vmm_peer_problem
from .sdnotify import Notifier
from .status import status_line, status_of

log = logging.getLogger("hvcproxyd.service")
calls_log = logging.getLogger("hvcproxyd.calls")

#: How often STATUS= is refreshed when there is no watchdog to piggy-back on.
STATUS_INTERVAL = 5.0


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the unit's LimitNOFILE=), so
    connections exhaust the caps of our listeners long before the process's fds.
    Returns the (soft, hard) limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as err:
            log.debug("cannot raise the fd limit from %d to %d: %s", soft, hard, err)
            return soft, hard
        log.debug("fd limit raised from %d to %d", soft, hard)
        soft = hard
    else:
        log.debug("fd limit is %d", soft)
    return soft, hard


class Service:
    """One VM's daemon with systemd integration, the control socket and metrics."""

    def __init__(self, config: VmConfig, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()
        hooks = DaemonHooks(peer_check=self._check_peer)
        hooks.reloading.append(self.notifier.reloading)
        hooks.reloaded.append(self._reloaded)
        hooks.draining.append(lambda: self.notifier.notify(STOPPING=1, STATUS=f"{self.config.name}: stopping"))
        self.daemon = Daemon(config, hooks)
        self.hub = TraceHub(self.daemon.vm)
        self.last_reload: dict[str, Any] | None = None
        self.config_loaded = time.time()
        self.metrics_address: Any = None
        self.control: ControlServer | None = None
        self._call_logger: Observer | None = None
        self._set_call_logging()
        set_vm(config.name)

    @property
    def config(self) -> VmConfig:
        return self.daemon.config

    def _check_peer(self, pid: int, uid: int, gid: int) -> str | None:
        return vmm_peer_problem(self.config.vmm, uid, gid)

    # -- per-call logging
    def _set_call_logging(self) -> None:
        """Per-call records cost a CallView each: attach the observer only when they
        are wanted (``log_calls`` at INFO, or the calls logger at DEBUG)."""
        observers = self.daemon.vm.observers
        if self._call_logger is not None:
            observers.remove(self._call_logger)
            self._call_logger = None
        level = logging.INFO if self.config.log_calls else logging.DEBUG
        if not calls_log.isEnabledFor(level):
            return
        name = self.config.name

        def log_call(call: Call, reply: Reply, handler: str, seconds: float) -> None:
            view = CallView.of(call, reply, handler, seconds)
            calls_log.log(level, "%s: %s", name, view.summary(), extra={"hvc": view.journal_fields()})

        self._call_logger = log_call
        observers.append(log_call)

    # -- reload
    def _reloaded(self, outcome: ReloadOutcome) -> None:
        new = outcome.new
        if new is not None:
            old = outcome.old
            self.config_loaded = time.time()
            for key in ("control_socket", "metrics", "state"):
                if getattr(old, key) != getattr(new, key):
                    log.warning("%s: %s changed; it applies when the daemon restarts", new.name, key)
            if new.vmm.gid is not None and new.vmm.gid != old.vmm.gid:
                try:
                    set_group(new.socket, new.vmm.gid, "vmm.gid")
                except HvcproxydError as err:
                    log.error("%s: %s", new.name, err)
            self._set_call_logging()
        self.last_reload = {"time": time.time(), "ok": outcome.ok, "error": outcome.error, "path": str(outcome.path)}
        self.notifier.notify(READY=1, STATUS=status_line(self.daemon))

    # -- what it is doing
    def status(self) -> dict[str, Any]:
        return status_of(self.daemon, config_loaded=self.config_loaded, last_reload=self.last_reload,
                         metrics_address=self.metrics_address, hub=self.hub,
                         control_refused=self.control.refused if self.control is not None else 0)

    async def heartbeat(self) -> None:
        """WATCHDOG=1 from the event loop itself, and STATUS= when it changed."""
        watchdog = self.notifier.watchdog_s
        interval = max(watchdog / 2, 0.01) if watchdog else STATUS_INTERVAL
        last = ""
        while True:
            fields: dict[str, str | int] = {"WATCHDOG": 1} if watchdog else {}
            line = status_line(self.daemon)
            if line != last:
                fields["STATUS"] = last = line
            if fields:
                self.notifier.notify(**fields)
            await trio.sleep(interval)

    async def run(self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM/SIGINT or :meth:`stop`.  READY=1 goes out only once the
        VMM, control and metrics sockets all accept."""
        cfg = self.config
        raise_fd_limit()
        control = self.control = ControlServer(cfg.control_socket, cfg.name, self.status, self.hub)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.daemon.run)
            await nursery.start(control.serve)
            if cfg.metrics is not None:
                self.metrics_address = await nursery.start(serve_metrics, cfg.metrics,
                                                            registry_for(self.status, self.daemon.vm.stats))
            self.notifier.notify(READY=1, STATUS=status_line(self.daemon))
            log.info("%s: ready (control socket %s)", cfg.name, control.path)
            if self.notifier.enabled:
                nursery.start_soon(self.heartbeat)
            task_status.started(self)
            await self.daemon.stopped()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        self.daemon.stop()


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


def run_service(config: VmConfig) -> int:
    """The CLI's ``run``: serve, and turn a startup failure into one clear line
    and an exit status that says whether restarting could help (ExitCode)."""
    notifier = Notifier()
    problems: list[BaseException] = []
    try:
        trio.run(Service(config, notifier).run)
    except* HvcproxydError as group:
        problems = _leaves(group)
    if not problems:
        return ExitCode.OK
    problem = "; ".join(str(e) for e in problems)
    log.error("%s: cannot serve: %s", config.name, problem)
    notifier.notify(STATUS=f"{config.name}: failed: {problem}"[:400])
    # Every startup error of ours is about the host (sockets, directories, groups),
    # which a restart does not change.  Saved state this config cannot take is the
    # config's (or the operator's) to fix; a state directory that cannot be used,
    # the host's, whatever the errno.
    durable = [e for e in problems if isinstance(e, DurableError)]
    if durable:
        return ExitCode.CONFIG if any(isinstance(e.__cause__, StateError) for e in durable) else ExitCode.CANTCREAT
    denied = any(isinstance(e.__cause__, PermissionError) for e in problems)
    return ExitCode.NOPERM if denied else ExitCode.CANTCREAT


__all__ = ["Service", "raise_fd_limit", "run_service"]
