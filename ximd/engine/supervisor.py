"""EngineSupervisor: keeps one vLLM engine running, healthy, and reported.

    supervisor = EngineSupervisor(launch, on_state=node.on_engine_state)
    task = asyncio.create_task(supervisor.run())
    ...
    await supervisor.stop()

One engine lifetime: remove earlier engines of ours → start in a new process group
(session) → "loading" until GET /health on the unix socket answers 200 (reported
every few seconds, so the agent can send STATUS and EXTEND_TIMEOUT_USEC) →
"healthy", polled every `health_interval` → on exit, or health failing
`unhealthy_threshold` times in a row (wedged), the group is stopped and the engine
restarted after a capped exponential backoff. An engine that dies during start-up
with LMCache on is retried once at once without it.

`on_state(report)` gets an `EngineReport` on every change of state and every
`loading_report_interval` while loading; it must not block.

A group's part (docs/groups.md) is supervised with ``restart=False``: an engine that
dies is reported FAILED and stays down, since the group restarts as one (a lone
follower restarted would wait for a leader that never calls again). A follower's
launch has ``health_check=False``: vLLM's headless worker serves no /health, so it
counts as healthy once it has run for ``headless_grace`` without exiting.

`stop_grace` is 10 s so that SIGTERM + grace + SIGKILL ends inside the 15 s a
stopping unit is given for its engine (vLLM itself stops in 3-4 s).

Re-executing in place (ximd.reexec): `detach()` ends supervision without
touching a healthy engine and returns an `EngineHandover`; the next image's
supervisor, built with `adopt=handover`, follows that engine instead of starting
one (ximd/engine/child.py says why the engine is a bare posix_spawn child).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ximd import kvcache
from ximd.engine import processes, sandbox
from ximd.engine.child import EngineChild, open_output, resolve, spawn
from ximd.engine.handover import EngineHandover, fingerprint, process_start_time
from ximd.engine.launch import EngineLaunch, describe
from ximd.engine.output import OutputForwarder, clean_line

log = logging.getLogger("ximd.engine.supervisor")

OUTPUT_LINE_LIMIT = 1024 * 1024   # a longer line is cut, never a reason to stop reading
EXIT_POLL_S = 0.1


class EngineState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    LOADING = "loading"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    BACKOFF = "backoff"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class EngineReport:
    """What on_state hears: the state, a line for people, and while loading the seconds
    since the engine started (so nobody has to read the number back out of the line)."""

    state: EngineState
    detail: str
    loading_s: float | None = None     # set with LOADING only


def backoff_delay(failures: int, base_s: float, cap_s: float) -> float:
    """base, 2·base, 4·base … capped; `failures` counts consecutive failed lifetimes (≥ 1)."""
    return min(cap_s, base_s * 2 ** max(failures - 1, 0))


# "OSError: ...", "RuntimeError: ...", "ValueError: ..." after vLLM's own prefix, if any.
EXCEPTION_LINE = re.compile(r"(?:^|\] |\) )\s*((?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception|Exit)\b:?.*)$")


def failure_reason(lines: list[str]) -> str:
    """The line of the engine's output that says why it died: its last exception, else its last line."""
    for line in reversed(lines):
        match = EXCEPTION_LINE.search(line.strip())
        if match:
            return match.group(1).strip()
    return lines[-1].strip() if lines else "no output"


def parent_death_prefix() -> tuple[str, ...]:
    """`setpriv --pdeathsig TERM --` in front of the engine, when util-linux has it.

    The engine runs in a session of its own, so nothing takes it down with ximd when
    ximd dies without stopping it (SIGKILL, a crash) outside a systemd cgroup; the
    kernel's parent-death signal does. The next start's orphan check is the backstop.
    """
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
    return (setpriv, "--pdeathsig", "TERM", "--") if setpriv else ()


