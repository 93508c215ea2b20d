"""Finding 10: ZAP failed open — with its handler gone, libzmq let every CURVE client in.

A real `Router` (CURVE ROUTER socket, ZAP handler, SQLite store) is started, its
ZAP handler is stopped, and a DEALER with a CURVE key the router never enrolled
connects: the handshake must fail. With the handler running, an enrolled key
still completes its handshake.
"""

from __future__ import annotations

import asyncio

import pytest
import zmq

from tests.security.curve_probe import handshake_outcome
from xim_router import keys, zap
from xim_router import store as store_mod
from xim_router.mesh import Router


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
