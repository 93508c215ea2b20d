"""This node's part in a group, as the router assigns it (docs/protocol.md §5.6). Pure.

The router says what to do (`codec.Group`: run the part of an epoch, wait, leave); the
node does it and reports its part in every lease (`codec.GroupStatus`). `Part` holds
what the node knows; `assign` turns an assignment into what to do with the engine
(`Action`), `engine` folds in what the engine's supervisor reports, `report` is the
lease's record and `status_line` the STATUS line systemd shows.

The engine of a part is never restarted by the node on its own: an engine of a group
that dies is reported `failed`, and the router starts a new epoch for every member
(a follower never notices a dead leader; a lone restart would hang).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from xim_proto import codec
from ximd.engine.launch import GroupRole
from ximd.fabric import Fabric


class Action(enum.Enum):
    NOTHING = "nothing"
    STOP = "stop"                 # stop the part's engine, start nothing
    START = "start"               # stop whatever runs, then start the part of `Part.epoch`


WAITING, STARTING, SERVING, FAILED, STOPPED = codec.GROUP_STATES


@dataclass(frozen=True)
class Part:
    """What this node knows of its part in one group."""

    assignment: codec.Group
    state: str = WAITING          # one of codec.GROUP_STATES
    detail: str = ""              # why it waits or failed, for the report and STATUS

    @property
    def epoch(self) -> int:
        return self.assignment.epoch

    @property
    def leader(self) -> bool:
        return self.assignment.rank == 0


def assign(part: Part | None, msg: codec.Group) -> tuple[Part | None, Action]:
    """The part after the router's ``msg``, and what to do with the engine.

    An assignment older than the newest one seen for the group is a late frame: ignored.
    """
    if part is not None and part.assignment.group == msg.group and msg.epoch < part.epoch:
        return part, Action.NOTHING
    running = part is not None and part.state in (STARTING, SERVING)
    if msg.action == codec.GROUP_LEAVE:
        if part is None or part.assignment.group != msg.group:
            return part, Action.NOTHING
        return None, Action.STOP if running else Action.NOTHING
    if msg.action == codec.GROUP_RUN:
        if msg.leader_address is None or msg.leader_port is None:
            return Part(msg, FAILED, "the router's run came without the leader's address and port"), \
                Action.STOP if running else Action.NOTHING
        if part is not None and part.assignment == msg and running:
            return part, Action.NOTHING
        return Part(msg, STARTING), Action.START
    # wait (and an action this node does not know: the safe reading is to run nothing)
    reason = msg.reason or ("" if msg.action == codec.GROUP_WAIT else f"unknown action {msg.action!r}")
    return Part(msg, WAITING, reason), Action.STOP if running else Action.NOTHING


def engine(part: Part, *, started: bool, healthy: bool, failure: str | None) -> Part:
    """The part after its engine's news: ``failure`` (it died or cannot start), ``healthy``
    (the leader answers /health), ``started`` (a follower's engine runs: vLLM gives it no
    health endpoint of its own)."""
    if part.state not in (STARTING, SERVING):
        return part
    if failure:
        return dataclasses.replace(part, state=FAILED, detail=failure)
    if (part.leader and healthy) or (not part.leader and started):
        return dataclasses.replace(part, state=SERVING, detail="")
    return part


def cannot_take_part(part: Part, why: str) -> Part:
    """This node cannot run its part (no fabric, a public fabric, too few GPUs …): it says so."""
    return dataclasses.replace(part, state=FAILED, detail=why)


def role(part: Part, fabric: Fabric) -> GroupRole:
    """The engine's view of the part, for `ximd.engine.launch.build_launch(group=…)`."""
    g = part.assignment
    assert g.leader_address is not None and g.leader_port is not None   # assign() made sure
    return GroupRole(name=g.group, rank=g.rank, size=g.size, tensor_parallel_size=g.tensor_parallel_size,
                     pipeline_parallel_size=g.pipeline_parallel_size, master_address=g.leader_address,
                     master_port=g.leader_port, fabric_address=fabric.address, fabric_interface=fabric.interface,
                     engine_port=fabric.engine_port)


def report(part: Part, *, fabric: Fabric | None, engine_version: str | None, model_ready: bool) -> codec.GroupStatus:
    """The lease's record of the part (docs/protocol.md record GroupStatus)."""
    g = part.assignment
    return codec.GroupStatus(group=g.group, epoch=g.epoch, rank=g.rank, state=part.state,
                             fabric_address=fabric.address if fabric else None,
                             fabric_port=fabric.master_port if fabric else None,
                             engine_version=engine_version, model_ready=model_ready,
                             detail=part.detail[:1024] or None)


def status_line(part: Part) -> str:
    """What STATUS says: `group llama-405b: rank 1 of 2, waiting for the leader` / `serving as rank 1 of 2`."""
    g = part.assignment
    head = f"group {g.group}: "
    rank = f"rank {g.rank} of {g.size}" + (" (leader)" if g.rank == 0 else "")
    if part.state == SERVING:
        return head + f"serving as {rank}"
    if part.state == STARTING:
        if part.leader:
            return head + f"{rank}, starting the engine (epoch {g.epoch})"
        return head + f"{rank}, starting, waiting for the leader at {g.leader_address}:{g.leader_port} (epoch {g.epoch})"
    if part.state == FAILED:
        return head + f"{rank}, cannot run: {part.detail}"
    return head + f"{rank}, waiting" + (f": {part.detail}" if part.detail else " for the router")