def sandbox_prefix(policy: sandbox.Policy | None) -> tuple[str, ...]:
    """The sandbox launcher in front of the engine (ximd/engine/sandbox.py), and a word in
    the journal about it the first time: confined, or why not."""
    if policy is None:
        return ()
    abi = sandbox.landlock_abi()
    if abi:
        log.info("The engine runs in a Landlock sandbox (ABI %d): it cannot read %s", abi,
                 ", ".join(policy.hidden) or "(nothing hidden)")
    else:
        log.warning("The engine runs without a sandbox: %s. It can read the node's secrets "
                    "(%s); `ximd doctor` checks this", sandbox.unavailable_reason(),
                    ", ".join(policy.hidden))
    return sandbox.launcher_argv(policy)


def remove_stale_temporaries(tmpdir: str | None) -> None:
    """vLLM leaves a small ``vllm_dist_*`` file in TMPDIR at every start and never removes it;
    with no engine of ours running (the orphan check just made sure) none is in use. The
    rest of TMPDIR (torch's precompiled headers) is worth keeping across restarts."""
    if not tmpdir:
        return
    for stale in Path(tmpdir).glob("vllm_dist_*"):
        try:
            stale.unlink()
        except OSError:
            pass


def exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class EngineSupervisor:
    def __init__(self, launch: EngineLaunch, *, on_state: Callable[[EngineReport], None] | None = None,
                 health_interval: float = 2.0, health_timeout: float = 5.0,
                 unhealthy_threshold: int = 3, startup_timeout: float = 900.0,
                 backoff: tuple[float, float] = (1.0, 60.0), stable_after: float = 60.0,
                 loading_report_interval: float = 5.0, loading_poll_interval: float = 0.25,
                 stop_grace: float = 10.0, orphan_grace: float = 10.0,
                 forwarder: OutputForwarder | None = None, adopt: EngineHandover | None = None,
                 restart: bool = True, headless_grace: float = 5.0):
        self.launch = launch
        self.on_state = on_state
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.unhealthy_threshold = unhealthy_threshold
        self.startup_timeout = startup_timeout
        self.backoff_base, self.backoff_cap = backoff
        self.stable_after = stable_after
        self.loading_report_interval = loading_report_interval
        self.loading_poll_interval = loading_poll_interval
        self.stop_grace = stop_grace
        self.orphan_grace = orphan_grace
        self.output = forwarder or OutputForwarder()
        self.restart = restart
        self.headless_grace = headless_grace

        self.state = EngineState.STOPPED
        self.started_at: float | None = None    # wall clock of the running engine's start
        self.healthy_at: float | None = None    # wall clock it first answered /health
        self.starts = 0                         # engines spawned
        self.restarts = 0                       # spawns after the first
        self.last_error: str | None = None
        self.pid: int | None = None
        self.lmcache_dropped = False
        self._sandbox_argv: tuple[str, ...] | None = None   # decided (and logged) at the first start
        self._failures = 0
        self._child: EngineChild | None = None
        self._adopt = adopt                     # an engine to follow instead of the first start
        self.adopted = False                    # whether the running engine came from a handover
        self._detaching = False
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False

    # ------------------------------------------------------------ public view

    @property
    def healthy(self) -> bool:
        return self.state == EngineState.HEALTHY

    @property
    def socket_path(self) -> Path:
        return self.launch.socket_path

    @property
    def dropped_output_lines(self) -> int:
        return self.output.dropped

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Supervise until stop(); never leaves an engine process behind.

        One run per supervisor: a stop() that comes before run() starts makes it
        return at once (the agent may be told to stop while it is still preparing).
        """
        if self._running:
            raise RuntimeError("EngineSupervisor.run() is already running")
        self._running = True
        self._done.clear()
        self.output.start()
        try:
            while not self._stopping.is_set():
                await self._one_lifetime()
                if self._stopping.is_set() or (not self.restart and self._failures):
                    break
                await self._pause_before_restart()
        finally:
            if self._detaching:
                self._child = None              # the next image follows it now
            else:
                await self._stop_process(self.stop_grace)
                if self.restart or self.state != EngineState.FAILED or self._stopping.is_set():
                    self._set_state(EngineState.STOPPED, "engine stopped")
            self.output.close()
            self._running = False
            self._done.set()

    async def stop(self, grace: float | None = None) -> None:
        """SIGTERM the engine's group, SIGKILL after `grace`; return once nothing is left."""
        if grace is not None:
            self.stop_grace = grace
        self._stopping.set()
        if self._running:
            await self._done.wait()
        else:
            await self._stop_process(self.stop_grace)

    async def detach(self) -> EngineHandover:
        """Stop supervising a healthy engine without stopping it, and say how to find it again.

        The returned descriptor is inheritable: it is meant to cross an execve.
        Raises RuntimeError when there is no healthy engine to hand over.
        """
        child = self._child
        if child is None or not self.healthy or not self._running or child.poll() is not None:
            raise RuntimeError("there is no healthy engine to hand over")
        created = process_start_time(child.pid)
        if created is None:
            raise RuntimeError("the engine just exited")
        output_fd = os.dup(child.output_fd)
        os.set_inheritable(output_fd, True)
        handover = EngineHandover(pid=child.pid, output_fd=output_fd, create_time=created,
                                  fingerprint=fingerprint(self.launch), started_at=self.started_at or time.time(),
                                  healthy_at=self.healthy_at, starts=self.starts, model=self.launch.model)
        self._detaching = True
        self._stopping.set()
        await self._done.wait()
        log.info("Detached from the engine (pid %d): it keeps running for the next program image", child.pid)
        return handover

    # ------------------------------------------------------------ one engine lifetime

    async def _one_lifetime(self) -> None:
        child: EngineChild | None
        if self._adopt is not None:
            child, self._adopt = self._take_over(self._adopt), None
        else:
            self._set_state(EngineState.STARTING, f"starting engine for {self.launch.model}")
            child = await self._spawn()
        if child is None:
            self._failures += 1
            return
        reached_healthy = await self._watch(child)
        if self._stopping.is_set():
            return
        await self._stop_process(self.stop_grace)   # the rest of the group, if anything is left
        if reached_healthy and self.healthy_at and time.time() - self.healthy_at >= self.stable_after:
            self._failures = 0
        self._failures += 1
        if kvcache.retry_without_lmcache(self.launch.lmcache, reached_healthy, self.lmcache_dropped):
            self.lmcache_dropped = True
            self.launch = self.launch.without_lmcache()
            self._failures = 0   # the retry is immediate: this failure was LMCache's
            log.warning("The engine died during start-up with LMCache on; retrying once without LMCache: %s",
                        describe(self.launch))
            self._set_state(EngineState.BACKOFF, "engine died during start-up with LMCache on; "
                                                 "retrying at once without LMCache")

    def _take_over(self, handover: EngineHandover) -> EngineChild:
        """Follow the engine an earlier image of ximd started (the caller checked it is ours)."""
        os.set_inheritable(handover.output_fd, False)
        child = self._child = EngineChild(handover.pid, handover.output_fd)
        self.pid, self.adopted = child.pid, True
        self.started_at, self.healthy_at = handover.started_at, handover.healthy_at
        self.starts = handover.starts
        self.restarts = self.starts - 1
        log.info("Adopted the running engine (pid %d) for %s, started %.0f s ago", child.pid, self.launch.model,
                 time.time() - handover.started_at, extra={"fields": {"XIM_ENGINE_PID": child.pid}})
        return child

    async def _spawn(self) -> EngineChild | None:
        try:
            removed = await asyncio.to_thread(processes.remove_orphans, self.launch.instance_id,
                                              self.launch.socket_path, self.orphan_grace)
        except processes.OrphanError as exc:
            self._fail(str(exc))
            return None
        if removed:
            log.warning("Removed %d process(es) of an earlier engine of ours before starting", len(removed))
        remove_stale_temporaries(self.launch.env.get("TMPDIR"))
        program = self.launch.argv[0]
        if resolve(program, self.launch.env.get("PATH")) is None:
            # Checked here because setpriv would start and only then fail to exec it.
            self._fail(f"cannot start the engine ({program}): no such executable file")
            return None
        try:
            for directory in self.launch.dirs:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            self.launch.socket_path.unlink(missing_ok=True)
            if self._sandbox_argv is None:
                self._sandbox_argv = sandbox_prefix(self.launch.sandbox)
            child = spawn([*parent_death_prefix(), *self._sandbox_argv, *self.launch.argv], dict(self.launch.env))
        except OSError as exc:
            self._fail(f"cannot start the engine ({self.launch.argv[0]}): {exc.strerror or exc}")
            return None
        self.output.forget_tail()
        self._child, self.pid, self.adopted = child, child.pid, False
        self.started_at, self.healthy_at = time.time(), None
        self.starts += 1
        self.restarts = self.starts - 1
        log.info("Engine started (pid %d) for %s on %s", child.pid, self.launch.model, self.launch.socket_path,
                 extra={"fields": {"XIM_ENGINE_PID": child.pid}})
        return child

    async def _watch(self, child: EngineChild) -> bool:
        """Follow one engine until it exits, wedges, times out or we stop; True if it got healthy."""
        reader, transport = await open_output(child.output_fd, OUTPUT_LINE_LIMIT)
        pump = asyncio.create_task(self._pump(reader))
        exited = asyncio.create_task(self._exit_of(child))
        stopping = asyncio.create_task(self._stopping.wait())
        began = time.monotonic()
        last_report = began
        failures = 0
        reached_healthy = False
        self._set_state(EngineState.LOADING, self._loading_detail(0.0), loading_s=0.0)
        connector = aiohttp.UnixConnector(path=str(self.launch.socket_path), force_close=True)
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                while True:
                    loading = self.state == EngineState.LOADING
                    interval = self.loading_poll_interval if loading else self.health_interval
                    await asyncio.wait({exited, stopping}, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
                    if stopping.done():
                        return reached_healthy
                    if exited.done():
                        # Let the pump take the last lines, which say why.
                        await asyncio.wait({pump}, timeout=1.0)
                        when = "during start-up" if loading else "while serving"
                        self._fail(f"engine {exit_description(exited.result())} {when}: "
                                   f"{failure_reason(self.output.last_lines(40))}", with_output=True)
                        return reached_healthy
                    if self.launch.health_check:
                        ok, why = await self._health(session)
                    else:                       # it runs: all a headless worker shows
                        ok, why = time.monotonic() - began >= self.headless_grace, ""
                    now = time.monotonic()
                    if loading:
                        if ok:
                            reached_healthy = True
                            self.healthy_at = time.time()
                            log.info("Engine healthy after %.1f s", now - began,
                                     extra={"fields": {"XIM_ENGINE_STARTUP_S": f"{now - began:.1f}"}})
                            self._set_state(EngineState.HEALTHY, "engine ready")
                        elif now - began > self.startup_timeout:
                            self._fail(f"engine not healthy {self.startup_timeout:g} s after its start "
                                       "(engine.startup_timeout_s)", with_output=True)
                            return reached_healthy
                        elif now - last_report >= self.loading_report_interval:
                            last_report = now
                            elapsed = now - began
                            self._report(EngineReport(EngineState.LOADING, self._loading_detail(elapsed), elapsed))
                    elif ok:
                        if failures:
                            log.info("Engine health recovered after %d failed check(s)", failures)
                        failures = 0
                        if self.state != EngineState.HEALTHY:
                            self._set_state(EngineState.HEALTHY, "engine ready")
                    else:
                        failures += 1
                        self._set_state(EngineState.UNHEALTHY,
                                        f"health check failed ({failures}/{self.unhealthy_threshold}): {why}")
                        if failures >= self.unhealthy_threshold:
                            self._fail(f"engine wedged: {failures} health checks in a row failed "
                                       f"(last: {why}); restarting it")
                            return reached_healthy
        finally:
            for task in (exited, stopping):
                task.cancel()
            if self._detaching:
                pump.cancel()                   # the next image reads on from its own descriptor
                transport.close()
            else:
                if child.poll() is None:
                    await self._stop_process(self.stop_grace)
                await self._finish_pump(pump)
                transport.close()

    @staticmethod
    async def _exit_of(child: EngineChild) -> int:
        """The engine's exit status as soon as it exits (and is reaped).

        Not the end of its output: the engine's children (EngineCore) keep the pipe
        open after the engine itself dies.
        """
        while (code := child.poll()) is None:
            await asyncio.sleep(EXIT_POLL_S)
        return code

    async def _health(self, session: aiohttp.ClientSession) -> tuple[bool, str]:
        try:
            async with session.get("http://engine/health",
                                   timeout=aiohttp.ClientTimeout(total=self.health_timeout)) as response:
                if response.status == 200:
                    return True, ""
                return False, f"HTTP {response.status}"
        except TimeoutError:
            return False, f"no answer within {self.health_timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return False, f"{type(exc).__name__}: {exc}"

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await reader.readline()
            except ValueError:   # longer than OUTPUT_LINE_LIMIT; the reader dropped it
                self.output.offer(f"[engine output line longer than {OUTPUT_LINE_LIMIT} bytes cut]")
                continue
            if not raw:
                return
            self.output.offer(clean_line(raw))

    async def _finish_pump(self, pump: asyncio.Task) -> None:
        # Workers that escaped the group could keep the pipe open: don't wait for them.
        try:
            await asyncio.wait_for(pump, timeout=2.0)
        except TimeoutError:
            pump.cancel()

    async def _stop_process(self, grace: float) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        pgid = child.pid   # spawned with setsid: the engine leads its own group
        survivors = await processes.terminate_group(pgid, grace)
        if child.poll() is None:
            try:
                await asyncio.wait_for(self._exit_of(child), timeout=processes.KILL_WAIT_S)
            except TimeoutError:
                survivors.append(child.pid)
        if survivors:
            log.error("Engine processes %s survive SIGKILL; the next start will look for them again", survivors)
        self.pid = None
        self.started_at = None

    async def _pause_before_restart(self) -> None:
        if self._failures == 0:
            return   # the LMCache fallback restarts at once
        delay = backoff_delay(self._failures, self.backoff_base, self.backoff_cap)
        self._set_state(EngineState.BACKOFF, f"restarting in {delay:.3g} s: {self.last_error}")
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        except TimeoutError:
            pass

    # ------------------------------------------------------------ reporting

    def _fail(self, message: str, with_output: bool = False) -> None:
        self.last_error = message
        if with_output:
            tail = "\n".join(self.output.last_lines()) or "(none)"
            log.error("%s\nLast engine output:\n%s", message, tail)
        else:
            log.error("%s", message)
        self._set_state(EngineState.FAILED, message)

    def _loading_detail(self, elapsed_s: float) -> str:
        return f"loading {self.launch.model}: {elapsed_s:.0f} s"

    def _set_state(self, state: EngineState, detail: str, loading_s: float | None = None) -> None:
        if state == self.state and state != EngineState.FAILED:
            return
        self.state = state
        log.info("Engine %s: %s", state, detail, extra={"fields": {"XIM_ENGINE_STATE": str(state)}})
        self._report(EngineReport(state, detail, loading_s))

    def _report(self, report: EngineReport) -> None:
        if self.on_state is None:
            return
        try:
            self.on_state(report)
        except Exception:
            log.exception("on_state callback failed")
