"""This node's part in a group (ximd/group.py, pure): assignments, engine news, the lease's report, STATUS."""

from __future__ import annotations

import dataclasses

import pytest

from xim_proto import codec
from ximd import group
from ximd.fabric import Fabric
from ximd.group import Action, Part, assign

FABRIC = Fabric("10.0.0.11", "eth1", 29500, 29599)


def msg(action="run", epoch=3, rank=1, **changes) -> codec.Group:
    values = dict(group="llama-405b", epoch=epoch, action=action, model="meta-llama/Llama-3.1-405B",
                  tensor_parallel_size=8, pipeline_parallel_size=2, rank=rank, size=2,
                  leader_address="10.0.0.10" if action == "run" else None,
                  leader_port=29500 if action == "run" else None,
                  reason="waiting for worker-b (not connected)" if action == "wait" else None)
    values.update(changes)
    return codec.Group(**values)


def test_wait_then_run_then_serving():
    part, action = assign(None, msg("wait", epoch=3))
    assert (part.state, action) == ("waiting", Action.NOTHING)
    assert group.status_line(part) == "group llama-405b: rank 1 of 2, waiting: waiting for worker-b (not connected)"
    part, action = assign(part, msg("run", epoch=3))
    assert (part.state, action) == ("starting", Action.START)
    assert group.status_line(part) == ("group llama-405b: rank 1 of 2, starting, waiting for the leader at "
                                       "10.0.0.10:29500 (epoch 3)")
    part = group.engine(part, started=True, healthy=False, failure=None)
    assert part.state == "serving" and group.status_line(part) == "group llama-405b: serving as rank 1 of 2"


def test_the_leader_serves_only_once_its_engine_answers():
    part, _ = assign(None, msg("run", rank=0))
    assert group.engine(part, started=True, healthy=False, failure=None).state == "starting"
    serving = group.engine(part, started=True, healthy=True, failure=None)
    assert group.status_line(serving) == "group llama-405b: serving as rank 0 of 2 (leader)"


def test_the_same_run_again_changes_nothing_a_new_epoch_restarts():
    part, _ = assign(None, msg("run"))
    assert assign(part, msg("run"))[1] is Action.NOTHING
    part, action = assign(part, msg("run", epoch=4))
    assert action is Action.START and part.epoch == 4


def test_wait_for_a_new_epoch_stops_a_running_part():
    part, _ = assign(None, msg("run"))
    part, action = assign(part, msg("wait", epoch=4))
    assert (part.state, part.epoch, action) == ("waiting", 4, Action.STOP)


def test_a_late_assignment_of_an_older_epoch_is_ignored():
    part, _ = assign(None, msg("run", epoch=5))
    assert assign(part, msg("wait", epoch=4)) == (part, Action.NOTHING)


def test_leave_stops_and_forgets_the_part():
    part, _ = assign(None, msg("run"))
    assert assign(part, msg("leave", leader_address=None, leader_port=None)) == (None, Action.STOP)
    waiting, _ = assign(None, msg("wait"))
    assert assign(waiting, msg("leave")) == (None, Action.NOTHING)
    assert assign(waiting, msg("leave", group="other")) == (waiting, Action.NOTHING)


def test_a_run_without_the_leader_is_a_failure_not_a_guess():
    part, action = assign(None, msg("run", leader_port=None))
    assert (part.state, action) == ("failed", Action.NOTHING) and "leader's address" in part.detail


def test_an_unknown_action_runs_nothing():
    running, _ = assign(None, msg("run"))
    part, action = assign(running, msg("dance", epoch=4))
    assert (part.state, action) == ("waiting", Action.STOP) and "unknown action 'dance'" in part.detail


def test_a_dead_engine_fails_the_part_and_is_not_restarted_here():
    part, _ = assign(None, msg("run"))
    failed = group.engine(part, started=False, healthy=False, failure="engine exited with status -9")
    assert failed.state == "failed"
    assert group.status_line(failed) == "group llama-405b: rank 1 of 2, cannot run: engine exited with status -9"
    assert group.engine(failed, started=True, healthy=True, failure=None) == failed   # only a new epoch helps


def test_a_node_that_cannot_take_part_says_why():
    part, _ = assign(None, msg("wait"))
    failed = group.cannot_take_part(part, "group fabric: 80.1.2.3 is a public address")
    status = group.report(failed, fabric=None, engine_version="0.32.0", model_ready=False)
    assert (status.state, status.fabric_address, status.detail) == ("failed", None, failed.detail)


def test_the_report_carries_what_the_router_gates_on():
    part, _ = assign(None, msg("wait"))
    status = group.report(part, fabric=FABRIC, engine_version="0.32.0", model_ready=True)
    assert status == codec.GroupStatus(group="llama-405b", epoch=3, rank=1, state="waiting",
                                       fabric_address="10.0.0.11", fabric_port=29500, engine_version="0.32.0",
                                       model_ready=True, detail="waiting for worker-b (not connected)")
    assert codec.decode(codec.encode(codec.Lease(
        seq=1, running=0, waiting=0, kv_cache_usage=0.0, engine_state="stopped", models=[], in_flight=[],
        max_concurrent=1, draining=False, group=status))).group == status
    long = dataclasses.replace(part, detail="x" * 5000)
    assert len(group.report(long, fabric=FABRIC, engine_version=None, model_ready=True).detail) == 1024


def test_the_engine_role_from_the_assignment_and_the_fabric():
    part, _ = assign(None, msg("run"))
    r = group.role(part, FABRIC)
    assert (r.rank, r.size, r.tensor_parallel_size, r.pipeline_parallel_size) == (1, 2, 8, 2)
    assert (r.master_address, r.master_port, r.fabric_address, r.fabric_interface, r.engine_port) == (
        "10.0.0.10", 29500, "10.0.0.11", "eth1", 29501)
    assert r.problem() is None and not r.leader


@pytest.mark.parametrize("state", ["waiting", "failed", "stopped"])
def test_engine_news_do_not_move_a_part_that_does_not_run(state):
    part = Part(msg("wait"), state)
    assert group.engine(part, started=True, healthy=True, failure=None) == part
