"""The router's pieces alone (store, keys, ZAP decision, sweep, HTTP errors, CLI) and link helpers."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import zmq
from zmq.utils import z85

from xim_proto import codec, joinkey, transport
from xim_proto.ratelimit import RateLimitedLog
from xim_router import enroll_api, keys, zap
from xim_router import store as store_mod
from xim_router.api_common import ApiError
from xim_router.dataplane import Exchange, Settings
from xim_router.mesh import Router, RouterSettings, Session
from ximd.mesh.link import Backoff


def new_public_key() -> str:
    return zmq.curve_keypair()[0].decode()


def enroll(store: store_mod.Store, key: str, **kw) -> store_mod.Enrolled:
    args = dict(join_key=key, public_key=new_public_key(), hostname="h", hardware={},
                max_concurrent=2, agent_version="t", token_ttl_s=100.0)
    args.update(kw)
    return store.enroll(**args)


# ---------------------------------------------------------------- store


def test_store_files_are_private_and_hold_no_raw_secret(tmp_path, store):
    key = store.create_join_key(ttl_s=60, uses=1, model=None)
    enrolled = enroll(store, key)
    pair = keys.load_or_create_keypair(tmp_path / "state")
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "router.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state" / "curve_keypair.json").stat().st_mode) == 0o600
    assert keys.load_or_create_keypair(tmp_path / "state") == pair       # created once
    assert pair.secret not in repr(pair)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "state").glob("router.db*"))
    assert key.encode() not in raw and enrolled.token.encode() not in raw


def test_join_key_uses_and_expiry(store):
    key = store.create_join_key(ttl_s=60, uses=2, model="m")
    assert enroll(store, key).agent.assigned_model == "m"
    enroll(store, key)
    with pytest.raises(store_mod.StoreError, match="join_key_used"):
        enroll(store, key)
    old = store.create_join_key(ttl_s=10, uses=1, model=None, now=1000.0)
    with pytest.raises(store_mod.StoreError, match="join_key_expired"):
        enroll(store, old, now=1010.0)
    with pytest.raises(store_mod.StoreError, match="invalid_join_key"):
        enroll(store, "xjk_" + "z" * 43)
    assert sorted(k.uses_left for k in store.join_keys()) == [0, 1]


def test_a_refused_enrollment_spends_nothing(store):
    taken = new_public_key()
    enroll(store, store.create_join_key(ttl_s=60, uses=1, model=None), public_key=taken)
    key = store.create_join_key(ttl_s=60, uses=1, model=None)
    with pytest.raises(store_mod.StoreError, match="key_in_use"):
        enroll(store, key, public_key=taken)
    assert store.join_keys()[-1].uses_left == 1          # rolled back
    assert len(store.agents()) == 1


def test_tokens_grace_refresh_and_revocation(store):
    enrolled = enroll(store, store.create_join_key(ttl_s=60, uses=1, model=None), now=1000.0)
    token = enrolled.token
    assert store.check_token(token, now=1050.0).agent_id == enrolled.agent.agent_id
    with pytest.raises(store_mod.StoreError, match="token_expired"):
        store.check_token(token, now=1200.0)
    new, expires = store.refresh_token(token, ttl_s=100.0, grace_s=500.0, now=1200.0)
    assert expires == 1300.0 and store.check_token(new, now=1250.0)
    with pytest.raises(store_mod.StoreError, match="invalid_token"):
        store.check_token("xat_unknown")
    assert store.final_state(enrolled.agent.agent_id, store_mod.REVOKED)
    assert not store.final_state(enrolled.agent.agent_id, store_mod.REVOKED)
    with pytest.raises(store_mod.StoreError, match="revoked"):
        store.check_token(new, now=1250.0)
    store.set_state(enrolled.agent.agent_id, store_mod.ACTIVE)          # final states stay
    assert store.agent(enrolled.agent.agent_id).state == store_mod.REVOKED
    assert store.ended_agents() == {enrolled.agent.agent_id}


def test_sweep_turns_disconnected_into_dead(store, tmp_path):
    agent = enroll(store, store.create_join_key(ttl_s=60, uses=1, model=None)).agent
    store.set_state(agent.agent_id, store_mod.DISCONNECTED, now=1000.0)
    router = Router(store, keys.load_or_create_keypair(tmp_path / "state"), mesh_bind="tcp://127.0.0.1:0",
                    settings=RouterSettings(dead_after_s=60.0))
    try:
        asyncio.run(router.sweep(now=1030.0))
        assert store.agent(agent.agent_id).state == store_mod.DISCONNECTED
        asyncio.run(router.sweep(now=1061.0))
        assert store.agent(agent.agent_id).state == store_mod.DEAD
    finally:
        router.store_worker.close()


# ---------------------------------------------------------------- ZAP


def test_zap_decision(store):
    agent = enroll(store, store.create_join_key(ttl_s=60, uses=1, model=None)).agent
    raw = z85.decode(agent.public_key.encode())
    allowed = zap.decide(b"CURVE", [raw], store.agent_by_public_key)
    assert (allowed.allowed, allowed.user_id) == (True, agent.agent_id)
    unknown = zap.decide(b"CURVE", [z85.decode(new_public_key().encode())], store.agent_by_public_key)
    assert not unknown.allowed and "unknown CURVE key" in unknown.reason
    assert not zap.decide(b"NULL", [], store.agent_by_public_key).allowed
    assert not zap.decide(b"PLAIN", [b"user", b"pass"], store.agent_by_public_key).allowed
    store.final_state(agent.agent_id, store_mod.REVOKED)
    revoked = zap.decide(b"CURVE", [raw], store.agent_by_public_key)
    assert not revoked.allowed and "revoked" in revoked.reason


# ---------------------------------------------------------------- enrollment input


GOOD = {"join_key": "xjk_" + "a" * 43, "curve_public_key": "P" * 40, "hostname": "h",
        "max_concurrent": 2, "agent_version": "1"}


@pytest.mark.parametrize("change, message", [
    ({"join_key": None}, "'join_key' must be a str"),
    ({"join_key": "not-a-key"}, "not a join key"),
    ({"curve_public_key": "short"}, "Z85 CURVE public key"),
    ({"hostname": ""}, "'hostname' must be 1 to 255"),
    ({"max_concurrent": 0}, "must be 1 to 4096"),
    ({"max_concurrent": 2**63}, "must be 1 to 4096"),
    ({"max_concurrent": True}, "'max_concurrent' must be a int"),
    ({"protocol_versions": ["1"]}, "list of integers"),
    ({"hardware": []}, "'hardware' must be a dict"),
])
def test_enroll_request_validation(change, message):
    body = {**GOOD, **change}
    with pytest.raises(ApiError, match=message) as info:
        enroll_api.parse_enroll_request({k: v for k, v in body.items() if v is not None})
    assert info.value.status == 400
    assert "not-a-key" not in info.value.message


@pytest.mark.parametrize("bound, host, configured, expected", [
    ("tcp://127.0.0.1:5555", "127.0.0.1:8080", (), ["tcp://127.0.0.1:5555"]),
    ("tcp://0.0.0.0:5555", "router.lan:8080", (), ["tcp://router.lan:5555"]),
    ("tcp://[::]:5555", "[fd00::1]:8080", (), ["tcp://[fd00::1]:5555"]),
    ("tcp://0.0.0.0:5555", "r:1", ("tcp://mesh.example:7000",), ["tcp://mesh.example:7000"]),
])
def test_advertised_endpoints(bound, host, configured, expected):
    assert enroll_api.advertised_endpoints(bound, host, configured) == expected


def test_parse_duration():
    assert [keys.parse_duration(t) for t in ("90", "90s", "15m", "2h", "7d", "0.5s")] == [
        90, 90, 900, 7200, 604800, 0.5]
    for bad in ("", "-1s", "1w", "0s", "abc"):
        with pytest.raises(ValueError):
            keys.parse_duration(bad)


# ---------------------------------------------------------------- the HTTP API, live


def post(url: str, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_errors_are_json_with_a_code(router):
    url = router.http_url
    assert post(url + "/v1/enroll", b"{nope") == (400, {"error": {
        "code": "bad_request", "message": "the body is not valid JSON"}})
    status, body = post(url + "/v1/enroll", {"join_key": "xjk_" + "a" * 43})
    assert status == 400 and "curve_public_key" in body["error"]["message"]
    status, body = post(url + "/v1/enroll", {**GOOD, "curve_public_key": new_public_key(),
                                             "protocol_versions": [99]})
    assert (status, body["error"]["code"]) == (400, "unsupported_version")
    assert post(url + "/v1/enroll/refresh", {})[1]["error"]["code"] == "missing_token"
    status, body = post(url + "/v1/enroll/refresh", {}, {"Authorization": "Bearer xat_nope"})
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    status, body = post(url + "/v1/unenroll", {}, {"Authorization": "Bearer xat_nope"})
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    status, body = post(url + "/v1/nothing-here", {})
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = post(url + "/v1/enroll", b"x" * (2 << 20))
    assert (status, body["error"]["code"]) == (413, "too_large")
    with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"
    assert "Traceback" not in router.log()


def test_key_in_use_is_409(router):
    public = new_public_key()
    first = post(router.http_url + "/v1/enroll", {**GOOD, "join_key": router.join_key(),
                                                  "curve_public_key": public})
    assert first[0] == 200
    status, body = post(router.http_url + "/v1/enroll", {**GOOD, "join_key": router.join_key(),
                                                         "curve_public_key": public})
    assert (status, body["error"]["code"]) == (409, "key_in_use")


# ---------------------------------------------------------------- CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xim_router.cli", *args], capture_output=True,
                          text=True, timeout=30)


def test_cli_join_key_agents_revoke(tmp_path):
    state = str(tmp_path / "s")
    created = cli("join-key", "create", "--state-dir", state, "--ttl", "2h", "--uses", "3", "--allow-any-model")
    assert created.returncode == 0
    assert joinkey.is_join_key(created.stdout.strip())
    assert "3 use(s)" in created.stderr and created.stdout.strip() not in created.stderr
    assert cli("agents", "--state-dir", state).stdout.strip() == "no agents enrolled"
    assert json.loads(cli("agents", "--state-dir", state, "--format", "json").stdout) == []
    missing = cli("revoke", "no-such-agent", "--state-dir", state)
    assert missing.returncode == 1 and "no agent 'no-such-agent'" in missing.stderr
    s = store_mod.Store(tmp_path / "s")
    agent = enroll(s, created.stdout.strip()).agent
    s.close()
    table = cli("agents", "--state-dir", state).stdout
    assert agent.agent_id in table and "pending" in table
    assert cli("revoke", agent.agent_id, "--state-dir", state).returncode == 0
    again = cli("revoke", agent.agent_id, "--state-dir", state)
    assert again.returncode == 1 and "already revoked" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["join-key", "create", "--ttl", "soon"], "is not a duration"),
    (["join-key", "create", "--uses", "0"], "at least 1"),
    (["serve", "--http", "8080"], "is not HOST:PORT"),
    (["serve", "--mesh", "ipc:///x"], "is not tcp://HOST:PORT"),
])
def test_cli_bad_arguments_are_one_line(tmp_path, args, message):
    result = cli(*args, "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_serve_startup_errors_are_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # 1: may pass (a port in use); 78 (EX_CONFIG): what was configured cannot work, and
        # xim-router.service does not restart on it.
        cases = [
            (["--http", f"127.0.0.1:{port}"], "cannot listen on 127.0.0.1", 1),
            (["--mesh", f"tcp://127.0.0.1:{port}"], "cannot listen on tcp://", 1),
            (["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(tmp_path / "k.pem")],
             "cannot load the TLS certificate", 78),
            (["--tls-cert", str(tmp_path / "none.pem")], "go together", 78),
            (["--lease-interval", "10s", "--lease-timeout", "5s"], "must be longer", 78),
        ]
        for extra, message, status in cases:
            result = cli("serve", "--state-dir", str(tmp_path / "s"), "--http", "127.0.0.1:0",
                         "--mesh", "tcp://127.0.0.1:0", *extra)
            assert result.returncode == status, (extra, result.stderr)
            assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


# ---------------------------------------------------------------- link helpers


def test_backoff_grows_with_jitter_and_resets():
    backoff = Backoff(initial=1.0, maximum=8.0, rng=random.Random(7))
    delays = [backoff.next() for _ in range(6)]
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8]):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)                 # jittered, not fixed steps
    backoff.reset()
    assert backoff.next() <= 1.0


def test_buffer_check_reads_back_and_names_the_sysctls():
    assert transport.granted_buffer(4 << 20, 2 * 212992) == 212992
    assert transport.granted_buffer(4 << 20, 8 << 20) == 4 << 20
    capped = transport.BufferCheck(4 << 20, 212992, 4 << 20)
    assert capped.capped and "net.core.wmem_max" in capped.describe()
    live = transport.check_socket_buffers(1 << 16)
    assert live.send >= 1 << 15 and not transport.BufferCheck(1 << 16, 1 << 16, 1 << 16).capped


def test_rate_limited_log_counts_what_it_suppressed(caplog):
    caplog.set_level(logging.INFO)
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), interval_s=10, clock=lambda: now[0])
    assert limited(logging.WARNING, "k", "bad frame %d", 1)
    assert not limited(logging.WARNING, "k", "bad frame %d", 2)
    assert not limited(logging.WARNING, "k", "bad frame %d", 3)
    assert limited(logging.WARNING, "other", "other key")
    now[0] = 11
    assert limited(logging.WARNING, "k", "bad frame %d", 4)
    assert caplog.messages == ["bad frame 1", "other key", "bad frame 4 (2 more like it suppressed)"]


# ---------------------------------------------------------------- one stream's writer


def test_a_writer_takes_every_queued_chunk_at_once_and_keeps_what_follows(store, tmp_path):
    router = Router(store, keys.load_or_create_keypair(tmp_path / "state"), mesh_bind="tcp://127.0.0.1:0")

    async def scenario():
        exchange = Exchange(router, Settings(), "r1", "w1")
        for seq in range(3):
            exchange.queue.put_nowait(codec.Chunk(id="r1", seq=seq, data=[b"{}"]))
        done = codec.Done(id="r1", finish_reason="stop", usage=None)
        exchange.queue.put_nowait(done)
        exchange.queue.put_nowait(codec.Chunk(id="r1", seq=9, data=[b"late"]))
        first = await exchange.next()
        rest = exchange.more_chunks()
        # Stops at the done: a chunk behind it is not the stream's any more.
        assert [c.seq for c in (first, *rest)] == [0, 1, 2] and exchange.more_chunks() == []
        assert await exchange.next() is done and exchange.finished

    try:
        asyncio.run(scenario())
    finally:
        router.store_worker.close()


def test_frames_written_together_are_granted_together(store, tmp_path):
    router = Router(store, keys.load_or_create_keypair(tmp_path / "state"), mesh_bind="tcp://127.0.0.1:0")

    async def scenario():
        settings = Settings()
        exchange = Exchange(router, settings, "r1", "w1")
        before = router._requests["r1"].credit
        exchange.written(settings.credit_batch - 1)
        assert router._requests["r1"].credit == before           # not a whole batch yet
        exchange.written(3)
        assert router._requests["r1"].credit == before + settings.credit_batch + 2
        exchange.close()

    try:
        asyncio.run(scenario())
    finally:
        router.store_worker.close()


def test_a_credit_to_a_full_agent_queue_is_sent_later_and_to_a_gone_agent_not_at_all(store, tmp_path):
    """Credits and cancels go out at once when the agent's queue has room. When it is full
    (the agent is behind), the send is retried in the background as `send()` would, not
    dropped: a lost credit stalls the stream until the bridge's credit timeout."""
    router = Router(store, keys.load_or_create_keypair(tmp_path / "state"), mesh_bind="tcp://127.0.0.1:0")
    queue_has_room = [False, False, True]           # full, still full, then room
    sent: list[codec.Message] = []

    def send_now(routing_id, msg, version):
        if not queue_has_room.pop(0):
            return False
        sent.append(msg)
        return True

    async def scenario():
        router._send_now = send_now                  # type: ignore[method-assign]
        credit = codec.Credit(id="r1", n=8)
        router.send_soon("nobody", credit)           # no session: nothing, no task
        assert not router._background and not sent
        hello = codec.Hello(token="t", versions=[1], agent_version="test", hostname="h", capabilities=[],
                            hardware={}, models=[], max_concurrent=4)
        router.sessions["w1"] = Session(agent_id="a1", worker_id="w1", routing_id=b"r", connection_fd=None,
                                        session_id="s", version=1, hello=hello, connected_at=0.0, last_seen=0.0)
        router.send_soon("w1", credit)
        assert not sent and len(router._background) == 1    # full: retried in the background
        await asyncio.wait_for(asyncio.gather(*router._background), 5)
        assert sent == [credit]

    try:
        asyncio.run(scenario())
    finally:
        router.store_worker.close()
