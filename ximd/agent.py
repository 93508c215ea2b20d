"""The lifecycle: the one place that ties configuration, systemd, the engine
and the mesh together.

    load config → verify tuning → identity → engine → READY=1 → mesh → serve
    SIGHUP: reload what can change live   SIGTERM: STOPPING=1, drain, exit 0

Unit-state rules (DESIGN §2): invalid configuration is the only fatal start
error (exit 78). With nothing to do yet (no identity, no join key) the daemon
still sends READY=1 and waits with a STATUS line that says what to do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable

from ximd import __version__, tuning
from ximd.config import EX_CONFIG, Config, ConfigError
from ximd.control import ControlServer, socket_path
from ximd.logs import set_level, setup_logging
from ximd.systemd import Notifier

log = logging.getLogger("ximd")

NOT_ENROLLED_HINT = ("not enrolled: put a join key in /etc/xerotier/agent.toml "
                     "(router.join_key), then `systemctl reload ximd`")
TICK_SECONDS = 1.0

# Settings a SIGHUP applies at once; everything else needs a restart.
LIVE_SETTINGS = {"agent.log_level", "router.join_key", "router.join_key_file"}


def changed_settings(old: Config, new: Config) -> list[str]:
    return [name for name, value, _ in new.items() if old.get(name) != value]


class Agent:
    def __init__(self, cfg: Config, notifier: Notifier, load_config: Callable[[], Config]):
        self.cfg = cfg
        self.notifier = notifier
        self.load_config = load_config
        self.phase = "starting"
        self.status_line = "starting"
        self.started_at = time.time()
        self.stop_reason: str | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.control = ControlServer(socket_path(cfg.runtime_dir), self.status)

    # -------------------------------------------------------------- state

    def set_status(self, phase: str, line: str) -> None:
        """Change the phase and tell systemd (STATUS=) when the line changes."""
        self.phase = phase
        if line != self.status_line:
            self.status_line = line
            self.notifier.status(line)

    def healthy(self) -> bool:
        """Whether the watchdog may be fed: every component is making progress.

        Only the main loop calls it, so a wedged event loop also starves the
        watchdog and systemd restarts us.
        """
        return self.phase in ("not-enrolled", "ready", "starting")

    def status(self) -> dict:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "phase": self.phase,
            "status": self.status_line,
            "uptime_s": round(time.time() - self.started_at, 1),
            "config_files": list(self.cfg.sources),
            "state_dir": str(self.cfg.state_dir),
        }

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
        log.info("ximd %s starting (config: %s)", __version__,
                 ", ".join(self.cfg.sources) or "built-in defaults",
                 extra={"fields": {"XIM_PHASE": "start"}})
        for warning in self.cfg.warnings:
            log.warning("%s", warning)
        self.verify_tuning()
        await self.control.start()
        try:
            await self.bring_up()
            await self.main_loop()
        finally:
            await self.shut_down()
        return 0

    def verify_tuning(self) -> None:
        readings = tuning.check_socket_buffers(self.cfg.tuning.socket_buffer_bytes)
        problem = tuning.explain(readings)
        if problem:
            log.warning("%s", problem, extra={"fields": {"XIM_PHASE": "tuning"}})
        else:
            log.info("kernel socket buffers OK (%s)", tuning.describe(readings),
                     extra={"fields": {"XIM_PHASE": "tuning"}})

    async def bring_up(self) -> None:
        self.enter_not_enrolled()

    def enter_not_enrolled(self) -> None:
        # Logged once at error level: the operator has something to do, but
        # this is a waiting state, not a failure, and must not loop.
        log.error("%s", NOT_ENROLLED_HINT, extra={"fields": {"XIM_PHASE": "enrollment"}})
        self.set_status("not-enrolled", NOT_ENROLLED_HINT)
        self.notifier.ready()

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
            except asyncio.TimeoutError:
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
        if needs_restart:
            log.warning("changed settings need `systemctl restart ximd` to take effect: %s",
                        ", ".join(needs_restart))
        self.cfg = new
        log.info("configuration reloaded (%d change(s))", len(changed))
        self.notifier.ready()

    async def shut_down(self) -> None:
        self.notifier.stopping("stopping")
        self.phase = "stopping"
        await self.control.close()
        log.info("stopped", extra={"fields": {"XIM_PHASE": "stop"}})


def run_daemon(load_config: Callable[[], Config]) -> int:
    notifier = Notifier.from_env()
    try:
        cfg = load_config()
    except ConfigError as exc:
        setup_logging("info")
        for problem in exc.problems:
            log.error("invalid configuration: %s", problem, extra={"fields": {"XIM_PHASE": "config"}})
        log.error("not starting: fix the configuration, check it with `ximd config validate`, "
                  "then `systemctl restart ximd`")
        notifier.status(f"invalid configuration: {exc.problems[0]}")
        return EX_CONFIG
    setup_logging(cfg.agent.log_level)
    return asyncio.run(Agent(cfg, notifier, load_config).run())
