"""Finding 7: SQLite on the router's event loop.

A lock on the store held by another process (an operator's `xim-router
agents`/`revoke`, a backup, anything holding a write lock) must delay the
router's writes, never its event loop; and a store write that fails when a
session ends must not keep that session's requests from failing over.
Real router process, real SQLite file, a raw enrolled node.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import zmq

from tests.security.rawnode import (
    MODEL,
    RawNode,
    chunk_payload,
    get,
    in_thread,
    post_json,
    serve_whole_answer,
    start_request,
)
from tests.support.router import RouterProcess, wait_for
from xim_proto import codec

# The router's SQLite busy timeout is 10 s: a lock held longer makes its write fail
# (and frees a blocked loop). Every check under the lock finishes well before that,
# so a loop that waits for SQLite is seen waiting, not let go by the timeout.
UNDER_LOCK_S = 6.0


@contextlib.contextmanager
def store_locked(db: Path) -> Iterator[None]:
    """Hold the write lock on the router's database, as another process's transaction would."""
    conn = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        conn.close()                       # rolls back and releases the lock


def next_event(response, timeout_s: float) -> bytes:
    """The data of the next SSE event, read in a thread so a stalled router fails the wait."""
    def read() -> bytes:
        while True:
            line = response.readline()
            if not line:
                return b""
            if line.startswith(b"data: "):
                return line[6:].strip()
    try:
        return in_thread(read).result(timeout_s)
    except TimeoutError:
        raise AssertionError(f"no stream event within {timeout_s} s") from None


def router(tmp_path: Path) -> RouterProcess:
    # Leases are sent by hand here: give the raw node all the time it needs.
    return RouterProcess(tmp_path, lease_interval="10s", lease_timeout="120s")


def test_a_locked_store_delays_the_routers_writes_not_its_loop(tmp_path):
    with router(tmp_path) as proc:
        node = RawNode(proc)
        try:
            node.hello()
            node.lease()
            pending = in_thread(start_request, proc, stream=True)
            infer = node.expect(codec.Infer)
            node.send(codec.Chunk(id=infer.id, seq=0, data=[chunk_payload("one")]))
            response = pending.result(30)
            assert response.status == 200
            assert b"one" in next_event(response, 30)

            with store_locked(proc.state_dir / "router.db"):
                # The router records this lease in the store, which waits for the lock.
                node.send(node.lease_msg(running=1, in_flight=[infer.id]))
                healthz = in_thread(get, proc.http_url + "/healthz", UNDER_LOCK_S)
                try:
                    status, body = healthz.result(UNDER_LOCK_S + 1)
                except (TimeoutError, OSError) as exc:
                    raise AssertionError("/healthz did not answer while another process held the "
                                         f"store's lock ({exc!r}): the event loop waited for SQLite") from None
                assert status == 200 and json.loads(body)["status"] == "ok"
                assert node.recv(UNDER_LOCK_S) is not None, "no lease_ack while the store was locked"
                node.send(codec.Chunk(id=infer.id, seq=1, data=[chunk_payload("two")]))
                assert b"two" in next_event(response, UNDER_LOCK_S), "the stream stalled with the store"

            node.send(codec.Done(id=infer.id, finish_reason="stop"))
            assert next_event(response, 30) == b"[DONE]"
            # The lease was delayed, not lost: it reaches the store once the lock is gone.
            wait_for(lambda: proc.agent(node.agent_id)["running"] == 1, 30, "the lease in the store")
            assert "Traceback" not in proc.log()
        finally:
            node.close()


FAIL_DISCONNECTS = """
CREATE TRIGGER fail_disconnects BEFORE UPDATE OF state ON agents
WHEN NEW.state = 'disconnected'
BEGIN SELECT RAISE(ABORT, 'injected: the disk is full'); END;
"""


def test_a_failed_state_write_at_session_end_still_fails_the_requests_over(tmp_path):
    with router(tmp_path) as proc:
        node = RawNode(proc)
        try:
            node.hello()
            node.lease()
            streamed = in_thread(start_request, proc, stream=True)
            first = node.expect(codec.Infer)
            node.send(codec.Chunk(id=first.id, seq=0, data=[chunk_payload("one")]))
            stream = streamed.result(30)
            assert b"one" in next_event(stream, 30)
            whole = in_thread(start_request, proc, stream=False)
            node.expect(codec.Infer)                      # the second request waits on this node

            db = sqlite3.connect(proc.state_dir / "router.db", isolation_level=None)
            db.executescript(FAIL_DISCONNECTS)
            node.send(codec.Bye(reason="leaving"))        # the router ends the session: the write fails

            # Both clients get a retryable error, not a hang until the deadline: the stream at
            # once; the whole request, which no engine has begun, after the router held it for
            # a node (`--hold-for-node`, 10 s by default).
            try:
                failure = next_event(stream, 60)
            except AssertionError:
                raise AssertionError("the streamed request was not failed over when the session "
                                     "ended with a failed store write: its client hangs") from None
            assert json.loads(failure)["error"]["code"] == "agent_unavailable", failure
            answer = whole.result(60)
            error = json.loads(answer.read())["error"]
            assert answer.status == 503 and error["code"] == "engine_unavailable", error
            assert "waited" in error["message"], error
            wait_for(lambda: "could not record" in proc.log(), 30, "the failed write to be logged")
            assert "injected: the disk is full" in proc.log()

            # The store heals; the node comes back and serves.
            db.execute("DROP TRIGGER fail_disconnects")
            db.close()
            node.hello()
            node.lease()
            answered = in_thread(start_request, proc, stream=False)
            serve_whole_answer(node, {"model": MODEL, "choices": []})
            assert answered.result(30).status == 200
        finally:
            node.close()


def test_an_enrollment_waiting_for_the_store_does_not_stall_the_router(tmp_path):
    with router(tmp_path) as proc:
        key = proc.join_key()
        public = zmq.curve_keypair()[0].decode()
        with store_locked(proc.state_dir / "router.db"):
            enrolling = in_thread(post_json, proc.http_url + "/v1/enroll", {
                "join_key": key, "curve_public_key": public, "hostname": "late",
                "max_concurrent": 1, "agent_version": "test"})
            # Ask over a while: the enrollment reaches the store (and waits) meanwhile.
            for _ in range(10):
                healthz = in_thread(get, proc.http_url + "/healthz", UNDER_LOCK_S)
                try:
                    status, _ = healthz.result(UNDER_LOCK_S + 1)
                except (TimeoutError, OSError) as exc:
                    raise AssertionError("/healthz did not answer while an enrollment waited for "
                                         f"the store's lock ({exc!r})") from None
                assert status == 200
                time.sleep(0.2)
            assert not enrolling.done()              # it waits for the store, as it must
        status, body = enrolling.result(30)
        assert status == 200 and body["worker_id"].startswith("worker-")
