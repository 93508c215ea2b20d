"""The router's group logic (xim_router/groups.py, pure): the start gate, epochs, restarts with backoff."""

from __future__ import annotations

import dataclasses

import pytest

from xim_proto import codec
from xim_router.groups import (
    FORMING,
    SERVING,
    STARTING,
    Coordinator,
    GroupRun,
    GroupSpec,
    Member,
    backoff_s,
    leave,
    step,
)

SPEC = GroupSpec("llama-405b", "meta-llama/Llama-3.1-405B", 8, 2, ("worker-a", "worker-b"))


def status(epoch=1, state="waiting", rank=0, **changes) -> codec.GroupStatus:
    values = dict(group="llama-405b", epoch=epoch, rank=rank, state=state, fabric_address=f"10.0.0.1{rank}",
                  fabric_port=29500, engine_version="0.32.0", model_ready=True)
    values.update(changes)
    return codec.GroupStatus(**values)


def members(state="waiting", epoch=1, sessions=("s-a", "s-b"), **changes) -> dict[str, Member]:
    return {w: Member(w, sessions[rank], True, status(epoch, state, rank, **changes))
            for rank, w in enumerate(SPEC.members)}


def formed(now=100.0) -> GroupRun:
    """A group whose members all wait for epoch 1, and the step that starts it."""
    done = step(SPEC, GroupRun(epoch=1), members(), now)
    assert done.run.running
    return done.run


def test_a_ready_group_runs_with_the_leaders_fabric():
    done = step(SPEC, GroupRun(epoch=1), members(), 100.0)
    assert done.run.running and done.run.state == STARTING and not done.bumped
    a, b = done.assignments["worker-a"], done.assignments["worker-b"]
    assert (a.action, a.rank, b.rank, a.size, a.epoch) == ("run", 0, 1, 2, 1)
    assert (b.leader_address, b.leader_port) == ("10.0.0.10", 29500)
    assert (b.tensor_parallel_size, b.pipeline_parallel_size, b.model) == (8, 2, SPEC.model)


@pytest.mark.parametrize(("change", "reason"), [
    (lambda m: {**m, "worker-b": Member("worker-b")}, "waiting for worker-b (not connected)"),
    (lambda m: {**m, "worker-b": dataclasses.replace(m["worker-b"], capable=False)},
     "worker-b does not run as a group member (its group.enabled is off, or its ximd is older than "
     "protocol revision 1.4)"),
    (lambda m: {**m, "worker-b": dataclasses.replace(m["worker-b"], status=None)},
     "waiting for worker-b to stop any earlier part and report for epoch 1"),
    (lambda m: {**m, "worker-b": dataclasses.replace(m["worker-b"], status=status(rank=1, state="serving"))},
     "waiting for worker-b to stop"),
    (lambda m: {**m, "worker-a": dataclasses.replace(m["worker-a"], status=status(epoch=0))},
     "waiting for worker-a to stop"),
    (lambda m: {**m, "worker-b": dataclasses.replace(m["worker-b"], status=status(rank=1, fabric_address=None))},
     "worker-b has no fabric address"),
    (lambda m: {**m, "worker-b": dataclasses.replace(m["worker-b"], status=status(rank=1, engine_version="0.33.0"))},
     "same engine version: worker-a 0.32.0, worker-b 0.33.0"),
    (lambda m: {**m, "worker-b": dataclasses.replace(m["worker-b"], status=status(rank=1, model_ready=False))},
     "waiting for worker-b to have meta-llama/Llama-3.1-405B complete"),
    (lambda m: {**m, "worker-a": dataclasses.replace(m["worker-a"], status=status(fabric_port=None))},
     "the leader worker-a reports no fabric port"),
    (lambda m: {**m, "worker-b": dataclasses.replace(m["worker-b"], status=status(
        rank=1, state="failed", detail="group fabric: 80.1.2.3 is a public address"))},
     "worker-b cannot take part: group fabric: 80.1.2.3 is a public address"),
    (lambda m: {**m, "worker-b": dataclasses.replace(m["worker-b"], status=status(rank=1, group="other"))},
     "waiting for worker-b to stop"),
])
def test_the_gate_says_what_the_group_waits_for(change, reason):
    done = step(SPEC, GroupRun(epoch=1), change(members()), 100.0)
    assert not done.run.running and done.run.state == FORMING and reason in done.run.reason
    heard = done.assignments.values()
    assert heard and all(g.action == "wait" and g.reason == done.run.reason and g.leader_address is None
                         for g in heard)


def test_only_connected_capable_members_hear_anything():
    m = members()
    m["worker-b"] = Member("worker-b")
    assert set(step(SPEC, GroupRun(epoch=1), m, 0.0).assignments) == {"worker-a"}


def test_a_group_vllm_would_refuse_never_runs():
    spec = dataclasses.replace(SPEC, tensor_parallel_size=3, pipeline_parallel_size=1)
    assert "3 workers do not split evenly over 2 members" in step(spec, GroupRun(epoch=1), members(), 0.0).run.reason


@pytest.mark.parametrize(("members_", "problem"), [
    (("worker-a",), "at least two members"), (("worker-a", "worker-a"), "listed twice")])
def test_spec_problems(members_, problem):
    assert problem in GroupSpec("g", "m", 2, 1, members_).problem()


def test_serving_once_every_part_serves():
    run = formed()
    done = step(SPEC, run, members("starting"), 101.0)
    assert done.run.state == STARTING and all(g.action == "run" for g in done.assignments.values())
    done = step(SPEC, done.run, members("serving"), 140.0)
    assert done.run.state == SERVING and done.run.serving and not done.bumped


