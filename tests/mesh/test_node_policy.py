"""What the operator lets a node serve: the pure policy, its storage (with the migration of
an older store) and the `xim-router join-key create` / `agents set` commands that write it.

The attack it stops is driven end to end in tests/security/test_self_declared_models.py.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
import zmq

from xim_proto import codec
from xim_router import dataplane, keys
from xim_router import store as store_mod
from xim_router.mesh import Router, absent_models_of
from xim_router.policy import MAX_CONCURRENT_LIMIT, NodePolicy, check_max_concurrent, check_model_name, shown


def models(*names: str) -> list[codec.Model]:
    return [codec.Model(name=n, state="ready") for n in names]


def enroll(store: store_mod.Store, key: str) -> store_mod.Agent:
    return store.enroll(join_key=key, public_key=zmq.curve_keypair()[0].decode(), hostname="h",
                        hardware={}, max_concurrent=2, agent_version="t", token_ttl_s=100.0).agent


# ---------------------------------------------------------------- the pure policy


def test_a_policy_allows_its_models_and_caps_what_a_node_declares():
    narrow = NodePolicy(frozenset({"a", "b"}), 3)
    assert narrow.allows("a") and not narrow.allows("c")
    assert [m.name for m in narrow.permitted(models("c", "b", "a", "c"))] == ["b", "a"]
    assert narrow.refused(models("c", "b", "z", "c")) == ("c", "z")
    assert [narrow.capacity(d) for d in (1, 3, 10**9)] == [1, 3, 3]
    anything = NodePolicy()
    assert anything.allows("whatever") and anything.refused(models("x")) == ()
    assert anything.capacity(10**9) == MAX_CONCURRENT_LIMIT      # a claim is never believed past the limit
    assert anything.capacity(7) == 7
    assert NodePolicy(frozenset()).permitted(models("a")) == []
    assert narrow.describe() == "may serve a, b; at most 3 request(s) at once"
    assert anything.describe().startswith("may serve any model; as many requests at once as it declares")


def test_names_from_a_node_are_shown_escaped_and_bounded():
    assert shown(["a\nb", "\x1b[2J"]) == r"'a\nb', '\x1b[2J'"
    long = shown(["x" * 1000] * 9)
    assert len(long) < 600 and long.endswith("and 4 more")


@pytest.mark.parametrize("name", ["", "-rf", "a b", "a\nb", "\x1b[31m", "x" * 257])
def test_bad_model_names_are_refused(name):
    with pytest.raises(ValueError):
        check_model_name(name)


def test_good_model_names_and_the_max_concurrent_range():
    assert check_model_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert check_max_concurrent(1) == 1 and check_max_concurrent(MAX_CONCURRENT_LIMIT) == MAX_CONCURRENT_LIMIT
    for bad in (0, -1, MAX_CONCURRENT_LIMIT + 1, 2**63):
        with pytest.raises(ValueError, match=f"1 to {MAX_CONCURRENT_LIMIT}"):
            check_max_concurrent(bad)


# ---------------------------------------------------------------- the store


def test_an_agent_gets_its_join_keys_policy_and_the_operator_changes_it(store):
    key = store.create_join_key(ttl_s=60, uses=2, model="m", allowed_models=frozenset({"m", "n"}),
                                max_concurrent_ceiling=2)
    assert store.join_keys()[0].allowed_models == frozenset({"m", "n"})
    agent = enroll(store, key)
    assert agent.policy == NodePolicy(frozenset({"m", "n"}), 2)
    assert store.set_policy(agent.agent_id, NodePolicy(None, 5))
    assert store.agent(agent.agent_id).policy == NodePolicy(None, 5)
    assert store.set_policy(agent.agent_id, NodePolicy(frozenset(), None))
    assert store.agent(agent.agent_id).policy == NodePolicy(frozenset(), None)
    assert not store.set_policy("no-such-agent", NodePolicy())
    anything = enroll(store, store.create_join_key(ttl_s=60, uses=1, model=None))
    assert anything.policy == NodePolicy()


# The store as the first release of xim-router wrote it (user_version 0).
SCHEMA_V0 = """
CREATE TABLE join_keys (digest TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, uses_left INTEGER NOT NULL, model TEXT);
CREATE TABLE agents (agent_id TEXT PRIMARY KEY, worker_id TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL UNIQUE, hostname TEXT NOT NULL, hardware TEXT NOT NULL,
    max_concurrent INTEGER NOT NULL, agent_version TEXT NOT NULL, assigned_model TEXT,
    join_key_fingerprint TEXT NOT NULL, enrolled_at REAL NOT NULL, state TEXT NOT NULL,
    state_since REAL NOT NULL, last_seen_at REAL, last_lease TEXT);
CREATE TABLE tokens (digest TEXT PRIMARY KEY, agent_id TEXT NOT NULL REFERENCES agents(agent_id),
    issued_at REAL NOT NULL, expires_at REAL NOT NULL);
