"""The link over real sockets: a real xim-router subprocess, MeshLink in this process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

from tests.mesh.helpers import (
    LinkProbe,
    enroll_fresh,
    load_config,
    make_link,
    running,
    stand_in_router,
    until,
    wait_for,
    write_agent_config,
)
from tests.support.router import RouterProcess
from xim_proto import codec, transport
from ximd import enrollment
from ximd.commands import enroll as enroll_cmd
from ximd.mesh.state import LinkState

RUN_LINK = Path(__file__).with_name("run_link.py")


async def in_thread(fn, *args):
    """Run a blocking helper (router admin commands, restarts) without stalling the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_enroll_link_up_and_leases_reach_the_router(router, agent_cfg):
    cfg = agent_cfg()
    identity = enroll_fresh(router, cfg)
    probe = LinkProbe(running=3)

    async def scenario():
        link = make_link(identity, probe)
        async with running(link):
            await until(lambda: link.state == LinkState.CONNECTED, 10, "the link to connect")
            await until(lambda: link.last_lease_ack_at, 5, "a lease_ack")
            await in_thread(wait_for, lambda: router.agent(identity.agent_id)["running"] == 3, 5,
                            "the router to record the lease")
            agent = await in_thread(router.agent, identity.agent_id)
            assert agent["state"] == "active"
            assert agent["kv_cache_usage"] == 0.125
            assert agent["models"] == ["tiny:ready"]
            assert link.welcome.lease_interval_s == 1.0          # the router's choice

    asyncio.run(scenario())
    assert probe.saw(LinkState.CONNECTED)


def test_restart_without_the_key_uses_the_same_identity(router, tmp_path):
    key = router.join_key()
    state = tmp_path / "state"
    with_key = load_config(write_agent_config(tmp_path / "a.toml", url=router.http_url,
                                              state_dir=state, join_key=key))
    assert asyncio.run(enroll_cmd.main_enroll(with_key)) == 0
    # "Restart": the key is gone from the config; the identity on disk is enough.
    without_key = load_config(write_agent_config(tmp_path / "a.toml", url=router.http_url,
                                                 state_dir=state))
    status = asyncio.run(enrollment.ensure_identity(without_key))
    assert status.identity is not None
    link_proc = subprocess.Popen([sys.executable, str(RUN_LINK), str(tmp_path / "a.toml")],
                                 stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: router.agent(status.identity.agent_id)["state"] == "active", 15,
                 "the restarted agent to connect")
    finally:
        link_proc.send_signal(signal.SIGTERM)
        out, _ = link_proc.communicate(timeout=10)
    assert link_proc.returncode == 0
    assert "connected: session" in out
    assert len(router.agents()) == 1


def test_a_host_frozen_past_the_lease_timeout_keeps_its_sessions(router, agent_cfg, tmp_path):
    # A VM that stops for longer than the lease timeout (3 s here) stops router and agent
    # alike: on waking, each must read the other's queued frames, not declare it gone.
    cfg = agent_cfg()
    identity = enroll_fresh(router, cfg)
    config_file = tmp_path / "agent.toml"         # agent_cfg wrote it there
    link_proc = subprocess.Popen([sys.executable, str(RUN_LINK), str(config_file)],
                                 stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: router.agent(identity.agent_id)["state"] == "active", 15, "the agent to connect")
        frozen = (router.pid, link_proc.pid)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(5)
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        time.sleep(3)                              # several lease intervals after the thaw
        assert router.agent(identity.agent_id)["state"] == "active"
    finally:
        link_proc.send_signal(signal.SIGTERM)
        out, _ = link_proc.communicate(timeout=10)
    assert out.count("connected: session") == 1 and "disconnected: no answer" not in out, out
    assert "missed its lease" not in router.log()
    assert "did not run for" in router.log()


def test_router_restart_agent_reconnects_by_itself(router, agent_cfg):
    identity = enroll_fresh(router, agent_cfg())
    probe = LinkProbe()

    async def scenario():
        link = make_link(identity, probe)
        async with running(link):
            await until(lambda: link.state == LinkState.CONNECTED, 10, "the link to connect")
            first_session = link.welcome.session
            await in_thread(router.restart)
            await until(lambda: link.state == LinkState.CONNECTED and link.welcome
                        and link.welcome.session != first_session, 20, "a new session")
            acked = link.last_lease_ack_at
            await until(lambda: link.last_lease_ack_at != acked, 5, "leases on the new session")

    asyncio.run(scenario())
    assert probe.saw(LinkState.DISCONNECTED)
    assert router.agent(identity.agent_id)["state"] in ("active", "disconnected")


