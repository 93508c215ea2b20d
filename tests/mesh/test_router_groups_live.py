"""A running `xim-router serve` forms, starts and restarts a group (docs/protocol.md §5.6).

Two nodes speak the protocol's frames themselves (tests/security/rawnode.py): hello with
the `groups` capability, leases that report their part. The router's side is real: the
store, `xim-router groups create`, the sweep, the sessions and their end.
"""

from __future__ import annotations

import json
import time

from tests.security.rawnode import RawNode
from tests.support.router import wait_for
from xim_proto import codec

MODEL = "org/big-model"


def report(assignment: codec.Group, state: str, rank: int, **changes) -> codec.GroupStatus:
    values = dict(group=assignment.group, epoch=assignment.epoch, rank=rank, state=state,
                  fabric_address=f"10.9.0.{rank + 1}", fabric_port=29500, engine_version="0.32.0",
                  model_ready=True)
    values.update(changes)
    return codec.GroupStatus(**values)


def told(node: RawNode, predicate, timeout_s: float = 15.0) -> codec.Group:
    """The first assignment the node hears that ``predicate`` accepts (earlier ones are skipped)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        msg = node.recv(left)
        if isinstance(msg, codec.Group) and predicate(msg):
            return msg
    raise AssertionError(f"{node.worker_id} was not told what was expected within {timeout_s} s")


def groups(router) -> list[dict]:
    return json.loads(router.admin("groups", "--format", "json").stdout)


def test_the_router_starts_a_group_once_all_are_ready_and_restarts_it_when_a_member_goes(router):
    leader, follower = RawNode(router, hostname="leader"), RawNode(router, hostname="follower")
    router.admin("groups", "create", "big", leader.worker_id, follower.worker_id, "--model", MODEL, "--tp", "2")
    leader.hello(models=(), capabilities=("credit", "cancel", codec.GROUPS))
    first = leader.expect(codec.Group, 10)
    assert (first.action, first.rank, first.size, first.model) == ("wait", 0, 2, MODEL)
    assert f"waiting for {follower.worker_id} (not connected)" in first.reason

    follower.hello(models=(), capabilities=("credit", "cancel", codec.GROUPS))
    mine = follower.expect(codec.Group, 10)
    assert (mine.action, mine.rank, mine.epoch) == ("wait", 1, first.epoch)
    # Both report that they wait for this epoch, the follower with another engine version first.
    follower.send(follower.lease_msg(models=(), group=report(mine, "waiting", 1, engine_version="0.33.0")))
    leader.send(leader.lease_msg(models=(), group=report(first, "waiting", 0)))
    told(leader, lambda g: g.action == "wait" and "same engine version" in g.reason)
    follower.send(follower.lease_msg(models=(), group=report(mine, "waiting", 1)))
    run = told(follower, lambda g: g.action == "run")
    assert (run.epoch, run.leader_address, run.leader_port, run.rank) == (first.epoch, "10.9.0.1", 29500, 1)
    assert told(leader, lambda g: g.action == "run").rank == 0

    # Serving: the leader declares the model like any node; the follower declares none.
    leader.send(leader.lease_msg(models=(MODEL,), group=report(run, "serving", 0)))
    follower.send(follower.lease_msg(models=(), group=report(run, "serving", 1)))
    wait_for(lambda: [p["part"] for p in groups(router)[0]["members"]] == ["serving", "serving"], 15,
             "both parts serving in `xim-router groups`")

    # The follower goes away: the leader stops its part, a new epoch begins.
    follower.close()
    told(leader, lambda g: (g.action, g.epoch) == ("wait", run.epoch + 1), 30)
    wait_for(lambda: groups(router)[0]["epoch"] == run.epoch + 1, 15, "the new epoch in the store")
    assert f"group big: epoch {run.epoch} ended: {follower.worker_id} disconnected" in router.log()
    leader.close()


def test_a_node_without_the_capability_keeps_the_group_waiting(router):
    a, b = RawNode(router), RawNode(router)
    router.admin("groups", "create", "big", a.worker_id, b.worker_id, "--model", MODEL, "--tp", "2")
    a.hello(models=(), capabilities=("credit", "cancel", codec.GROUPS))
    b.hello(models=())                                   # group.enabled off, or older than revision 1.4
    told(a, lambda g: f"{b.worker_id} does not run as a group member" in (g.reason or ""))
    assert not [m for m in b.drain_inbox(1.5) if isinstance(m, codec.Group)]
    a.close()
    b.close()


def test_deleting_a_group_tells_its_members_to_leave(router):
    a, b = RawNode(router), RawNode(router)
    router.admin("groups", "create", "big", a.worker_id, b.worker_id, "--model", MODEL, "--tp", "2")
    a.hello(models=(), capabilities=("credit", "cancel", codec.GROUPS))
    wait = a.expect(codec.Group, 10)
    a.send(a.lease_msg(models=(), group=report(wait, "waiting", 0)))
    router.admin("groups", "delete", "big")
    left = told(a, lambda g: g.action == "leave")
    assert (left.group, left.rank) == ("big", 0)
    a.close()
    b.close()