"""


def test_a_store_written_by_the_previous_release_opens_and_keeps_its_nodes_serving(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    old_key = keys.new_join_key()
    db = sqlite3.connect(state / "router.db")
    db.executescript(SCHEMA_V0)
    db.execute("INSERT INTO join_keys VALUES (?, 'fp', 0, 9e12, 1, NULL)", (keys.digest(old_key),))
    db.execute("INSERT INTO agents VALUES ('a1', 'worker-a1', 'P', 'h', '{}', 4, '0.1.0', 'm', 'fp', 0, "
               "'active', 0, NULL, NULL)")
    db.commit()
    db.close()

    for _ in range(2):                          # opening it again changes nothing more
        store = store_mod.Store(state)
        version = store.db.execute("PRAGMA user_version").fetchone()[0]
        assert version == len(store_mod.MIGRATIONS)
        # An upgrade takes nothing away: nodes and keys from before may serve what they did.
        assert store.agent("a1").policy == NodePolicy()
        store.close()
    store = store_mod.Store(state)
    assert enroll(store, old_key).policy == NodePolicy()
    store.close()
    listed = cli("agents", "--state-dir", str(state), "--format", "json")
    assert json.loads(listed.stdout)[0]["allowed_models"] is None
    assert "any" in cli("agents", "--state-dir", str(state)).stdout


# ---------------------------------------------------------------- choosing


def test_a_model_only_refused_nodes_declare_is_not_found(store, tmp_path):
    agent = enroll(store, store.create_join_key(ttl_s=60, uses=1, model="a", allowed_models=frozenset({"a"})))
    store.record_lease(agent.agent_id, {"models": [{"name": "a", "state": "ready"},
                                                   {"name": "stolen", "state": "ready"}]})
    store.set_state(agent.agent_id, store_mod.DISCONNECTED)
    router = Router(store, keys.load_or_create_keypair(tmp_path / "state"), mesh_bind="tcp://127.0.0.1:0")
    router.absent_models.update(absent_models_of(store.agents()))     # what start() loads
    with pytest.raises(dataplane.RequestFailed) as refused:
        dataplane.choose(router, "stolen")
    assert (refused.value.code, refused.value.http_status) == ("model_not_found", 404)
    with pytest.raises(dataplane.RequestFailed) as later:
        dataplane.choose(router, "a")        # its node is reconnecting: worth a retry
    assert (later.value.code, later.value.http_status) == ("engine_unavailable", 503)


# ---------------------------------------------------------------- the commands


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xim_router.cli", *args], capture_output=True,
                          text=True, timeout=30)


def test_join_key_create_wants_to_be_told_what_its_nodes_may_serve(tmp_path):
    state = str(tmp_path / "s")
    refused = cli("join-key", "create", "--state-dir", state)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "--allow-model" in refused.stderr and "--allow-any-model" in refused.stderr
    assigned = cli("join-key", "create", "--state-dir", state, "--model", "m", "--allow-model", "n",
                   "--max-concurrent", "3")
    assert assigned.returncode == 0 and "may serve m, n; at most 3 request(s) at once" in assigned.stderr
    anything = cli("join-key", "create", "--state-dir", state, "--allow-any-model")
    assert anything.returncode == 0 and "may serve any model" in anything.stderr
    s = store_mod.Store(tmp_path / "s")
    assert [(k.model, k.allowed_models, k.max_concurrent_ceiling) for k in s.join_keys()] == [
        ("m", frozenset({"m", "n"}), 3), (None, None, None)]
    s.close()


@pytest.mark.parametrize("args, message", [
    (["--allow-model", "a", "--allow-any-model"], "not allowed with argument"),
    (["--allow-model", "a b"], "is not a model name"),
    (["--allow-model", "-x"], "expected one argument"),
    (["--model", "a\tb"], "is not a Hugging Face model id"),
    (["--allow-any-model", "--max-concurrent", "0"], f"1 to {MAX_CONCURRENT_LIMIT}"),
    (["--allow-any-model", "--max-concurrent", str(10**9)], f"1 to {MAX_CONCURRENT_LIMIT}"),
    (["--allow-any-model", "--max-concurrent", "lots"], f"1 to {MAX_CONCURRENT_LIMIT}"),
])
def test_join_key_create_refuses_a_bad_policy(tmp_path, args, message):
    result = cli("join-key", "create", "--state-dir", str(tmp_path / "s"), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_agents_set_changes_only_what_it_is_given(tmp_path):
    state = str(tmp_path / "s")
    s = store_mod.Store(tmp_path / "s")
    agent = enroll(s, s.create_join_key(ttl_s=60, uses=1, model=None))
    s.close()

    def policy() -> NodePolicy:
        with_store = store_mod.Store(tmp_path / "s")
        try:
            return with_store.agent(agent.agent_id).policy
        finally:
            with_store.close()

    done = cli("agents", "set", agent.agent_id, "--allow-model", "a", "--allow-model", "b",
               "--state-dir", state)
    assert done.returncode == 0 and "may serve a, b" in done.stdout
    assert policy() == NodePolicy(frozenset({"a", "b"}), None)
    # --state-dir before the subcommand works as well.
    assert cli("agents", "--state-dir", state, "set", agent.agent_id, "--max-concurrent", "2").returncode == 0
    assert policy() == NodePolicy(frozenset({"a", "b"}), 2)
    assert cli("agents", "set", agent.agent_id, "--allow-model", "c", "--state-dir", state).returncode == 0
    assert policy() == NodePolicy(frozenset({"c"}), 2)                 # the list is replaced
    assert cli("agents", "set", agent.agent_id, "--allow-any-model", "--no-max-concurrent",
               "--state-dir", state).returncode == 0
    assert policy() == NodePolicy()
    row = json.loads(cli("agents", "--state-dir", state, "--format", "json").stdout)[0]
    assert (row["allowed_models"], row["max_concurrent_ceiling"]) == (None, None)


@pytest.mark.parametrize("args, status, message", [
    (["set", "no-such-agent", "--allow-model", "a"], 1, "no agent 'no-such-agent'"),
    (["set", "no-such-agent"], 2, "nothing to change"),
    (["set", "x", "--max-concurrent", "2", "--no-max-concurrent"], 2, "not allowed with argument"),
    (["set", "x", "--max-concurrent", "5000"], 2, f"1 to {MAX_CONCURRENT_LIMIT}"),
])
def test_agents_set_errors(tmp_path, args, status, message):
    result = cli("agents", *args, "--state-dir", str(tmp_path / "s"))
    assert result.returncode == status and message in result.stderr and "Traceback" not in result.stderr
