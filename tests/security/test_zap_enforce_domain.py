"""Finding 10: ZAP failed open — with its handler gone, libzmq let every CURVE client in.

A real `Router` (CURVE ROUTER socket, ZAP handler, SQLite store) is started, its
ZAP handler is stopped, and a DEALER with a CURVE key the router never enrolled
connects: the handshake must fail. With the handler running, an enrolled key
still completes its handshake.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from xim_router import keys, zap
from xim_router import store as store_mod
from xim_router.mesh import Router

HANDSHAKE_OUTCOMES = {zmq.EVENT_HANDSHAKE_SUCCEEDED: "succeeded",
                      zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
                      zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed",
                      zmq.EVENT_HANDSHAKE_FAILED_AUTH: "failed"}


def handshake_outcome(endpoint: str, server_public: str, client: tuple[bytes, bytes],
                      refused_by_server=lambda: False, timeout_s: float = 30.0) -> str:
    """Connect a CURVE DEALER and report how its first handshake ended.

    "failed" when the client saw the handshake fail or ``refused_by_server()``
    turned true first (libzmq does not always tell the client it was refused).
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = server_public.encode()
    sock.curve_publickey, sock.curve_secretkey = client
    monitor = sock.get_monitor_socket()
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if monitor.poll(100):
                event = recv_monitor_message(monitor)["event"]
                if event in HANDSHAKE_OUTCOMES:
                    return HANDSHAKE_OUTCOMES[event]
            elif refused_by_server():
                return "failed"
        return "no outcome"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


async def start_router(tmp_path) -> tuple[Router, store_mod.Store]:
    store = store_mod.Store(tmp_path / "state")
    router = Router(store, keys.load_or_create_keypair(tmp_path / "state"), mesh_bind="tcp://127.0.0.1:0")
    await router.start()
    return router, store


async def stop_zap_handler(router: Router) -> None:
    """What a crashed ZAP handler leaves: no socket bound at ZAP's endpoint."""
    handler_task = next(t for t in router._tasks if t.get_coro().__qualname__.startswith("ZapHandler"))
    handler_task.cancel()
    await asyncio.gather(handler_task, return_exceptions=True)
    assert router._zap is not None
    router._zap.close()
    router._zap = None


def test_without_its_zap_handler_the_router_refuses_every_curve_client(tmp_path):
    async def scenario():
        router, store = await start_router(tmp_path)
        try:
            enrolled = zmq.curve_keypair()
            key = store.create_join_key(ttl_s=60, uses=1, model=None)
            store.enroll(join_key=key, public_key=enrolled[0].decode(), hostname="h", hardware={},
                         max_concurrent=1, agent_version="t", token_ttl_s=60)
            # With the handler: the enrolled key gets in, a stranger does not.
            assert await asyncio.to_thread(handshake_outcome, router.mesh_endpoint,
                                           router.keypair.public, enrolled) == "succeeded"
            assert await asyncio.to_thread(handshake_outcome, router.mesh_endpoint,
                                           router.keypair.public, zmq.curve_keypair()) == "failed"
            await stop_zap_handler(router)
            failed_before = router.stats.handshake_failed
            stranger = await asyncio.to_thread(
                handshake_outcome, router.mesh_endpoint, router.keypair.public, zmq.curve_keypair(),
                lambda: router.stats.handshake_failed > failed_before)
            assert stranger == "failed", f"with no ZAP handler a stranger's CURVE handshake {stranger}"
        finally:
            await router.stop()
            store.close()
    asyncio.run(scenario())


@pytest.mark.skipif(not zap.ENFORCE_SUPPORTED, reason="this libzmq has no ZAP_ENFORCE_DOMAIN (draft API)")
def test_the_mesh_socket_enforces_its_zap_domain(tmp_path):
    async def scenario():
        router, store = await start_router(tmp_path)
        try:
            assert router._sock is not None and router._sock.getsockopt(zmq.ZAP_ENFORCE_DOMAIN) == 1
        finally:
            await router.stop()
            store.close()
    asyncio.run(scenario())
