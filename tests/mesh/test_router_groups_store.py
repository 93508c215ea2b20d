"""Groups in the router's store and on its command line: `xim-router groups [create|delete]`."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import pytest
import zmq

from xim_proto import codec
from xim_router import cli
from xim_router import store as store_mod
from xim_router.groups import GroupSpec
from xim_router.mesh import _summary


def enroll(store: store_mod.Store) -> store_mod.Agent:
    key = store.create_join_key(ttl_s=60, uses=1, model=None)
    return store.enroll(join_key=key, public_key=zmq.curve_keypair()[0].decode(), hostname="h",
                        hardware={}, max_concurrent=2, agent_version="t", token_ttl_s=100.0).agent


@pytest.fixture
def store(tmp_path):
    s = store_mod.Store(tmp_path / "s")
    yield s
    s.close()


@pytest.fixture
def workers(store):
    return [enroll(store).worker_id for _ in range(3)]


def spec(members, name="llama", **changes) -> GroupSpec:
    return dataclasses.replace(GroupSpec(name, "meta-llama/Llama-3.1-405B", 8, 2, tuple(members)), **changes)


def test_a_group_is_stored_with_its_ranks_and_epoch_zero(store, workers):
    store.create_group(spec(workers[:2]), now=5.0)
    [stored] = store.groups()
    assert stored.spec == spec(workers[:2]) and stored.epoch == 0 and stored.created_at == 5.0


@pytest.mark.parametrize(("make", "message"), [
    (lambda w: spec(w[:2]), "exists already"),
    (lambda w: spec([w[0], "worker-000000000000"], name="other"), "not the worker id of an enrolled agent"),
    (lambda w: spec([w[1], w[2]], name="other"), "already in group 'llama'"),
])
def test_what_the_store_refuses(store, workers, make, message):
    store.create_group(spec(workers[:2]))
    with pytest.raises(store_mod.StoreError, match=message):
        store.create_group(make(workers))


def test_a_revoked_agent_cannot_be_a_member(store, workers):
    agent_id = next(a.agent_id for a in store.agents() if a.worker_id == workers[0])
    store.final_state(agent_id, store_mod.REVOKED)
    with pytest.raises(store_mod.StoreError, match="not the worker id"):
        store.create_group(spec(workers[:2]))


def test_the_epoch_only_grows(store, workers):
    store.create_group(spec(workers[:2]))
    store.set_group_epoch("llama", 4)
    store.set_group_epoch("llama", 2)
    assert store.groups()[0].epoch == 4
    assert store.delete_group("llama") and not store.delete_group("llama") and store.groups() == []


def test_a_store_of_the_previous_schema_gains_the_groups_table(tmp_path):
    path = tmp_path / "s"
    store_mod.Store(path).close()
    db = sqlite3.connect(path / "router.db")
    db.execute("DROP TABLE groups")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    reopened = store_mod.Store(path)
    try:
        assert reopened.groups() == []
        assert reopened.db.execute("PRAGMA user_version").fetchone()[0] == len(store_mod.MIGRATIONS)
    finally:
        reopened.close()


# ---------------------------------------------------------------- the command line


def run(capsys, *args) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_create_list_and_delete(tmp_path, store, workers, capsys):
    state = str(tmp_path / "s")
    agent_id = next(a.agent_id for a in store.agents() if a.worker_id == workers[1])
    status, out, _ = run(capsys, "groups", "create", "llama", workers[0], agent_id, "--model",
                         "meta-llama/Llama-3.1-405B", "--tp", "8", "--pp", "2", "--state-dir", state)
    assert status == 0 and f"led by {workers[0]}" in out
    assert store.groups()[0].spec.members == (workers[0], workers[1])      # an agent id becomes its worker id

    lease = codec.Lease(seq=1, running=0, waiting=0, kv_cache_usage=0.0, engine_state="stopped", models=[],
                        in_flight=[], max_concurrent=2, draining=False, group=codec.GroupStatus(
                            group="llama", epoch=3, rank=1, state="waiting", fabric_address="10.0.0.12",
                            engine_version="0.32.0", detail="waiting for the leader"))
    store.record_lease(agent_id, _summary(lease, 1.0))
    status, out, _ = run(capsys, "groups", "--state-dir", state)
    assert status == 0 and "8x2" in out and f"0:{workers[0]} pending" in out and f"1:{workers[1]} waiting@3" in out
    status, out, _ = run(capsys, "groups", "--state-dir", state, "--format", "json")
    [row] = json.loads(out)
    assert row["epoch"] == 0 and [p["rank"] for p in row["members"]] == [0, 1]
    assert row["members"][1]["part"] == "waiting" and row["members"][1]["fabric_address"] == "10.0.0.12"
    assert row["members"][1]["detail"] == "waiting for the leader" and row["members"][0]["part"] is None

    status, out, _ = run(capsys, "groups", "delete", "llama", "--state-dir", state)
    assert status == 0 and "stop their parts" in out
    assert run(capsys, "groups", "--state-dir", state)[1].startswith("no groups")


@pytest.mark.parametrize(("args", "status", "message"), [
    (["create", "g", "worker-a", "--model", "org/m", "--tp", "2"], 2, "at least two members"),
    (["create", "g", "worker-a", "worker-b", "--model", "org/m", "--tp", "3"], 2, "do not split evenly"),
    (["create", "g", "worker-a", "worker-b", "--model", "org/m", "--tp", "2"], 1, "not the worker id"),
    (["delete", "nope"], 1, "no group 'nope'"),
])
def test_command_errors(tmp_path, capsys, args, status, message):
    result = run(capsys, "groups", *args, "--state-dir", str(tmp_path / "s"))
    assert result[0] == status and message in result[2] and "Traceback" not in result[2]


@pytest.mark.parametrize(("args", "message"), [
    (["create", "-bad", "a", "b", "--model", "org/m", "--tp", "2"], "unrecognized arguments: -bad"),
    (["create", "a/b", "a", "b", "--model", "org/m", "--tp", "2"], "is not a group name"),
    (["create", "g", "a", "b", "--tp", "2"], "--model"),
    (["create", "g", "a", "b", "--model", "org/m", "--tp", "0"], "at least 1"),
])
def test_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as caught:
        cli.main(["groups", *args, "--state-dir", str(tmp_path / "s")])
    assert caught.value.code == 2 and message in capsys.readouterr().err
