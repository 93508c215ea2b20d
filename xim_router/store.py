"""The router's persistent state: join keys, agents, tokens (SQLite in the state dir).

Secrets are stored as SHA-256 digests only. Every write is one short
transaction, so the `xim-router` admin commands (join-key create, agents set,
revoke) can run beside a live `xim-router serve`: the server re-reads
revocations and node policies from here (docs/protocol.md §7).

The schema grows by numbered migrations (``MIGRATIONS``, counted in SQLite's
``user_version``), so a state directory made by an older router opens as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from xim_proto.joinkey import fingerprint
from xim_router import keys
from xim_router.groups import GroupSpec
from xim_router.policy import NodePolicy

SCHEMA = """
CREATE TABLE IF NOT EXISTS join_keys (
    digest TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    uses_left INTEGER NOT NULL,
    model TEXT
);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    worker_id TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL UNIQUE,
    hostname TEXT NOT NULL,
    hardware TEXT NOT NULL,
    max_concurrent INTEGER NOT NULL,
    agent_version TEXT NOT NULL,
    assigned_model TEXT,
    join_key_fingerprint TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    state TEXT NOT NULL,
    state_since REAL NOT NULL,
    last_seen_at REAL,
    last_lease TEXT
);
CREATE TABLE IF NOT EXISTS tokens (
    digest TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents(agent_id),
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""

# Each entry moves the schema one version on (PRAGMA user_version); never edit one
# that has shipped, append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: what the operator lets a node serve. NULL allowed_models means any model: what
    # every key and node had before, so an upgrade changes nothing that was running.
    ("ALTER TABLE join_keys ADD COLUMN allowed_models TEXT",
     "ALTER TABLE join_keys ADD COLUMN max_concurrent_ceiling INTEGER",
     "ALTER TABLE agents ADD COLUMN allowed_models TEXT",
     "ALTER TABLE agents ADD COLUMN max_concurrent_ceiling INTEGER"),
    # 2: groups (one model on several agents, docs/groups.md): members are worker ids in rank
    # order (JSON); the epoch only grows, so that a member never takes an old assignment for new.
    ("CREATE TABLE groups (name TEXT PRIMARY KEY, model TEXT NOT NULL, "
     "tensor_parallel_size INTEGER NOT NULL, pipeline_parallel_size INTEGER NOT NULL, "
     "members TEXT NOT NULL, epoch INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL)",),
)

# Agent states (docs/protocol.md §7). revoked and unenrolled are final: the
# CURVE key is refused at the handshake from then on.
PENDING, ACTIVE, DISCONNECTED, DEAD, REVOKED, UNENROLLED = (
    "pending", "active", "disconnected", "dead", "revoked", "unenrolled")
FINAL_STATES = (REVOKED, UNENROLLED)

# How long a node that lost the answer to its enrollment (crash, full disk) may
# repeat it with the same join key and keypair (docs/protocol.md §3.1).
ENROLL_REPLAY_WINDOW_S = 3600.0


@dataclass(frozen=True)
class StoredGroup:
    spec: GroupSpec
    epoch: int
    created_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StoredGroup:
        spec = GroupSpec(row["name"], row["model"], row["tensor_parallel_size"], row["pipeline_parallel_size"],
                         tuple(json.loads(row["members"])))
        return cls(spec, row["epoch"], row["created_at"])


