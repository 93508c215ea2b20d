"""Groups on the router: one model on several agents, started and restarted as one. Pure.

A group (docs/groups.md, docs/protocol.md §5.6) is declared by the operator: a
model, its TP × PP, and its members, whose order is their rank (rank 0 leads and
serves the API; the router sends the group's requests to it like to any agent that
declares the model ready). What the router adds is the group's life:

- an **epoch**, the number of the group's current attempt. Every member runs the
  part of one epoch; a new epoch means every member stops and starts over.
- the **start gate**: `run` for an epoch only when every member is connected, can run
  a part (hello's capability `groups`), reports it waits for this epoch (so nothing of
  the previous one still runs), runs the same engine version, has the model complete
  in its cache and a fabric address, and the backoff is over. Until then every member
  hears `wait` with the reason, which its status line shows.
- the **restart**: once running, a member whose session ends (or is replaced) or whose
  part fails or stops makes a new epoch: vLLM itself notices none of that (a follower
  never notices a dead leader, the leader's health does not cover its followers).

`step` decides all of it from what the router knows now; the router sends each member
its assignment when it differs from the last one sent on that member's session.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from xim_proto import codec

# Backoff between epochs that ended before the group served: doubled from the first.
BACKOFF_FIRST_S = 2.0
BACKOFF_MAX_S = 120.0

# What the router says a group is doing (xim-router groups).
FORMING, STARTING, SERVING = "forming", "starting", "serving"


@dataclass(frozen=True)
class GroupSpec:
    """What the operator declared."""

    name: str
    model: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    members: tuple[str, ...]          # worker ids; a member's index is its rank

    def problem(self) -> str | None:
        """Why vLLM could not run this group, or None."""
        size = len(self.members)
        if size < 2:
            return f"a group has at least two members, not {size}"
        if len(set(self.members)) != size:
            return "a member is listed twice"
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            return "TP and PP must both be at least 1"
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        if world % size:
            return (f"TP {self.tensor_parallel_size} × PP {self.pipeline_parallel_size} = {world} "
                    f"workers do not split evenly over {size} members")
        return None

    def rank_of(self, worker_id: str) -> int:
        return self.members.index(worker_id)


@dataclass(frozen=True)
class Member:
    """What the router knows of one member now."""

    worker_id: str
    session: str | None = None                # its session id while connected
    capable: bool = False                     # its hello announced `groups`
    status: codec.GroupStatus | None = None   # its latest lease's report on this group


@dataclass(frozen=True)
class GroupRun:
    """The router's state of one group between steps."""

    epoch: int
    running: bool = False                     # `run` was sent for this epoch
    sessions: tuple[str | None, ...] = ()     # each member's session when `run` was sent
    leader_address: str | None = None         # as sent with `run`
    leader_port: int | None = None
    failures: int = 0                         # epochs in a row that ended before the group served
    not_before: float = 0.0                   # monotonic: no `run` before this
    serving: bool = False                     # every member reported serving in this epoch
    state: str = FORMING
    reason: str = ""                          # what it waits for now
    ended: str = ""                           # why the previous epoch ended


@dataclass(frozen=True)
class Step:
    run: GroupRun
    assignments: dict[str, codec.Group]       # worker id → what it should hear now (connected, capable ones)
    bumped: bool = False                      # a new epoch began (the router stores it and logs run.ended)