def test_a_lease_sent_before_run_arrived_does_not_restart_the_group():
    run = formed()
    assert not step(SPEC, run, members("waiting"), 100.5).bumped


@pytest.mark.parametrize(("change", "why"), [
    (lambda m: {**m, "worker-b": Member("worker-b")}, "worker-b disconnected"),
    (lambda m: {**m, "worker-b": dataclasses.replace(m["worker-b"], session="s-b2")}, "worker-b reconnected"),
    (lambda m: {**m, "worker-a": dataclasses.replace(m["worker-a"], status=status(
        state="failed", detail="engine exited with status -9"))}, "worker-a's part failed: engine exited with status -9"),
    (lambda m: {**m, "worker-b": dataclasses.replace(m["worker-b"], status=status(rank=1, state="stopped"))},
     "worker-b's part stopped"),
])
def test_losing_a_member_or_a_part_starts_a_new_epoch_for_everyone(change, why):
    run = step(SPEC, formed(), members("serving"), 140.0).run
    done = step(SPEC, run, change(members("serving")), 150.0)
    assert done.bumped and done.run.epoch == 2 and not done.run.running
    assert all(g.action == "wait" and g.epoch == 2 for g in done.assignments.values())
    assert done.run.ended == f"epoch 1 ended: {why}"


def test_a_part_that_failed_in_an_older_epoch_does_not_restart_the_new_one():
    run = formed()
    m = members("starting")
    m["worker-a"] = dataclasses.replace(m["worker-a"], status=status(epoch=0, state="failed"))
    assert not step(SPEC, run, m, 101.0).bumped


def test_restarts_back_off_until_the_group_serves_again():
    run, now = formed(), 100.0
    for failures, pause in ((1, 2.0), (2, 4.0), (3, 8.0)):
        lost = members("starting", epoch=run.epoch)
        lost["worker-b"] = Member("worker-b")
        done = step(SPEC, run, lost, now)
        assert done.bumped and done.run.failures == failures and done.run.not_before == now + pause
        back = members("waiting", epoch=done.run.epoch)
        early = step(SPEC, done.run, back, now + pause - 0.5)
        assert not early.run.running and "restarting in" in early.run.reason and "ended: worker-b disconnected" in early.run.reason
        run = step(SPEC, early.run, back, now + pause).run
        assert run.running
        now += pause
    served = step(SPEC, run, members("serving", epoch=run.epoch), now + 1).run
    assert served.failures == 0
    lost = members("serving", epoch=served.epoch)
    lost["worker-a"] = Member("worker-a")
    assert step(SPEC, served, lost, now + 2).run.failures == 1     # a group that served starts again fast


def test_backoff_is_capped():
    assert backoff_s(0) == 0 and backoff_s(1) == 2 and backoff_s(30) == 120


def test_leave():
    g = leave(status(epoch=4, rank=1))
    assert (g.action, g.group, g.rank, g.epoch, g.leader_address) == ("leave", "llama-405b", 1, 4, None)
    assert codec.decode(codec.encode(g)) == g


# ---------------------------------------------------------------- the coordinator


def test_a_declared_group_begins_after_its_stored_epoch_and_each_assignment_is_sent_once():
    coordinator = Coordinator()
    coordinator.declare([(SPEC, 6)])
    first = coordinator.tick(members(epoch=7), 100.0)
    assert first.epochs == {"llama-405b": 7} and not first.ended
    assert {w: (g.action, g.epoch) for w, g in first.sends} == {"worker-a": ("run", 7), "worker-b": ("run", 7)}
    again = coordinator.tick(members("starting", epoch=7), 101.0)
    assert again.sends == [] and again.epochs == {}
    reconnected = members("starting", epoch=7, sessions=("s-a", "s-b2"))
    bumped = coordinator.tick(reconnected, 102.0)
    assert bumped.epochs == {"llama-405b": 8} and bumped.ended == [("llama-405b", "epoch 7 ended: worker-b reconnected")]
    assert {w: (g.action, g.epoch) for w, g in bumped.sends} == {"worker-a": ("wait", 8), "worker-b": ("wait", 8)}


def test_a_changed_declaration_starts_over_and_a_new_session_hears_its_assignment_again():
    coordinator = Coordinator()
    coordinator.declare([(SPEC, 0)])
    coordinator.tick(members(), 0.0)
    coordinator.declare([(SPEC, 0)])                                    # the same: nothing changes
    assert coordinator.groups["llama-405b"][1].epoch == 1
    coordinator.declare([(dataclasses.replace(SPEC, model="other/model"), 0)])
    assert coordinator.groups["llama-405b"][1].epoch == 2
    tick = coordinator.tick(members(epoch=1, sessions=("s-a", "s-b")), 1.0)
    assert tick.epochs == {"llama-405b": 2} and all(g.action == "wait" for _, g in tick.sends)


def test_an_agent_reporting_a_part_in_a_group_it_is_not_in_is_told_to_leave_once():
    coordinator = Coordinator()
    coordinator.declare([(SPEC, 0)])
    coordinator.tick(members(), 0.0)
    coordinator.declare([])                                             # the operator deleted it
    stray = members("serving")
    tick = coordinator.tick(stray, 1.0)
    assert sorted((w, g.action, g.rank) for w, g in tick.sends) == [("worker-a", "leave", 0), ("worker-b", "leave", 1)]
    assert coordinator.tick(stray, 2.0).sends == []
    assert coordinator.tick(members("stopped"), 3.0).sends == []       # it stopped: nothing more to say