class StoreError(Exception):
    """A definitive refusal, with the code the HTTP API returns (docs/protocol.md §3.4)."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


def _models_to_db(models: frozenset[str] | None) -> str | None:
    return None if models is None else json.dumps(sorted(models))


def _models_from_db(text: str | None) -> frozenset[str] | None:
    return None if text is None else frozenset(json.loads(text))


@dataclass(frozen=True)
class JoinKey:
    fingerprint: str
    created_at: float
    expires_at: float
    uses_left: int
    model: str | None
    allowed_models: frozenset[str] | None        # None: any model
    max_concurrent_ceiling: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JoinKey:
        data = dict(row)
        data["allowed_models"] = _models_from_db(data["allowed_models"])
        return cls(**data)


@dataclass(frozen=True)
class Agent:
    agent_id: str
    worker_id: str
    public_key: str
    hostname: str
    hardware: dict
    max_concurrent: int
    agent_version: str
    assigned_model: str | None
    join_key_fingerprint: str
    enrolled_at: float
    state: str
    state_since: float
    last_seen_at: float | None
    last_lease: dict | None
    allowed_models: frozenset[str] | None        # None: any model
    max_concurrent_ceiling: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Agent:
        data = dict(row)
        data["hardware"] = json.loads(data["hardware"])
        data["last_lease"] = json.loads(data["last_lease"]) if data["last_lease"] else None
        data["allowed_models"] = _models_from_db(data["allowed_models"])
        return cls(**data)

    @property
    def policy(self) -> NodePolicy:
        return NodePolicy(self.allowed_models, self.max_concurrent_ceiling)


@dataclass(frozen=True)
class Enrolled:
    agent: Agent
    token: str
    token_expires_at: float
    replayed: bool = False     # a repeat of an earlier enrollment: nothing was spent


# How long a write waits for a lock another connection holds (an admin command,
# a backup) before it fails. In `xim-router serve` only the store's own thread
# waits (StoreWorker), never the event loop.
BUSY_TIMEOUT_S = 10.0


class Store:
    """The database, with one SQLite connection per thread that uses it.

    SQLite serialises the calls on one connection, so a thread waiting out a
    lock on it would hold up every other thread using that connection; with a
    connection each, WAL lets readers go on while a writer waits.
    """

    def __init__(self, state_dir: Path):
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = state_dir / "router.db"
        if not self.path.exists():   # create it private before SQLite writes anything in it
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self._migrate()

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (opened on its first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # check_same_thread=False only so that close() may close every thread's connection.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=NORMAL")   # WAL: durable across crashes, cheaper per lease
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    @contextlib.contextmanager
    def _write(self):
        """One write transaction, taken before reading so two writers never interleave."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _migrate(self) -> None:
        """Bring an older store up to date; in one transaction, so two processes opening
        it at once (serve and an admin command) migrate it once."""
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number:d}")

    # ------------------------------------------------------------ join keys

    def create_join_key(self, *, ttl_s: float, uses: int, model: str | None,
                        allowed_models: frozenset[str] | None = None,
                        max_concurrent_ceiling: int | None = None, now: float | None = None) -> str:
        """A new key; the agents it enrolls get its policy (``allowed_models`` None: any model)."""
        now = time.time() if now is None else now
        key = keys.new_join_key()
        with self._write() as db:
            db.execute("INSERT INTO join_keys (digest, fingerprint, created_at, expires_at, uses_left, "
                       "model, allowed_models, max_concurrent_ceiling) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (keys.digest(key), fingerprint(key), now, now + ttl_s, uses, model,
                        _models_to_db(allowed_models), max_concurrent_ceiling))
        return key

    def join_keys(self) -> list[JoinKey]:
        rows = self.db.execute("SELECT fingerprint, created_at, expires_at, uses_left, model, "
                               "allowed_models, max_concurrent_ceiling "
                               "FROM join_keys ORDER BY created_at").fetchall()
        return [JoinKey.from_row(r) for r in rows]

    # ------------------------------------------------------------ enrollment

    def enroll(self, *, join_key: str, public_key: str, hostname: str, hardware: dict,
               max_concurrent: int, agent_version: str, token_ttl_s: float,
               now: float | None = None) -> Enrolled:
        """Spend one use of ``join_key`` and register a new agent, atomically.

        A repeat of an enrollment (docs/protocol.md §3.1) spends nothing: the same
        key from the same CURVE public key, for an agent that has never connected,
        within ENROLL_REPLAY_WINDOW_S, answers with that agent and a fresh token.
        """
        now = time.time() if now is None else now
        with self._write() as db:
            row = db.execute("SELECT * FROM join_keys WHERE digest = ?",
                             (keys.digest(join_key),)).fetchone()
            if row is None:
                raise StoreError("invalid_join_key", "this join key is not known to the router")
            replayed = self._replayed_enrollment(db, row["fingerprint"], public_key, token_ttl_s, now)
            if replayed is not None:
                return replayed
            if row["expires_at"] <= now:
                raise StoreError("join_key_expired", "this join key has expired; create a new one")
            if row["uses_left"] <= 0:
                raise StoreError("join_key_used", "this join key has already been used")
            if db.execute("SELECT 1 FROM agents WHERE public_key = ?", (public_key,)).fetchone():
                raise StoreError("key_in_use", "this CURVE public key belongs to an enrolled agent")
            db.execute("UPDATE join_keys SET uses_left = uses_left - 1 WHERE digest = ?",
                       (row["digest"],))
            agent_id = str(uuid.uuid4())
            worker_id = "worker-" + agent_id.replace("-", "")[:12]
            db.execute("INSERT INTO agents (agent_id, worker_id, public_key, hostname, hardware, "
                       "max_concurrent, agent_version, assigned_model, join_key_fingerprint, "
                       "enrolled_at, state, state_since, allowed_models, max_concurrent_ceiling) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (agent_id, worker_id, public_key, hostname, json.dumps(hardware),
                        max_concurrent, agent_version, row["model"], row["fingerprint"], now,
                        PENDING, now, row["allowed_models"], row["max_concurrent_ceiling"]))
            token, expires_at = self._issue_token(db, agent_id, token_ttl_s, now)
        enrolled = self.agent(agent_id)
        assert enrolled is not None          # inserted above, in the same transaction
        return Enrolled(enrolled, token, expires_at)

    def _replayed_enrollment(self, db, key_fingerprint: str, public_key: str, token_ttl_s: float,
                             now: float) -> Enrolled | None:
        """The agent an earlier answer created, when this request repeats it; None otherwise.

        A node that lost the answer (a crash, a full disk) retries with the keypair it
        saved first. Only an agent that never connected qualifies: one that did has
        its identity, and nobody but the holder of its secret key can connect.
        The tokens the lost answer carried are void: the new one replaces them.
        """
        found = db.execute("SELECT * FROM agents WHERE public_key = ? AND join_key_fingerprint = ? "
                           "AND state = ? AND enrolled_at > ?",
                           (public_key, key_fingerprint, PENDING, now - ENROLL_REPLAY_WINDOW_S)).fetchone()
        if found is None:
            return None
        agent = Agent.from_row(found)
        db.execute("DELETE FROM tokens WHERE agent_id = ?", (agent.agent_id,))
        token, expires_at = self._issue_token(db, agent.agent_id, token_ttl_s, now)
        return Enrolled(agent, token, expires_at, replayed=True)

    @staticmethod
    def _issue_token(db, agent_id: str, ttl_s: float, now: float) -> tuple[str, float]:
        token = keys.new_token()
        db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?)",
                   (keys.digest(token), agent_id, now, now + ttl_s))
        return token, now + ttl_s

    def check_token(self, token: str, *, grace_s: float = 0.0, now: float | None = None) -> Agent:
        """The agent ``token`` belongs to, if it is valid (expired less than grace_s ago)."""
        now = time.time() if now is None else now
        row = self.db.execute("SELECT agent_id, expires_at FROM tokens WHERE digest = ?",
                              (keys.digest(token),)).fetchone()
        if row is None:
            raise StoreError("invalid_token", "this token is not known to the router")
        agent = self.agent(row["agent_id"])
        if agent is None or agent.state in FINAL_STATES:
            raise StoreError("revoked", "this agent's identity was revoked or unenrolled; "
                                        "enroll again with a new join key")
        if row["expires_at"] + grace_s <= now:
            raise StoreError("token_expired", "this token has expired")
        return agent

    def refresh_token(self, token: str, *, ttl_s: float, grace_s: float,
                      now: float | None = None) -> tuple[str, float]:
        """A new token for the owner of ``token`` (which may have expired within grace_s)."""
        now = time.time() if now is None else now
        agent = self.check_token(token, grace_s=grace_s, now=now)
        with self._write() as db:
            # Old tokens stay valid until their own expiry: an agent that
            # crashes before saving the new one can still use the old one.
            db.execute("DELETE FROM tokens WHERE agent_id = ? AND expires_at + ? <= ?",
                       (agent.agent_id, grace_s, now))
            return self._issue_token(db, agent.agent_id, ttl_s, now)

    # ------------------------------------------------------------ agents

    def agent(self, agent_id: str) -> Agent | None:
        row = self.db.execute("SELECT * FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        return Agent.from_row(row) if row else None

    def agent_by_public_key(self, public_key: str) -> Agent | None:
        row = self.db.execute("SELECT * FROM agents WHERE public_key = ?",
                              (public_key,)).fetchone()
        return Agent.from_row(row) if row else None

    def agents(self) -> list[Agent]:
        rows = self.db.execute("SELECT * FROM agents ORDER BY enrolled_at").fetchall()
        return [Agent.from_row(r) for r in rows]

    def set_state(self, agent_id: str, state: str, now: float | None = None) -> None:
        """Move a live agent to ``state``; a final state is never left this way."""
        now = time.time() if now is None else now
        with self._write() as db:
            db.execute("UPDATE agents SET state = ?, state_since = ? "
                       "WHERE agent_id = ? AND state != ? AND state NOT IN (?, ?)",
                       (state, now, agent_id, state, *FINAL_STATES))

    def set_policy(self, agent_id: str, policy: NodePolicy) -> bool:
        """What the agent may serve from now on; False when there is no such agent.
        A running router applies it at its next sweep."""
        with self._write() as db:
            cur = db.execute("UPDATE agents SET allowed_models = ?, max_concurrent_ceiling = ? "
                             "WHERE agent_id = ?",
                             (_models_to_db(policy.allowed_models), policy.max_concurrent, agent_id))
        return cur.rowcount == 1

    def record_lease(self, agent_id: str, lease: dict, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write() as db:
            db.execute("UPDATE agents SET last_seen_at = ?, last_lease = ? WHERE agent_id = ?",
                       (now, json.dumps(lease), agent_id))

    def final_state(self, agent_id: str, state: str, now: float | None = None) -> bool:
        """Revoke or unenroll; False when no such live agent."""
        now = time.time() if now is None else now
        with self._write() as db:
            cur = db.execute("UPDATE agents SET state = ?, state_since = ? "
                             "WHERE agent_id = ? AND state NOT IN (?, ?)",
                             (state, now, agent_id, *FINAL_STATES))
        # Tokens are kept so that a later refresh or hello is answered
        # "revoked" rather than "unknown token": the agent then knows why.
        return cur.rowcount == 1

    def ended_agents(self) -> set[str]:
        """Agent ids in a final state (the server polls this to end live sessions)."""
        rows = self.db.execute("SELECT agent_id FROM agents WHERE state IN (?, ?)",
                               FINAL_STATES).fetchall()
        return {r["agent_id"] for r in rows}

    # ------------------------------------------------------------ join keys by fingerprint

    # ------------------------------------------------------------ groups

    def create_group(self, spec: GroupSpec, now: float | None = None) -> None:
        """Declare a group; StoreError (bad_request) when its name is taken, a member is not
        an enrolled agent's worker id, or a member already belongs to another group."""
        now = time.time() if now is None else now
        with self._write() as db:
            if db.execute("SELECT 1 FROM groups WHERE name = ?", (spec.name,)).fetchone():
                raise StoreError("bad_request", f"a group named {spec.name!r} exists already")
            live = {r["worker_id"] for r in db.execute(
                "SELECT worker_id FROM agents WHERE state NOT IN (?, ?)", FINAL_STATES)}
            unknown = [w for w in spec.members if w not in live]
            if unknown:
                raise StoreError("bad_request", f"not the worker id of an enrolled agent: {', '.join(unknown)}")
            for row in db.execute("SELECT name, members FROM groups"):
                taken = sorted(set(json.loads(row["members"])) & set(spec.members))
                if taken:
                    raise StoreError("bad_request", f"{', '.join(taken)} already in group {row['name']!r}: "
                                                    "an agent runs one engine, so it is in one group at most")
            db.execute("INSERT INTO groups (name, model, tensor_parallel_size, pipeline_parallel_size, members, "
                       "epoch, created_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
                       (spec.name, spec.model, spec.tensor_parallel_size, spec.pipeline_parallel_size,
                        json.dumps(list(spec.members)), now))

    def groups(self) -> list[StoredGroup]:
        rows = self.db.execute("SELECT * FROM groups ORDER BY created_at").fetchall()
        return [StoredGroup.from_row(r) for r in rows]

    def delete_group(self, name: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM groups WHERE name = ?", (name,)).rowcount == 1

    def set_group_epoch(self, name: str, epoch: int) -> None:
        """The group's new epoch; never lower than what is stored."""
        with self._write() as db:
            db.execute("UPDATE groups SET epoch = MAX(epoch, ?) WHERE name = ?", (epoch, name))

    # ------------------------------------------------------------ join keys, revoking

    def revoke_join_key(self, key_fingerprint: str, now: float | None = None) -> bool:
        """Spend what is left of a live join key and expire it now; False when none is live.

        Expired rather than deleted: agents enrolled with it keep pointing at a
        row, and `join-key list` still shows it.
        """
        now = time.time() if now is None else now
        with self._write() as db:
            cur = db.execute("UPDATE join_keys SET uses_left = 0, expires_at = ? "
                             "WHERE fingerprint = ? AND expires_at > ? AND uses_left > 0",
                             (now, key_fingerprint, now))
        return cur.rowcount > 0

    # ------------------------------------------------------------ what a bare token may still do

    def require_recent_proof(self, agent: Agent, *, within_s: float, now: float | None = None) -> None:
        """Refuse a bare token's refresh or unenroll for a node not proven within ``within_s``.

        Proof is the join key (enrolled_at) or a lease over the CURVE mesh
        (last_seen_at): only the holder of the node's secret key sends one. A
        token stolen from a node that is gone then cannot be renewed forever.
        """
        now = time.time() if now is None else now
        proven_at = max(agent.enrolled_at, agent.last_seen_at or 0.0)
        if now - proven_at > within_s:
            raise StoreError("token_expired", "this node has not been on the mesh for longer than the "
                                              "refresh grace; a token alone no longer renews or "
                                              "unenrolls it: enroll again with a new join key")

# ---------------------------------------------------------------- off the event loop

P = ParamSpec("P")
T = TypeVar("T")


class StoreWorker:
    """Runs store calls on one thread of their own, for code on an event loop.

    A lock held elsewhere (an operator's `xim-router revoke`, a backup) makes a
    write wait up to BUSY_TIMEOUT_S: here that delays the write, never the loop
    that serves requests. One thread keeps the writes in the order they were
    asked for.
    """

    def __init__(self, store: Store):
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xim-store")

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on the store's thread; its exception, if any, is raised here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Finish what was asked for, then stop the thread."""
        self._executor.shutdown(wait=True)