def test_revocation_ends_a_live_session_for_good(router, agent_cfg):
    cfg = agent_cfg()
    identity = enroll_fresh(router, cfg)
    probe = LinkProbe()

    async def scenario():
        link = make_link(identity, probe, token_refresher=enrollment.token_refresher(cfg))
        task = asyncio.ensure_future(link.run())
        await until(lambda: link.state == LinkState.CONNECTED, 10, "the link to connect")
        await in_thread(router.revoke, identity.agent_id)
        await asyncio.wait_for(task, 10)          # run() returns by itself: no retry loop
        return link

    link = asyncio.run(scenario())
    assert link.state == LinkState.REJECTED
    assert probe.saw(LinkState.REJECTED, "revoked")
    assert router.agent(identity.agent_id)["state"] == "revoked"


def test_revoked_agent_is_refused_at_the_handshake_and_learns_why(router, agent_cfg):
    cfg = agent_cfg()
    identity = enroll_fresh(router, cfg)
    router.revoke(identity.agent_id)
    probe = LinkProbe()

    async def scenario():
        link = make_link(identity, probe, token_refresher=enrollment.token_refresher(cfg))
        await asyncio.wait_for(link.run(), 15)
        return link

    assert asyncio.run(scenario()).state == LinkState.REJECTED
    assert probe.saw(LinkState.REJECTED, "refused this node's CURVE key")
    assert probe.saw(LinkState.REJECTED, "(revoked)")
    assert "refused a mesh connection" in router.log()


def raw_dealer(ctx, router: RouterProcess, *, public: str, secret: str, routing_id: str):
    sock = ctx.socket(zmq.DEALER)
    transport.apply_common_options(sock)
    sock.setsockopt(zmq.ROUTING_ID, routing_id.encode())
    sock.setsockopt(zmq.CURVE_SERVERKEY, router.public_key.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret.encode())
    sock.connect(router.mesh_endpoint)
    return sock


def hello_for(identity) -> bytes:
    return codec.encode(codec.Hello(token=identity.token, versions=[1], agent_version="test",
                                    hostname="raw", capabilities=[], hardware={}, models=[],
                                    max_concurrent=1))


async def recv_or_none(sock, timeout_s: float):
    if await sock.poll(int(timeout_s * 1000)):
        return codec.decode(await sock.recv(), sender=codec.ROUTER)
    return None


def raw_hello_reply(router: RouterProcess, *, public: str, secret: str, routing_id: str, identity):
    """Send one hello from a raw CURVE dealer with these keys; the router's reply or None."""
    async def scenario():
        ctx = zmq.asyncio.Context()
        sock = raw_dealer(ctx, router, public=public, secret=secret, routing_id=routing_id)
        try:
            await sock.send(hello_for(identity))
            return await recv_or_none(sock, 2.0)
        finally:
            sock.close(0)
            ctx.term()
    return asyncio.run(scenario())


def test_unknown_curve_key_is_refused_and_nothing_is_processed(router, agent_cfg):
    identity = enroll_fresh(router, agent_cfg())
    public, secret = (k.decode() for k in zmq.curve_keypair())

    # Even with a valid token and worker id, an unknown key gets nowhere.
    assert raw_hello_reply(router, public=public, secret=secret, routing_id=identity.worker_id,
                           identity=identity) is None
    log = router.log()
    assert f"unknown CURVE key {public}" in log
    assert "connected: protocol" not in log          # no hello was handled
    assert router.agent(identity.agent_id)["state"] == "pending"


def test_an_enrolled_key_cannot_speak_as_another_worker(router, agent_cfg):
    a = enroll_fresh(router, agent_cfg("a"))
    b = enroll_fresh(router, agent_cfg("b"))

    # The routing id says nothing about who speaks (the CURVE key does): B's token
    # on A's key is refused, whatever address A chose.
    reply = raw_hello_reply(router, public=a.agent_public_key, secret=a.agent_secret_key,
                            routing_id=b.worker_id, identity=b)
    assert isinstance(reply, codec.Reject) and reply.code == "unauthorized"
    assert router.agent(b.agent_id)["state"] == "pending"


