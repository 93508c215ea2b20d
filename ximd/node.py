"""An enrolled node at work: the engine, the request bridge, the mesh link and metrics.

The agent creates one `Node` per identity. It acquires the model (a hub model
is downloaded and checked first, with progress in STATUS; trouble there is a
waiting state that retries), prepares and supervises the engine, says READY through the agent once the engine first answers /health,
then connects the link; requests from the link go to the bridge. `stop()`
drains: it tells the router to send no more, lets in-flight streams finish
within the grace, then stops the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from xim_proto import codec
from xim_proto.cliout import rfc3339
from ximd import models
from ximd.autoconfig import PlanError
from ximd.config import Config
from ximd.engine import EngineReport, EngineState, EngineSupervisor, LaunchError
from ximd.engine.handover import EngineHandover, discard, process_start_time, refusal
from ximd.identity import Identity
from ximd.logs import phase_fields
from ximd.mesh.report import HelloInfo, LeaseInfo
from ximd.mesh.state import LinkState
from ximd.metrics import MetricsServer, NodeMetrics, scrape_engine
from ximd.models import ModelCache, ModelError
from ximd.models.acquire import JournalReporter, ModelWait, acquire
from ximd.models.progress import Progress, StallWatch, progress_line
from ximd.preparation import Prepared, choose_model, hub_source, prepare_engine
from ximd.serve import Bridge

if TYPE_CHECKING:
    from ximd.mesh.link import MeshLink  # start_link imports it at run time

log = logging.getLogger("ximd")

# How long the engine may stay "unhealthy" with the supervisor doing nothing
# about it before we stop feeding the watchdog: the supervisor acts after
# unhealthy_threshold failed checks, so this only trips when it is stuck.
STUCK_UNHEALTHY_S = 120.0
ENGINE_LOAD_POLL_S = 2.0
# What STATUS and `ximd status` say before the engine is up and a link exists.
NO_LINK = "not connected"
# A model that cannot be fetched now is tried again after this long, doubling.
MODEL_RETRY_S = (30.0, 600.0)
# The start timeout is extended only while bytes arrived within this long: a
# download that stalls still meets systemd's timeout (and resumes after the restart).
DOWNLOAD_STALL_S = 30.0


def engine_load(metrics_text: str) -> dict[str, float]:
    """The load figures leases carry, summed over models, from vLLM's /metrics text."""
    wanted = {"vllm:num_requests_waiting": "waiting", "vllm:kv_cache_usage_perc": "kv_cache_usage"}
    load: dict[str, float] = {}
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            try:
                value = float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            load[wanted[name]] = load.get(wanted[name], 0.0) + value
    return load


def link_text(state: LinkState | None) -> str:
    """The link's state as STATUS and `ximd status` show it; None: no link yet."""
    return NO_LINK if state is None else state.value


def serving_line(model: str, link_state: LinkState | None) -> str:
    if link_state is LinkState.CONNECTED:
        router = "router connected"
    elif link_state is LinkState.REJECTED:
        router = "router rejected this node"
    else:
        router = f"router {link_text(link_state)}, retrying"
    return f"serving {model}; {router}"


class NodeHost(Protocol):
    """What a node tells the daemon that runs it (ximd.agent.Agent): its phase and
    STATUS line, READY, and the turns only the daemon can take."""

    def set_status(self, phase: str, line: str) -> None: ...

    def ready(self) -> None: ...

    def engine_loading(self, model: str, loading_s: float) -> None: ...

    def model_progress(self, line: str, moving: bool) -> None: ...

    def model_waiting(self, line: str) -> None: ...

    def node_serving(self, line: str) -> None: ...

    def node_degraded(self, phase: str, line: str) -> None: ...

    def config_invalid(self, problem: str) -> None: ...

    async def identity_revoked(self, reason: str) -> None: ...


