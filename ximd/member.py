"""A node that serves as a member of a group (`group.enabled`, docs/groups.md).

It has no model or engine of its own: it connects to the router at once, announces
`groups` in hello with no models, and does what each `group` message says
(ximd.group holds the part, pure): on `wait` it fetches the group's model into the
cache and reports it ready; on `run` it resolves its fabric, prepares the engine of
its part (`prepare_engine(group=…)`: the leader's API server or a follower's headless
entry) and supervises it with ``restart=False``; on a later epoch, `wait` or `leave`
it stops it. Every lease carries the part's report (`lease.group`), sent at once when
the part changes; STATUS says the part's line. The leader declares the group's model
once its engine runs (and answers requests through the bridge, like any node);
followers declare none and get no requests.

READY comes as soon as the link is started: the member has started everything that is
its own, and what runs next is the router's call (as a node without an identity waits
with READY and a STATUS line). A leader READY only once the group serves would make
`systemctl start` wait on other hosts and time out into a restart, which ends its
session and restarts the whole group.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import platform
from typing import Any

from xim_proto import codec
from xim_proto.ratelimit import escape
from ximd import group, hardware, models
from ximd.autoconfig import PlanError
from ximd.engine import EngineReport, EngineState, EngineSupervisor, LaunchError
from ximd.fabric import Fabric, FabricError, fabric_from_config, refusal
from ximd.logs import phase_fields
from ximd.mesh.report import HelloInfo, LeaseInfo
from ximd.mesh.state import LinkState
from ximd.models import ModelError
from ximd.node import Node
from ximd.preparation import prepare_engine
from ximd.serve import Bridge

log = logging.getLogger("ximd")
GROUP = phase_fields("group")

WAITING_FOR_ROUTER = "group member: waiting for the router's assignment"


class MemberNode(Node):
    """`Node` for `group.enabled`: the part the router assigns instead of an engine of its own."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.part: group.Part | None = None
        self.fabric: Fabric | None = None
        self.problem: str | None = None          # why this node cannot take part (fabric, engine)
        self.engine_version: str | None = None
        self.hardware: hardware.Hardware | None = None
        self.model: str | None = None            # the group model it fetches or holds
        self.model_ready = False                 # `model` is complete in the cache (and held)
        self._fetching: asyncio.Task | None = None
        self._part_lock = asyncio.Lock()         # one stop or start of the part's engine at a time
        self._part_tasks: list[asyncio.Task] = []

    # -------------------------------------------------------------- start

    async def _start(self) -> None:
        try:
            self.fabric = fabric_from_config(self.cfg)
        except FabricError as exc:
            self.problem = str(exc)
            log.error("this node cannot take part in a group: %s", exc, extra=GROUP)
        self.hardware = await asyncio.to_thread(hardware.detect)
        self._show()
        self.host.ready()
        self.start_link()
        self._spawn(self._probe_engine_version(), "engine version probe")

    async def _probe_engine_version(self) -> None:
        """The engine's vLLM version, which every member must share (the router compares them)."""
        from ximd.doctor import probe_engine
        probe = await asyncio.to_thread(probe_engine, self.cfg.engine.python)
        if probe.version:
            self.engine_version = probe.version
            log.info("engine: vLLM %s", probe.version, extra=GROUP)
        else:
            why = f"the engine cannot be imported: {probe.error}"
            log.error("%s", why, extra=GROUP)
            self.problem = self.problem or why
            if self.part is not None:
                self.part = group.cannot_take_part(self.part, why)
        self._changed()

    # -------------------------------------------------------------- assignments

    async def on_message(self, msg: codec.Message) -> None:
        if isinstance(msg, codec.Group):
            self.on_group(msg)
        else:
            await super().on_message(msg)

    def on_group(self, msg: codec.Group) -> None:
        before = self.part
        part, action = group.assign(self.part, msg)
        if part is not None and self.problem:
            part = group.cannot_take_part(part, self.problem)
            if action is group.Action.START:
                action = group.Action.STOP
        self.part = part
        if part is not None and (before is None or before.epoch != part.epoch or before.state != part.state):
            log.info("group %s: epoch %d, %s%s", escape(msg.group), msg.epoch, escape(msg.action),
                     f" ({escape(msg.reason)})" if msg.reason else "", extra=GROUP)   # the router's words
        if part is not None:
            self._want_model(part.assignment.model)
        if action is not group.Action.NOTHING:
            self._spawn(self._act(action, part), f"group part: {action.value}")
        self._changed()

    def _want_model(self, model: str) -> None:
        """Fetch the group's model (once per model) so that `model_ready` can be reported."""
        if model == self.model:
            return
        if self._fetching is not None:
            self._fetching.cancel()
        if self._model_hold is not None:
            os.close(self._model_hold)
            self._model_hold = None
        self.model, self.model_ready = model, False
        self._fetching = self._spawn(self._fetch_model(model), "group model")

    async def _fetch_model(self, model: str) -> None:
        choice = models.ModelChoice(model, "router")
        try:
            models.hub_id_of(choice)
        except ModelError as exc:
            log.error("group model: %s", exc, extra=GROUP)
            self.problem = self.problem or str(exc)
            if self.part is not None:
                self.part = group.cannot_take_part(self.part, str(exc))
            self._changed()
            return
        if await self.acquire_model(choice) and self.model == model:
            self.model_ready = True
            log.info("group model %s is complete in the cache", model, extra=GROUP)
        self._changed()

    async def _act(self, action: group.Action, part: group.Part | None) -> None:
        async with self._part_lock:
            await self._stop_part()
            current = self.part
            if action is group.Action.START and part is not None and current is not None \
                    and current.assignment == part.assignment and current.state == group.STARTING:
                await self._start_part(current)

    async def _start_part(self, part: group.Part) -> None:
        if self.fabric is None or not self.model_ready:
            self._fail(part, self.problem or f"{part.assignment.model} is not complete in the model cache")
            return
        leader = part.assignment.leader_address or ""
        refused = refusal(leader, allow_public=self.cfg.group.allow_public_fabric)
        if refused:             # the router's word: its engine would dial there and take pickles
            self._fail(part, f"the leader's address: {refused}; a group's engines talk only on a private fabric")
            return
        role = group.role(part, self.fabric)
        log.info("group %s: starting rank %d of %d, epoch %d (leader %s:%d)", role.name, role.rank, role.size,
                 part.epoch, role.master_address, role.master_port, extra=GROUP)
        try:
            prepared = await asyncio.to_thread(prepare_engine, self.cfg, part.assignment.model, role)
        except PlanError as exc:
            self._fail(part, f"{exc.key}: {exc.message}")
            return
        except (ModelError, LaunchError) as exc:
            self._fail(part, str(exc))
            return
        if self.part is None or self.part.assignment != part.assignment:
            return                                   # a newer assignment came meanwhile
        launch = prepared.launch
        supervisor = EngineSupervisor(launch, on_state=lambda report: None,
                                      startup_timeout=self.cfg.engine.startup_timeout_s, restart=False)
        supervisor.on_state = lambda report: self._on_part_engine(supervisor, report)
        self.prepared, self.supervisor = prepared, supervisor
        if part.leader:
            bridge = self.bridge = Bridge(launch.socket_path, max_concurrent=prepared.plan.max_concurrent,
                                          send=self.send, try_send=self.try_send,
                                          models=lambda: [launch.served_model_name],
                                          engine_ready=lambda: supervisor.healthy, metrics=self.metrics)
            await bridge.start()
            self._part_tasks.append(self._spawn(self.poll_engine_load(supervisor, launch.socket_path),
                                                "engine load poller"))
        self._part_tasks.append(self._spawn(supervisor.run(), "group part engine"))

    def _fail(self, part: group.Part, why: str) -> None:
        log.error("group %s: cannot run rank %d: %s", part.assignment.group, part.assignment.rank, why, extra=GROUP)
        if self.part is not None and self.part.assignment == part.assignment:
            self.part = group.cannot_take_part(self.part, why)
            self._changed()

    async def _stop_part(self) -> None:
        """Stop the part's engine, if any; the reports of the stopped supervisor are ignored."""
        supervisor, bridge = self.supervisor, self.bridge
        self.supervisor = self.bridge = self.prepared = None
        if bridge is not None:      # requests in flight end with a retryable error (`draining`)
            await bridge.drain(0)
        if supervisor is not None:
            await supervisor.stop()
        tasks, self._part_tasks = self._part_tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = [t for t in self._tasks if t not in tasks]
        if bridge is not None:
            await bridge.close()
        self.engine_load = {}

    def _on_part_engine(self, supervisor: EngineSupervisor, report: EngineReport) -> None:
        if supervisor is not self.supervisor or self.part is None:
            return
        state = report.state
        self.metrics.set_engine(state.value, supervisor.restarts)
        failure = (report.detail or "the engine failed") if state is EngineState.FAILED else None
        healthy = state is EngineState.HEALTHY
        part = group.engine(self.part, started=healthy, healthy=healthy, failure=failure)
        if part == self.part:
            return
        self.part = part
        if part.state == group.SERVING and self.bridge is not None:
            self._spawn(self.bridge.probe_engine(), "engine probe")
        if part.state == group.FAILED:
            log.error("group %s: the part's engine failed: %s", part.assignment.group, failure, extra=GROUP)
        self._changed()

    # -------------------------------------------------------------- reports

    def _changed(self) -> None:
        """The part or what it reports changed: STATUS now, and the router hears it at once."""
        self._show()
        if self.link is not None:
            self.link.lease_soon()

    def _show(self) -> None:
        part = self.part
        if part is None:
            line = WAITING_FOR_ROUTER + (f"; cannot take part: {self.problem}" if self.problem else "")
            self.host.set_status("group", line)
            return
        line = group.status_line(part)
        if part.state == group.SERVING:
            self.host.node_serving(line)
        else:
            self.host.set_status("group-failed" if part.state == group.FAILED else "group", line)

    def _show_link(self, state: LinkState) -> None:
        self._show()

    def _report(self) -> codec.GroupStatus | None:
        if self.part is None:
            return None
        return group.report(self.part, fabric=self.fabric, engine_version=self.engine_version,
                            model_ready=self.model_ready and self.model == self.part.assignment.model)

    def hello_info(self) -> HelloInfo:
        hw = self.hardware
        return HelloInfo(
            models=(), max_concurrent=self.bridge.max_concurrent if self.bridge else 0,
            capabilities=(codec.GROUPS,),
            hardware={"gpus": len(hw.gpus) if hw else 0, "ram_bytes": hw.ram_bytes if hw else 0,
                      "cpus": hw.cpu_count if hw else 0, "host": platform.node()})

    def lease_info(self) -> LeaseInfo:
        if self.link is not None and self.link.last_lease_ack_at:
            self.metrics.lease_acknowledged(self.link.last_lease_ack_at)
        bridge, supervisor = self.bridge, self.supervisor
        return LeaseInfo(
            running=bridge.running if bridge else 0,
            waiting=int(self.engine_load.get("waiting", 0)),
            kv_cache_usage=self.engine_load.get("kv_cache_usage", 0.0),
            in_flight=tuple(bridge.in_flight_ids()) if bridge else (),
            engine_state=str(supervisor.state) if supervisor else str(EngineState.STOPPED),
            models=self.models_info() if bridge and self.prepared else (),
            max_concurrent=bridge.max_concurrent if bridge else 0,
            draining=bridge.draining if bridge else False,
            group=self._report(),
        )

    def status(self) -> dict[str, Any]:
        out = super().status()
        report = self._report()
        if report is None:
            out["group"] = {"state": "no assignment yet" if self.problem is None else "cannot take part",
                            "detail": self.problem}
        else:
            fields = dataclasses.asdict(report)
            fields["size"] = self.part.assignment.size if self.part else None
            out["group"] = fields
        return out

    # -------------------------------------------------------------- stop

    async def hand_over(self, drain_s: float) -> None:
        """A part's engine is never handed over: the next image is a new session, which
        starts the group over anyway (docs/groups.md)."""
        await self.stop(drain_s)
        return None