def test_malformed_frames_from_an_agent_are_dropped_and_both_keep_serving(router, agent_cfg):
    bad = enroll_fresh(router, agent_cfg("bad"))
    good = enroll_fresh(router, agent_cfg("good"))
    probe = LinkProbe()
    hello = hello_for(bad)
    garbage = [
        b"\xc1 not msgpack",
        hello[: len(hello) // 2],                                        # truncated
        msgpack.packb({"v": 99, "type": "lease", "seq": 1}),             # wrong version
        msgpack.packb({"v": 1, "type": "teleport"}),                     # unknown type
        msgpack.packb({"v": 1, "type": "welcome", "version": 1}),        # router-only type
        msgpack.packb({"v": 1, "type": "credit", "id": "x", "n": "1"}),  # wrong field type
    ]

    async def scenario():
        link = make_link(good, probe)
        ctx = zmq.asyncio.Context()
        sock = raw_dealer(ctx, router, public=bad.agent_public_key, secret=bad.agent_secret_key,
                          routing_id=bad.worker_id)
        try:
            async with running(link):
                await until(lambda: link.state == LinkState.CONNECTED, 10, "the good link to connect")
                for frame in garbage:
                    await sock.send(frame)
                await sock.send_multipart([b"two", b"parts"])
                complaint = await recv_or_none(sock, 3.0)
                # Oversized: the transport drops this connection; libzmq reconnects it.
                await sock.send(b"\x00" * (2 * codec.MAX_FRAME_BYTES))
                await asyncio.sleep(0.5)
                await sock.send(hello)
                welcome = await recv_or_none(sock, 5.0)
                acked = link.last_lease_ack_at
                await until(lambda: link.last_lease_ack_at != acked, 5, "the good link's leases")
                assert link.state == LinkState.CONNECTED
                return complaint, welcome
        finally:
            sock.close(0)
            ctx.term()

    complaint, welcome = asyncio.run(scenario())
    assert isinstance(complaint, codec.Error) and complaint.id is None
    assert complaint.code == "malformed"                      # rate-limited: only the first
    assert isinstance(welcome, codec.Welcome)                 # the router still serves that peer
    log = router.log()
    assert "dropped a malformed frame from agent " + bad.agent_id in log
    assert "a mesh connection closed" in log
    assert "Traceback" not in log


def test_malformed_frames_from_the_router_are_dropped_and_the_link_keeps_serving(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ximd.mesh")
    garbage = [b"\xc1", codec.encode(codec.Bye(reason="x"))[:-3],
               msgpack.packb({"v": 7, "type": "lease_ack", "seq": 1}),
               msgpack.packb({"v": 1, "type": "nonsense"}),
               codec.encode(codec.Lease(seq=1, running=0, waiting=0, kv_cache_usage=0.0,
                                        engine_state="x", models=[], in_flight=[],
                                        max_concurrent=1, draining=False))]   # agent-only type
    probe = LinkProbe()

    async def fake_router(sock, hellos: list, routes: list):
        """Welcome every hello, ack every lease, and send garbage after the first welcome."""
        while True:
            rid, frame = await sock.recv_multipart()
            msg = codec.decode(frame, sender=codec.AGENT)
            if isinstance(msg, codec.Hello):
                hellos.append(msg)
                routes.append(rid)          # the connection's routing id: the agent's choice
                await sock.send_multipart([rid, codec.encode(codec.Welcome(
                    version=1, session=f"s{len(hellos)}", router_version="fake",
                    lease_interval_s=0.2, lease_timeout_s=5.0, max_frame_bytes=codec.MAX_FRAME_BYTES,
                    capabilities=[]))])
                if len(hellos) == 1:
                    for g in garbage:
                        await sock.send_multipart([rid, g])
                    await sock.send_multipart([rid, b"extra", b"part"])
            elif isinstance(msg, codec.Lease):
                await sock.send_multipart([rid, codec.encode(codec.LeaseAck(seq=msg.seq))])

    async def scenario():
        ctx = zmq.asyncio.Context()
        sock, identity = stand_in_router(ctx)
        hellos: list = []
        routes: list = []
        server = asyncio.ensure_future(fake_router(sock, hellos, routes))
        link = make_link(identity, probe, lease_interval=0.2)
        try:
            async with running(link):
                await until(lambda: link.malformed_dropped == len(garbage) + 1, 10,
                            "the link to drop every bad frame")
                acked = link.last_lease_ack_at
                await until(lambda: link.last_lease_ack_at != acked, 5, "leases to go on")
                assert link.state == LinkState.CONNECTED and len(hellos) == 1
                # Oversized: libzmq drops the connection; the link opens a new session.
                await sock.send_multipart([routes[-1], b"\x00" * (2 * codec.MAX_FRAME_BYTES)])
                await until(lambda: len(hellos) == 2 and link.state == LinkState.CONNECTED, 10,
                            "a new session after the oversized frame")
        finally:
            server.cancel()
            sock.close(0)
            ctx.term()

    asyncio.run(scenario())
    assert "dropped a malformed frame from the router" in caplog.text
    assert probe.saw(LinkState.DISCONNECTED, "lost")


def test_token_is_refreshed_before_it_lapses(tmp_path):
    (tmp_path / "r").mkdir()
    with RouterProcess(tmp_path / "r", token_ttl="5s") as router:
        cfg = load_config(write_agent_config(tmp_path / "a.toml", url=router.http_url,
                                             state_dir=tmp_path / "s"))
        identity = enroll_fresh(router, cfg)
        probe = LinkProbe()

        async def scenario():
            link = make_link(identity, probe, token_refresher=enrollment.token_refresher(cfg),
                             token_refresh_margin_s=4.0)
            async with running(link):
                await until(lambda: link.identity.token != identity.token, 10, "a token refresh")
                await asyncio.sleep(2.5)       # past the first token's life: still one session
                assert link.state == LinkState.CONNECTED
                assert [s for s, _ in probe.states].count(LinkState.CONNECTED) == 1
                return link.identity

        renewed = asyncio.run(scenario())
        assert enrollment.load_identity(cfg.agent.state_dir).token_expires_at >= renewed.token_expires_at - 5
        assert renewed.token_expires_at > identity.token_expires_at


def test_lease_timing_disconnected_then_dead(tmp_path):
    (tmp_path / "r").mkdir()
    with RouterProcess(tmp_path / "r", lease_interval="0.5s", lease_timeout="2s",
                       dead_after="2s") as router:
        config = write_agent_config(tmp_path / "a.toml", url=router.http_url, state_dir=tmp_path / "s")
        identity = enroll_fresh(router, load_config(config))
        proc = subprocess.Popen([sys.executable, str(RUN_LINK), str(config)],
                                stdout=subprocess.DEVNULL)
        try:
            wait_for(lambda: router.agent(identity.agent_id)["state"] == "active", 15, "active")
            # Frozen, not killed: its connection stays open (a closed one ends the session at
            # once), no bye and no lease: only the lease timing can tell.
            proc.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            wait_for(lambda: router.agent(identity.agent_id)["state"] == "disconnected", 6, "disconnected")
            assert time.monotonic() - stopped >= 1.0       # not before the lease timeout
            wait_for(lambda: router.agent(identity.agent_id)["state"] == "dead", 6, "dead")
            assert "missed its lease" in router.log()
        finally:
            proc.kill()
            proc.wait(10)


def test_bye_ends_the_session_at_once_and_drain_is_acknowledged(router, agent_cfg):
    identity = enroll_fresh(router, agent_cfg())
    probe = LinkProbe()

    async def scenario():
        link = make_link(identity, probe)
        async with running(link):
            await until(lambda: link.state == LinkState.CONNECTED, 10, "the link to connect")
            assert await link.drain("test drain", timeout_s=5)
        await in_thread(wait_for, lambda: router.agent(identity.agent_id)["state"] == "disconnected",
                        1.5, "bye to end the session before any lease timeout")

    asyncio.run(scenario())
    log = router.log()
    assert "is draining (test drain)" in log and "said bye: agent stopping" in log


def test_close_sends_what_was_queued_before_it(router, agent_cfg):
    """A drained stream's last frames and the bye are queued just before close(); closing
    must not lose them (the router would fail a finished stream as a lost lease). The
    router answers each chunk here (an unknown request: cancel), so its frames are still
    arriving when the agent closes: without waiting for the bye's answer, TCP resets."""
    identity = enroll_fresh(router, agent_cfg())

    async def scenario():
        link = make_link(identity, LinkProbe())
        async with running(link):
            await until(lambda: link.state == LinkState.CONNECTED, 10, "the link to connect")
            # ~50 MB, every chunk answered: the answers still arrive as close() begins.
            for seq in range(200):
                await link.send(codec.Chunk(id="xim-queued", seq=seq, data=[b"x" * 250_000]))
        await in_thread(wait_for, lambda: "said bye: agent stopping" in router.log(), 10,
                        "the bye queued behind the chunks to reach the router")

    asyncio.run(scenario())


def test_send_without_a_session_raises_link_down(router, agent_cfg):
    from ximd.mesh.link import LinkDown
    identity = enroll_fresh(router, agent_cfg())
    link = make_link(identity, LinkProbe())
    try:
        asyncio.run(link.send(codec.Bye(reason="x")))
    except LinkDown as exc:
        assert "no session" in str(exc)
    else:
        raise AssertionError("send() without a session must raise LinkDown")


def test_the_configured_socket_buffer_size_reaches_the_link_socket():
    # tuning.socket_buffer_bytes is what ZeroMQ is asked for (and what start-up checks).
    public, secret = (k.decode() for k in zmq.curve_keypair())
    identity = enrollment.Identity(
        agent_id="a1", worker_id="worker-fake", router_url="http://127.0.0.1:9",
        mesh_endpoints=("tcp://127.0.0.1:9",), router_public_key=public,
        agent_public_key=public, agent_secret_key=secret, token="xat_fake")
    link = make_link(identity, LinkProbe(), socket_buffer_bytes=1 << 20)
    ctx = zmq.Context()
    try:
        sock, monitor = link._socket(ctx, "tcp://127.0.0.1:9")
        try:
            assert sock.getsockopt(zmq.SNDBUF) == sock.getsockopt(zmq.RCVBUF) == 1 << 20
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
    finally:
        ctx.term()