class Node:
    """``adopt``: the engine an earlier program image of this process handed over (ximd.reexec)."""

    def __init__(self, cfg: Config, identity: Identity, host: NodeHost, adopt: EngineHandover | None = None,
                 metrics: NodeMetrics | None = None, metrics_server: MetricsServer | None = None):
        self.cfg = cfg
        self.identity = identity
        self.host = host
        self.prepared: Prepared | None = None
        self.supervisor: EngineSupervisor | None = None
        self.bridge: Bridge | None = None
        self.link: MeshLink | None = None
        self._linking: asyncio.Task | None = None     # the engine probe that starts the link
        # The daemon's: its endpoint answers from the daemon's start; the node adds the engine.
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.metrics_server = metrics_server
        self.link_state: LinkState | None = None      # None until the link exists
        self._tasks: list[asyncio.Task] = []
        self._engine_state_since = time.monotonic()
        self.engine_load: dict[str, float] = {}
        self.download: Progress | None = None          # while a model is being fetched
        self._model_hold: int | None = None            # the cache's shared lock on the served model
        self._retry_model = asyncio.Event()
        self._last_model_wait: str | None = None
        self._adopt = adopt
        self.adoption: str | None = None               # "adopted", or why the handed-over engine was not

    # -------------------------------------------------------------- start

    async def start(self) -> None:
        try:
            await self._start()
        finally:
            handover, self._adopt = self._adopt, None
            if handover is not None:       # handed over, but this start never got to it
                await self._discard_adopted(handover, "the node did not get as far as the engine")

    async def _start(self) -> None:
        if not await self.acquire_model():
            return
        self.host.set_status("preparing", "preparing the engine (hardware, model, plan)")
        try:
            self.prepared = await asyncio.to_thread(prepare_engine, self.cfg, self.identity.assigned_model)
        except PlanError as exc:
            self.host.config_invalid(f"{exc.key}: {exc.message}")
            return
        except (ModelError, LaunchError) as exc:
            self._cannot_start(exc)
            return
        launch, plan = self.prepared.launch, self.prepared.plan
        self.metrics.set_kv_tier("lmcache", self.prepared.kv.enabled)
        adopt = await self._adoptable(launch)
        supervisor = self.supervisor = EngineSupervisor(launch, on_state=self.on_engine_state,
                                                        startup_timeout=self.cfg.engine.startup_timeout_s,
                                                        adopt=adopt)
        self.bridge = Bridge(launch.socket_path, max_concurrent=plan.max_concurrent, send=self.send,
                             try_send=self.try_send, models=lambda: [launch.served_model_name],
                             engine_ready=lambda: supervisor.healthy, metrics=self.metrics)
        await self.bridge.start()
        if self.metrics_server is not None:
            await self.metrics_server.attach_engine(launch.socket_path)
        self._spawn(supervisor.run(), "engine supervisor")
        self._spawn(self.poll_engine_load(supervisor, launch.socket_path), "engine load poller")

    async def _adoptable(self, launch) -> EngineHandover | None:
        """The handed-over engine if this image would have started the very same one; otherwise it
        is stopped (the reason in the journal) and the supervisor starts a fresh one."""
        handover, self._adopt = self._adopt, None
        if handover is None:
            return None
        why = refusal(handover, launch, process_start_time(handover.pid))
        if why is None:
            self.adoption = "adopted"
            return handover
        await self._discard_adopted(handover, why)
        return None

    async def _discard_adopted(self, handover: EngineHandover, why: str) -> None:
        self.adoption = f"restarted: {why}"
        log.warning("not keeping the engine the previous image handed over (pid %d): %s; starting it afresh",
                    handover.pid, why, extra=phase_fields("reexec"))
        await discard(handover, grace_s=10.0)

    def _cannot_start(self, exc: Exception) -> None:
        log.error("engine cannot start: %s", exc, extra=phase_fields("engine"))
        self.host.node_degraded("engine-unavailable",
                                f"engine cannot start: {exc}; fix it, then `systemctl restart ximd`")
        self.host.ready()

    # -------------------------------------------------------------- model

    async def acquire_model(self, choice: models.ModelChoice | None = None) -> bool:
        """Have the chosen model (by default the node's own choice) complete on disk: a local
        path is checked later; a hub model is fetched, waiting (READY=1, STATUS says what to
        do) and retrying while it cannot be, and held while served. False when the model can
        never be served as configured (already told)."""
        try:
            hf_id = models.hub_id_of(choice or choose_model(self.cfg, self.identity.assigned_model))
        except ModelError as exc:
            self._cannot_start(exc)
            return False
        if hf_id is None:
            return True
        cache = ModelCache.from_config(self.cfg)
        reporter = NodeModelReporter(self.host, self)
        delay = MODEL_RETRY_S[0]
        while True:
            try:
                _, self._model_hold = await acquire(hf_id, cache, hub_source(self.cfg), reporter)
                break
            except ModelWait as wait:
                line = wait.line
            except ModelError as exc:       # a token file that cannot be read, no engine to download with
                line = str(exc)
            self.download = None
            self._model_waiting(line, delay)
            self._retry_model.clear()
            try:
                await asyncio.wait_for(self._retry_model.wait(), delay)
            except TimeoutError:
                delay = min(delay * 2, MODEL_RETRY_S[1])
        self.download = None
        cache.touch(hf_id)
        await asyncio.to_thread(cache.enforce_cap, [hf_id])
        return True

    def _model_waiting(self, line: str, delay: float) -> None:
        # Once at error level per distinct reason: a waiting state, not a failure loop.
        if line != self._last_model_wait:
            log.error("%s", line, extra=phase_fields("model"))
            self._last_model_wait = line
        else:
            log.info("still waiting: %s", line, extra=phase_fields("model"))
        self.host.model_waiting(f"{line} (next try in {delay:.0f} s)")

    def retry_model(self, cfg: Config) -> bool:
        """`systemctl reload` while the model waits: try again now, with the reloaded settings
        (a token put in place, a new token file). False when no model is waiting."""
        if self._last_model_wait is None or self.prepared is not None:
            return False
        self.cfg = cfg
        self._retry_model.set()
        return True

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    @staticmethod
    def _task_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s crashed", task.get_name(), exc_info=task.exception())

    # -------------------------------------------------------------- engine

    def on_engine_state(self, report: EngineReport) -> None:
        prepared, supervisor, _ = self._engine()
        state = report.state
        self._engine_state_since = time.monotonic()
        self.metrics.set_engine(state.value, supervisor.restarts)
        model = prepared.launch.served_model_name
        if state is EngineState.LOADING:
            self.host.engine_loading(model, report.loading_s or 0.0)
        elif state is EngineState.HEALTHY:
            self.host.node_serving(serving_line(model, self.link_state))
            if self.link is None and self._linking is None:
                self._linking = self._spawn(self.probe_then_link(), "engine probe")
        elif state in (EngineState.BACKOFF, EngineState.FAILED, EngineState.UNHEALTHY):
            self.host.node_degraded(f"engine-{state.value}", f"engine {state.value}: {report.detail}")

    async def probe_then_link(self) -> None:
        """Ask the healthy engine what it serves beyond completions and its context length
        (hello and leases say them), then connect."""
        _, _, bridge = self._engine()
        await bridge.probe_engine()
        if bridge.optional_endpoints:
            log.info("the engine also serves: %s", ", ".join(sorted(bridge.optional_endpoints)),
                     extra=phase_fields("engine"))
        self.start_link()

    async def poll_engine_load(self, supervisor: EngineSupervisor, engine_socket: Path) -> None:
        """Keep the waiting count and KV-cache usage fresh for the leases."""
        connector = aiohttp.UnixConnector(path=str(engine_socket))
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                if supervisor.healthy:
                    text = await scrape_engine(session)
                    if text is not None:
                        self.engine_load = engine_load(text)
                await asyncio.sleep(ENGINE_LOAD_POLL_S)

    def healthy(self) -> bool:
        if any(t.done() and not t.cancelled() and t.exception() for t in self._tasks):
            return False
        if self.supervisor is None:
            return True   # nothing to supervise (engine could not be prepared)
        if self.supervisor.state == EngineState.UNHEALTHY:
            return time.monotonic() - self._engine_state_since < STUCK_UNHEALTHY_S
        return True

    def _engine(self) -> tuple[Prepared, EngineSupervisor, Bridge]:
        """The engine's parts. start() makes all three before anything that asks for them
        runs (the supervisor's reports, the link), so a missing one is a bug, not a state."""
        if self.prepared is None or self.supervisor is None or self.bridge is None:
            raise RuntimeError("the node's engine is not set up")
        return self.prepared, self.supervisor, self.bridge

    # -------------------------------------------------------------- link

    def start_link(self) -> None:
        from ximd.enrollment import token_refresher
        from ximd.mesh.link import MeshLink
        link = self.link = MeshLink(self.identity, hello_info=self.hello_info, lease_info=self.lease_info,
                                    on_message=self.on_message, on_state=self.on_link_state,
                                    token_refresher=token_refresher(self.cfg),
                                    socket_buffer_bytes=self.cfg.tuning.socket_buffer_bytes)
        self._spawn(link.run(), "mesh link")

    async def send(self, msg: codec.Message) -> None:
        if self.link is None:    # the bridge answers only requests the link brought
            raise RuntimeError("the node has no mesh link")
        await self.link.send(msg)

    def try_send(self, msg: codec.Message) -> bool:
        """send() if it would not wait (MeshLink.try_send)."""
        if self.link is None:
            raise RuntimeError("the node has no mesh link")
        return self.link.try_send(msg)

    def models_info(self) -> tuple[codec.Model, ...]:
        prepared, supervisor, bridge = self._engine()
        state = {EngineState.HEALTHY: "ready", EngineState.LOADING: "loading",
                 EngineState.STARTING: "loading", EngineState.STOPPED: "stopped"}.get(
            supervisor.state, "failed")
        # The engine's own figure once it was asked (it settles "the model's default"), else the plan's.
        return (codec.Model(name=prepared.launch.served_model_name, state=state,
                            max_model_len=bridge.max_model_len or prepared.plan.max_model_len),)

    def hello_info(self) -> HelloInfo:
        prepared, _, bridge = self._engine()
        hw, plan = prepared.hardware, prepared.plan
        return HelloInfo(
            models=self.models_info(), max_concurrent=plan.max_concurrent,
            capabilities=tuple(sorted(bridge.optional_endpoints)),
            hardware={"accelerator": plan.accelerator, "gpus": len(hw.gpus),
                      "ram_bytes": hw.ram_bytes, "cpus": hw.cpu_count, "host": platform.node()})

    def lease_info(self) -> LeaseInfo:
        _, supervisor, bridge = self._engine()
        if self.link is not None and self.link.last_lease_ack_at:
            self.metrics.lease_acknowledged(self.link.last_lease_ack_at)
        return LeaseInfo(
            running=bridge.running,
            waiting=int(self.engine_load.get("waiting", 0)),
            kv_cache_usage=self.engine_load.get("kv_cache_usage", 0.0),
            in_flight=tuple(bridge.in_flight_ids()),
            engine_state=str(supervisor.state),
            models=self.models_info(),
            max_concurrent=bridge.max_concurrent,
            draining=bridge.draining,
        )

    async def on_message(self, msg: codec.Message) -> None:
        if self.bridge is not None:
            await self.bridge.handle(msg)

    def on_link_state(self, state: LinkState, detail: str) -> None:
        # The link logs its own transitions; here they only steer STATUS and serving.
        self.link_state = state
        self.metrics.set_link_state(state)
        if state is LinkState.REJECTED:
            asyncio.get_running_loop().create_task(self.host.identity_revoked(detail))
            return
        self._show_link(state)
        if state is not LinkState.CONNECTED and self.bridge is not None:
            # Streams whose router is gone cannot be delivered; free their slots.
            self.bridge.abort_all("link")

    def _show_link(self, state: LinkState) -> None:
        """STATUS once the link changed: the serving line names the router's state."""
        if self.prepared is not None and self.supervisor is not None and self.supervisor.healthy:
            self.host.node_serving(serving_line(self.prepared.launch.served_model_name, state))

    # -------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"enrollment": {
            "agent_id": self.identity.agent_id,
            "worker_id": self.identity.worker_id,
            "router": self.identity.router_url,
            "mesh": ", ".join(self.identity.mesh_endpoints),
            "enrolled_at": _when(self.identity.enrolled_at),
            "token_expires_at": _when(self.identity.token_expires_at),
        }}
        if self.prepared is not None and self.supervisor is not None:
            out["engine"] = {"state": str(self.supervisor.state), "model": self.prepared.launch.model,
                             "pid": self.supervisor.pid, "restarts": self.supervisor.restarts,
                             "last_error": self.supervisor.last_error}
            if self.adoption is not None:
                out["engine"]["handover"] = self.adoption
            out["plan"] = {"accelerator": self.prepared.plan.accelerator,
                           "max_concurrent": self.prepared.plan.max_concurrent,
                           "tensor_parallel_size": self.prepared.plan.tensor_parallel_size,
                           "lmcache": self.prepared.kv.enabled}
        link: dict[str, Any] = {"state": link_text(self.link_state)}
        if self.link is not None and self.link.last_lease_ack_at:
            link["last_lease_ack_s_ago"] = round(time.time() - self.link.last_lease_ack_at, 1)
        out["link"] = link
        if self.download is not None:
            out["download"] = self.download.to_json()
        if self.bridge is not None:
            out["requests"] = {"in_flight": self.bridge.running,
                               "max_concurrent": self.bridge.max_concurrent}
        return out

    # -------------------------------------------------------------- stop

    async def stop(self, drain_s: float) -> None:
        await self._wind_down(drain_s, keep_engine=False)

    async def hand_over(self, drain_s: float) -> EngineHandover | None:
        """Wind down like stop() but leave a healthy engine running for the next program image."""
        return await self._wind_down(drain_s, keep_engine=True)

    async def _wind_down(self, drain_s: float, *, keep_engine: bool) -> EngineHandover | None:
        if self.bridge is not None and self.link is not None and self.link_state is LinkState.CONNECTED \
                and not await self.link.drain("node stopping"):
            # The router may be gone; in-flight streams still get their grace.
            log.warning("the router did not acknowledge the drain; finishing in-flight requests anyway")
        if self.bridge is not None:
            left = await self.bridge.drain(drain_s)
            if left:
                log.warning("cancelled %d request(s) still running after the %.0f s drain grace",
                            left, drain_s)
        if self.link is not None:
            await self.link.close()
        engine = None
        if self.supervisor is not None and keep_engine and self.supervisor.healthy:
            try:
                engine = await self.supervisor.detach()
            except RuntimeError as exc:
                log.warning("cannot hand the engine over (%s); the next image starts one", exc)
        if self.supervisor is not None and engine is None:
            await self.supervisor.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.bridge is not None:
            await self.bridge.close()
        if self._model_hold is not None:
            os.close(self._model_hold)
            self._model_hold = None
        return engine


class NodeModelReporter:
    """An acquisition's progress as the daemon shows it: STATUS (and the start timeout
    extended while bytes arrive), the journal's paced lines, `ximd status`."""

    def __init__(self, host: NodeHost, node: Node):
        self.host = host
        self.node = node
        self.journal = JournalReporter()
        self.stall = StallWatch(DOWNLOAD_STALL_S)

    def step(self, hf_id: str, line: str) -> None:
        self.journal.step(hf_id, line)
        self.host.model_progress(line, moving=True)

    def progress(self, p: Progress) -> None:
        self.node.download = p
        self.journal.progress(p)
        self.host.model_progress(progress_line(p), moving=self.stall.moving(p.done, time.monotonic()))


def _when(epoch: float) -> str | None:
    """A moment in the status reply: RFC 3339 UTC (`ximd status` shows it in local time), None when unset."""
    return rfc3339(epoch)