def backoff_s(failures: int) -> float:
    """The pause before the next `run` after ``failures`` epochs in a row ended before serving."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures - 1))


def step(spec: GroupSpec, run: GroupRun, members: Mapping[str, Member], now: float) -> Step:
    """The group's next state and each member's assignment, from what the router knows at ``now``."""
    views = [members.get(w) or Member(w) for w in spec.members]
    views = [dataclasses.replace(m, status=m.status if m.status and m.status.group == spec.name else None)
             for m in views]
    bumped = False
    if run.running:
        why = _lost(spec, run, views)
        if why is None:
            serving = all(m.status and m.status.epoch == run.epoch and m.status.state == "serving" for m in views)
            state = SERVING if serving else STARTING
            run = dataclasses.replace(run, serving=run.serving or serving, state=state, reason="",
                                      failures=0 if serving else run.failures)
            return Step(run, {m.worker_id: _assignment(spec, run, m, codec.GROUP_RUN) for m in views
                              if m.session and m.capable})
        failures = 1 if run.serving else run.failures + 1
        run = GroupRun(epoch=run.epoch + 1, failures=failures, not_before=now + backoff_s(failures),
                       ended=f"epoch {run.epoch} ended: {why}")
        bumped = True
    reason = _not_ready(spec, run, views, now)
    if reason is None:
        leader = views[0].status
        assert leader is not None and leader.fabric_address and leader.fabric_port is not None
        run = dataclasses.replace(run, running=True, sessions=tuple(m.session for m in views),
                                  leader_address=leader.fabric_address, leader_port=leader.fabric_port,
                                  serving=False, state=STARTING, reason="")
        action = codec.GROUP_RUN
    else:
        run = dataclasses.replace(run, state=FORMING, reason=reason)
        action = codec.GROUP_WAIT
    return Step(run, {m.worker_id: _assignment(spec, run, m, action) for m in views if m.session and m.capable},
                bumped)


def _lost(spec: GroupSpec, run: GroupRun, views: list[Member]) -> str | None:
    """Why the running epoch cannot go on, or None."""
    for member, session in zip(views, run.sessions, strict=True):
        if member.session is None:
            return f"{member.worker_id} disconnected"
        if member.session != session:
            return f"{member.worker_id} reconnected"
        status = member.status
        if status is not None and status.epoch == run.epoch and status.state in ("failed", "stopped"):
            return f"{member.worker_id}'s part {status.state}" + (f": {status.detail}" if status.detail else "")
    return None


def _not_ready(spec: GroupSpec, run: GroupRun, views: list[Member], now: float) -> str | None:
    """What the group waits for before `run` (the first thing missing), or None."""
    problem = spec.problem()
    if problem:
        return problem
    absent = [m.worker_id for m in views if m.session is None]
    if absent:
        return f"waiting for {', '.join(absent)} (not connected)"
    unable = [m.worker_id for m in views if not m.capable]
    if unable:
        # Its hello did not offer `groups`: both cases look the same from here.
        return (f"{', '.join(unable)} does not run as a group member (its group.enabled is off, "
                "or its ximd is older than protocol revision 1.4)")
    for m in views:
        status = m.status
        if status is not None and status.epoch == run.epoch and status.state == "failed":
            return f"{m.worker_id} cannot take part: {status.detail or 'no reason given'}"
    behind = [m.worker_id for m in views
              if m.status is None or m.status.epoch != run.epoch or m.status.state != "waiting"]
    if behind:
        return f"waiting for {', '.join(behind)} to stop any earlier part and report for epoch {run.epoch}"
    statuses = [(m.worker_id, m.status) for m in views if m.status is not None]
    no_fabric = [w for w, s in statuses if not s.fabric_address]
    if no_fabric:
        return f"{', '.join(no_fabric)} has no fabric address (its [group] settings)"
    if statuses[0][1].fabric_port is None:
        return f"the leader {statuses[0][0]} reports no fabric port"
    versions = {s.engine_version for _, s in statuses}
    if len(versions) != 1 or None in versions:
        shown = ", ".join(f"{w} {s.engine_version or 'unknown'}" for w, s in statuses)
        return f"every member must run the same engine version: {shown}"
    unready = [w for w, s in statuses if not s.model_ready]
    if unready:
        return f"waiting for {', '.join(unready)} to have {spec.model} complete in its model cache"
    if now < run.not_before:
        return f"restarting in {run.not_before - now:.0f} s ({run.failures} failed start(s) in a row)" + \
            (f"; {run.ended}" if run.ended else "")
    return None


def _assignment(spec: GroupSpec, run: GroupRun, member: Member, action: str) -> codec.Group:
    running = action == codec.GROUP_RUN
    return codec.Group(group=spec.name, epoch=run.epoch, action=action, model=spec.model,
                       tensor_parallel_size=spec.tensor_parallel_size,
                       pipeline_parallel_size=spec.pipeline_parallel_size,
                       rank=spec.rank_of(member.worker_id), size=len(spec.members),
                       leader_address=run.leader_address if running else None,
                       leader_port=run.leader_port if running else None,
                       reason=None if running else (run.reason or None))


def leave(status: codec.GroupStatus) -> codec.Group:
    """What an agent hears when it reports a part in a group it is no longer a member of (the
    operator took it out or deleted the group, perhaps while it was away): stop that part.
    Only group, epoch and rank matter with `leave`; the rest is what the wire requires."""
    return codec.Group(group=status.group, epoch=status.epoch, action=codec.GROUP_LEAVE, model="",
                       tensor_parallel_size=1, pipeline_parallel_size=1, rank=status.rank,
                       size=max(2, status.rank + 1), reason="no longer a member of this group")


@dataclass(frozen=True)
class Tick:
    sends: list[tuple[str, codec.Group]]      # (worker id, assignment) to send now
    epochs: dict[str, int]                    # group → its new epoch, to store
    ended: list[tuple[str, str]]              # (group, why its epoch ended), to log


class Coordinator:
    """Every declared group's run, and what each connected member was last told.

    The router calls `declare` with what its store holds (every sweep) and `tick` with what
    it knows of the connected agents (after each sweep, hello, member's lease, session end);
    `tick` returns only what changed for a session, so a member hears each assignment once.
    """

    def __init__(self) -> None:
        self.groups: dict[str, tuple[GroupSpec, GroupRun]] = {}
        self._told: dict[str, tuple[str, codec.Group]] = {}     # worker id → (session, last assignment)
        self._new_epochs: dict[str, int] = {}

    def declare(self, stored: list[tuple[GroupSpec, int]]) -> None:
        """The groups the operator declared, with their stored epochs. A new group (or one
        whose declaration changed, or the first sight after the router started) begins at
        the next epoch: whatever a member still runs from before is stopped first."""
        declared = {spec.name: (spec, epoch) for spec, epoch in stored}
        for name in list(self.groups):
            if name not in declared:
                del self.groups[name]
        for name, (spec, epoch) in declared.items():
            known = self.groups.get(name)
            if known is None or known[0] != spec:
                begin = max(epoch, known[1].epoch if known else 0) + 1
                self.groups[name] = (spec, GroupRun(epoch=begin))
                self._new_epochs[name] = begin

    def tick(self, connected: Mapping[str, Member], now: float) -> Tick:
        """Each group's step over the connected agents (worker id → Member, with the group
        report of its last lease whatever group it names)."""
        sends: list[tuple[str, codec.Group]] = []
        ended: list[tuple[str, str]] = []
        member_of: dict[str, str] = {}
        for name, (spec, run) in list(self.groups.items()):
            done = step(spec, run, connected, now)
            self.groups[name] = (spec, done.run)
            if done.bumped:
                self._new_epochs[name] = done.run.epoch
                ended.append((name, done.run.ended))
            for worker in spec.members:
                member_of[worker] = name
            sends += [(w, g) for w, g in done.assignments.items() if self._changed(connected[w], g)]
        for worker, member in connected.items():
            status = member.status
            if (status is not None and member.session and member_of.get(worker) != status.group
                    and status.state != "stopped"):
                g = leave(status)
                if self._changed(member, g):
                    sends.append((worker, g))
        epochs, self._new_epochs = self._new_epochs, {}
        return Tick(sends, epochs, ended)

    def _changed(self, member: Member, assignment: codec.Group) -> bool:
        told = (member.session or "", assignment)
        if self._told.get(member.worker_id) == told:
            return False
        self._told[member.worker_id] = told
        return True
