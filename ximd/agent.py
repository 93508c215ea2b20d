"""The lifecycle: the one place that ties configuration, systemd, the engine
and the mesh together.

    load config → verify tuning → identity → engine → READY=1 → mesh → serve
    SIGHUP: reload what can change live   SIGTERM: STOPPING=1, drain, exit 0
    `ximd reexec`: RELOADING=1, hand the engine over, execve in place (ximd.reexec)

Unit-state rules (DESIGN §2): invalid configuration is the only fatal start
error (exit 78). With nothing to do yet (no identity, no join key, a revoked
identity) the daemon still sends READY=1 and waits with a STATUS line that
says what to do. The router link is not part of READY: a router that is down
only changes STATUS, and the link keeps reconnecting.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xim_proto import eventloop
from xim_proto.cliout import rfc3339
from ximd import __version__, reexec, tuning
from ximd.config import Config, ConfigError
from ximd.control import ControlServer, socket_path
from ximd.exitcodes import EX_CONFIG, EX_OK, EX_SOFTWARE
from ximd.identity import Identity
from ximd.logs import phase_fields, set_level, setup_logging
from ximd.metrics import MetricsServer, NodeMetrics
from ximd.systemd import Notifier

if TYPE_CHECKING:
    from ximd.node import Node  # start_node imports it at run time

log = logging.getLogger("ximd")

NOT_ENROLLED_HINT = ("not enrolled: put a join key in /etc/xerotier/agent.toml "
                     "(router.join_key), then `systemctl reload ximd`")
# A key in the credential's file came after the start: systemd hands it over only at a start.
KEY_AWAITS_RESTART_HINT = ("not enrolled: /etc/xerotier/join-key came after ximd started, and systemd "
                           "hands credentials over only at a start: `systemctl restart ximd`")
TICK_SECONDS = 1.0
ENROLL_RETRY_S = (5.0, 300.0)
# Each EXTEND_TIMEOUT_USEC while the model loads buys this much; sent every
# few seconds, so a 10-minute load never meets the unit's start timeout while
# a load that stops making progress still does.
LOAD_EXTENSION_S = 60.0
# The same while a model downloads or is checked; the node asks for it only while
# bytes arrive (ximd.node.DOWNLOAD_STALL_S), so a stalled download still times out.
DOWNLOAD_EXTENSION_S = 60.0

# Settings a SIGHUP applies at once; everything else needs a restart.
LIVE_SETTINGS = {"agent.log_level", "router.join_key", "router.join_key_file"}

# Phases in which the daemon is waiting on a person or the network, not stuck.
WAITING_PHASES = {"starting", "not-enrolled", "enrolling", "model", "model-waiting", "preparing",
                  "engine-unavailable", "reexec"}


def changed_settings(old: Config, new: Config) -> list[str]:
    return [name for name, value, _ in new.items() if old.get(name) != value]


class Agent:
    def __init__(self, cfg: Config, notifier: Notifier, load_config: Callable[[], Config],
                 resumed: reexec.ReexecState | None = None):
        self.cfg = cfg
        self.notifier = notifier
        self.load_config = load_config
        self.phase = "starting"
        self.status_line = "starting"
        self.started_at = time.time()
        self.stop_reason: str | None = None
        self.ready_sent = False
        self.exit_code = EX_OK
        self.node: Node | None = None     # once enrolled
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._lifecycle: asyncio.Task | None = None
        self.resumed = resumed                  # set when an earlier image of this process re-executed
        self.generation = resumed.generation if resumed else 0
        self._reexec: asyncio.Task | None = None
        self.control = ControlServer(socket_path(cfg.runtime_dir),
                                     {"status": self._status_reply, "reexec": self.request_reexec})
        # The daemon's metrics, served from its start (not only once a node serves): the
        # node writes its series here and adds the engine's.
        self.metrics = NodeMetrics()
        self.metrics_server: MetricsServer | None = None

    # -------------------------------------------------------------- state

    def set_status(self, phase: str, line: str) -> None:
        """Change the phase and tell systemd (STATUS=) when the line changes."""
        self.phase = phase
        self.metrics.set_state(phase)
        if line != self.status_line:
            self.status_line = line
            self.notifier.status(line)

    def ready(self) -> None:
        """READY=1 once: the node is up (serving, or nothing to start)."""
        if not self.ready_sent:
            self.ready_sent = True
            self.notifier.ready(self.status_line)

    def healthy(self) -> bool:
        """Whether the watchdog may be fed: every component is making progress.

        Only the main loop calls it, so a wedged event loop also starves the
        watchdog and systemd restarts us.
        """
        if self._lifecycle is not None and self._lifecycle.done() and not self._lifecycle.cancelled() \
                and self._lifecycle.exception() is not None:
            return False
        if self.phase in WAITING_PHASES:
            return True
        return self.node is not None and self.node.healthy()

    async def _status_reply(self) -> dict[str, Any]:
        return self.status()

    def status(self) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "generation": self.generation,
            "phase": self.phase,
            "status": self.status_line,
            "uptime_s": round(time.time() - self.started_at, 1),
            "config_files": list(self.cfg.sources),
            "state_dir": str(self.cfg.state_dir),
        }
        if self.resumed is not None:
            reply["reexec"] = {"from_version": self.resumed.from_version,
                               "requested_at": _iso(self.resumed.requested_at)}
        if self.node is not None:
            reply.update(self.node.status())
        return reply

    # -------------------------------------------------------------- signals

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("received %s: stopping", reason)
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    # -------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        self._install_signal_handlers()
        if self.resumed is not None:
            log.info("ximd %s re-executed in place from %s (pid %d, re-exec %d)", __version__,
                     self.resumed.from_version, os.getpid(), self.generation, extra=phase_fields("reexec"))
        else:
            log.info("ximd %s starting (config: %s)", __version__,
                     ", ".join(self.cfg.sources) or "built-in defaults", extra=phase_fields("start"))
        for warning in self.cfg.warnings:
            log.warning("%s", warning)
        self.verify_tuning()
        await self.control.start()
        await self.start_metrics()
        self._lifecycle = asyncio.create_task(self.bring_up())
        try:
            await self.main_loop()
        finally:
            await self.shut_down()
        return self.exit_code

    async def start_metrics(self) -> None:
        if not self.cfg.metrics.enabled:
            return
        server = MetricsServer(self.cfg.metrics.listen, self.metrics)
        try:
            await server.start()
        except OSError as exc:
            # Metrics are a convenience: a taken port must not keep the node from serving.
            log.warning("metrics endpoint %s not started: %s (set metrics.listen or metrics.enabled)",
                        self.cfg.metrics.listen, exc)
            return
        self.metrics_server = server

    async def close_metrics(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.close()
            self.metrics_server = None

    def verify_tuning(self) -> None:
        readings = tuning.check_socket_buffers(self.cfg.tuning.socket_buffer_bytes)
        problem = tuning.explain(readings)
        if problem:
            log.warning("%s", problem, extra=phase_fields("tuning"))
        else:
            log.info("kernel socket buffers OK (%s)", tuning.describe(readings), extra=phase_fields("tuning"))

    async def bring_up(self) -> None:
        """Identity (enrolling when needed), then the node; retried while the router is away."""
        from ximd import enrollment
        delay = ENROLL_RETRY_S[0]
        while True:
            outcome = await enrollment.ensure_identity(self.cfg)
            if outcome.identity is not None:
                break
            if not outcome.retry:
                await self._discard_handed_over_engine("this node is not enrolled")
                self.enter_not_enrolled(outcome.reason)
                return
            self.set_status("enrolling", f"{outcome.reason}; retrying in {delay:.0f} s")
            self.ready()   # waiting on the network is not a failed start
            await asyncio.sleep(delay)
            delay = min(delay * 2, ENROLL_RETRY_S[1])
        await self.start_node(outcome.identity)

    def enter_not_enrolled(self, reason: str = "") -> None:
        # Logged once at error level: the operator has something to do, but
        # this is a waiting state, not a failure, and must not loop.
        from ximd.enrollment import join_key_awaits_restart
        line = NOT_ENROLLED_HINT
        if reason and "no join key" in reason and join_key_awaits_restart(os.environ):
            line = KEY_AWAITS_RESTART_HINT
        elif reason and "no join key" not in reason:
            line = f"{reason.rstrip('.')}; {NOT_ENROLLED_HINT.removeprefix('not enrolled: ')}"
        log.error("%s", line, extra=phase_fields("enrollment"))
        self.set_status("not-enrolled", line)
        self.ready()

    async def start_node(self, identity: Identity) -> None:
        from ximd.node import Node
        kind = Node
        if self.cfg.group.enabled:     # a member of a group: the router assigns its part (docs/groups.md)
            from ximd.member import MemberNode
            kind = MemberNode
        adopt = self.resumed.engine if self.resumed else None
        node = self.node = kind(self.cfg, identity, self, adopt=adopt, metrics=self.metrics,
                                metrics_server=self.metrics_server)
        await node.start()

    async def _discard_handed_over_engine(self, why: str) -> None:
        from ximd.engine.handover import discard
        if self.resumed is not None and self.resumed.engine is not None:
            log.warning("stopping the engine the previous image handed over (pid %d): %s",
                        self.resumed.engine.pid, why, extra=phase_fields("reexec"))
            await discard(self.resumed.engine, grace_s=10.0)
            self.resumed = reexec.ReexecState(self.resumed.from_version, self.resumed.to_version,
                                              self.resumed.generation, self.resumed.requested_at, None)

    # -------------------------------------------------------------- re-exec

    async def request_reexec(self) -> dict[str, Any]:
        """`ximd reexec`: check that the installed ximd runs, answer, then re-execute in place."""
        if self._reexec is not None or self.phase == "stopping":
            return {"error": "a re-exec or a stop is already under way"}
        try:
            to_version = await asyncio.to_thread(reexec.preflight)
        except reexec.ReexecError as exc:
            log.error("re-exec refused: %s", exc, extra=phase_fields("reexec"))
            return {"error": f"re-exec refused: {exc}"}
        self._reexec = asyncio.create_task(self.reexec(to_version))
        return {"reexec": "started", "pid": os.getpid(), "from_version": __version__, "to_version": to_version,
                "generation": self.generation}

    async def reexec(self, to_version: str) -> None:
        """Hand the engine over, then replace this program image (same PID, same unit)."""
        self.notifier.reloading()
        self.set_status("reexec", f"re-executing ximd {__version__} → {to_version}: handing over")
        log.info("re-executing ximd %s → %s in place (pid %d): draining, keeping the engine", __version__,
                 to_version, os.getpid(), extra=phase_fields("reexec"))
        if self._lifecycle is not None and not self._lifecycle.done():
            self._lifecycle.cancel()
            await asyncio.gather(self._lifecycle, return_exceptions=True)
        engine = None
        if self.node is not None:
            engine = await self.node.hand_over(drain_s=self.cfg.agent.drain_grace_s)
        await self.control.close()
        await self.close_metrics()          # the next image listens on the same port
        state = reexec.new_state(__version__, to_version, self.generation, engine)
        try:
            path = reexec.write_state(self.cfg.runtime_dir, state)
            argv = reexec.exec_argv()
            log.info("execve %s", " ".join(argv), extra=phase_fields("reexec"))
            for handler in logging.getLogger().handlers:
                handler.flush()
            reexec.execute(argv, path)
        except OSError as exc:
            # The engine is detached and the link is down: a clean restart by systemd
            # (Restart=on-failure; the engine goes with us) is the way back.
            log.error("re-exec failed: %s; exiting so that systemd starts ximd afresh", exc,
                      extra=phase_fields("reexec"))
            self.exit_code = EX_SOFTWARE
            self.node = None
            self.request_stop("failed re-exec")

    # -------------------------------------------------------------- called by the node (ximd.node.NodeHost)

    def engine_loading(self, model: str, loading_s: float) -> None:
        self.set_status("loading", f"loading {model}: {loading_s:.0f} s")
        if not self.ready_sent:
            self.notifier.extend_timeout(LOAD_EXTENSION_S)

    def model_progress(self, line: str, moving: bool) -> None:
        """The model is being fetched or checked: still starting, as long as it moves."""
        self.set_status("model", line)
        if moving and not self.ready_sent:
            self.notifier.extend_timeout(DOWNLOAD_EXTENSION_S)

    def model_waiting(self, line: str) -> None:
        """The model cannot be had now (gated, offline, no room): up and waiting, like not-enrolled."""
        self.set_status("model-waiting", line)
        self.ready()

    def node_serving(self, line: str) -> None:
        self.set_status("serving", line)
        self.ready()

    def node_degraded(self, phase: str, line: str) -> None:
        self.set_status(phase, line)

    def config_invalid(self, problem: str) -> None:
        """A setting the hardware makes impossible: as fatal as a bad file (exit 78)."""
        log.error("invalid configuration: %s", problem, extra=phase_fields("config"))
        self.notifier.status(f"invalid configuration: {problem}")
        self.exit_code = EX_CONFIG
        self.request_stop("invalid configuration")

    async def identity_revoked(self, reason: str) -> None:
        """The router refused this identity for good: stop serving, keep the file as evidence."""
        from ximd.identity import EnrollmentError, retire_identity
        node, self.node = self.node, None
        if node is not None:
            await node.stop(drain_s=0)
        try:
            kept = retire_identity(self.cfg.state_dir)
        except (EnrollmentError, OSError) as exc:
            log.error("could not set the refused identity aside: %s", exc)
        else:
            if kept is not None:
                log.warning("moved the refused identity to %s; a new join key enrolls afresh", kept)
        self.enter_not_enrolled(reason)

    # -------------------------------------------------------------- main loop

    async def main_loop(self) -> None:
        interval = min(TICK_SECONDS, self.notifier.watchdog_interval() or TICK_SECONDS)
        while not self._stop.is_set():
            if self.healthy():
                self.notifier.watchdog()
            if self._reload.is_set():
                self._reload.clear()
                await self.reload()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
            except TimeoutError:
                pass

    async def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = self.load_config()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.notifier.ready()
            return
        changed = changed_settings(self.cfg, new)
        if "agent.log_level" in changed:
            set_level(new.agent.log_level)
            log.info("log level is now %s", new.agent.log_level)
        needs_restart = [name for name in changed if name not in LIVE_SETTINGS]
        if needs_restart and self.node is not None:
            log.warning("changed settings need `systemctl restart ximd` to take effect: %s",
                        ", ".join(needs_restart))
        self.cfg = new
        log.info("configuration reloaded (%d change(s))", len(changed))
        if self.node is not None and self.node.retry_model(new):
            log.info("trying to fetch the model again now", extra=phase_fields("model"))
        if self.node is None and self.phase in ("not-enrolled", "enrolling"):
            # A join key may have arrived: try again with what is there now.
            if self._lifecycle is not None and not self._lifecycle.done():
                self._lifecycle.cancel()
            self._lifecycle = asyncio.create_task(self.bring_up())
        self.notifier.ready()

    async def shut_down(self) -> None:
        self.notifier.stopping("stopping: draining in-flight requests")
        self.phase = "stopping"
        self.metrics.set_state("stopping")
        if self._lifecycle is not None and not self._lifecycle.done():
            self._lifecycle.cancel()
            await asyncio.gather(self._lifecycle, return_exceptions=True)
        if self.node is not None:
            await self.node.stop(drain_s=self.cfg.agent.drain_grace_s)
        await self.control.close()
        await self.close_metrics()
        log.info("stopped", extra=phase_fields("stop"))


def _iso(epoch: float) -> str | None:
    return rfc3339(epoch)


def run_daemon(load_config: Callable[[], Config]) -> int:
    # A daemon the watchdog kills gets SIGABRT (the unit's WatchdogSec=): every
    # thread's stack then goes to the process's own stderr (the journal), to say
    # where it hung, whatever sys.stderr has been replaced with.
    if sys.__stderr__ is not None:
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
    notifier = Notifier.from_env()
    try:
        resumed = reexec.take_state(os.environ)
    except reexec.ReexecError as exc:
        # Whatever the old image handed over is lost; its engine is found and stopped
        # as an orphan of ours before the next one starts.
        setup_logging("info")
        log.error("%s; starting afresh", exc, extra=phase_fields("reexec"))
        resumed = None
    try:
        cfg = load_config()
    except ConfigError as exc:
        setup_logging("info")
        for problem in exc.problems:
            log.error("invalid configuration: %s", problem, extra=phase_fields("config"))
        log.error("not starting: fix the configuration, check it with `ximd config validate`, "
                  "then `systemctl restart ximd`")
        notifier.status(f"invalid configuration: {exc.problems[0]}")
        return EX_CONFIG
    setup_logging(cfg.agent.log_level)
    try:
        loop = eventloop.choose(cfg.tuning.event_loop)
    except eventloop.EventLoopError as exc:
        log.error("not starting: %s (tuning.event_loop)", exc, extra=phase_fields("config"))
        notifier.status(f"invalid configuration: {exc}")
        return EX_CONFIG
    log.info("event loop: %s", loop.name, extra=phase_fields("start"))
    return loop.run(Agent(cfg, notifier, load_config, resumed).run())
