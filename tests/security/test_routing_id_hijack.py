"""Finding 1: an enrolled node must not receive another node's traffic by claiming its routing id.

The router used to address agents by the routing id each peer chose itself
(the worker id, which API clients see in error bodies) with ROUTER_HANDOVER
on: any enrolled key connecting under another node's worker id took over its
address, received its `infer` frames (client prompts) and knocked it
offline. Now a session is bound to the connection its authenticated hello
came on, and only that connection is ever sent to.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.mesh.helpers import enroll_fresh, until
from tests.security.mesh_actors import HonestNode, HostilePeer, chat
from tests.support.router import RouterProcess
from xim_proto import codec

REQUESTS = 12


@pytest.fixture
def router(tmp_path):
    # A long lease timeout: a session the router did not see end stays routable,
    # so only the router's own knowledge of the connection keeps frames from the attacker.
    proc = RouterProcess(tmp_path, lease_interval="1s", lease_timeout="120s",
                         extra_args=("--request-timeout", "10"))
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture
def identities(router, agent_cfg):
    """(victim, attacker): two nodes enrolled with their own join keys."""
    return enroll_fresh(router, agent_cfg("victim")), enroll_fresh(router, agent_cfg("attacker"))


async def serve_requests(router: RouterProcess, attacker: HostilePeer) -> list[tuple[int, bytes]]:
    answers = []
    for i in range(REQUESTS):
        answers.append(await chat(router.http_url, prompt=f"secret prompt {i}"))
        prompts = [m.body.decode() for m in attacker.infers()]
        assert not prompts, f"the attacker received {len(prompts)} infer frame(s) of the victim: {prompts}"
    return answers


def assert_all_served_by(answers: list[tuple[int, bytes]], name: str) -> None:
    failed = [(status, body[:200]) for status, body in answers
              if status != 200 or f"served by {name}".encode() not in body]
    assert not failed, f"{len(failed)} of {len(answers)} requests not served by {name}: {failed}"


def test_a_peer_claiming_a_connected_nodes_worker_id_gets_none_of_its_requests(router, identities):
    victim_id, attacker_id = identities

    async def scenario() -> None:
        victim = HonestNode(victim_id, "victim")
        attacker = HostilePeer(attacker_id, router.mesh_endpoint, routing_id=victim_id.worker_id.encode())
        try:
            async with victim.serving():
                await attacker.connect()
                await attacker.hello()
                # The router has read the attacker's connection once it answers the
                # hello (its own session) or, before the fix, dropped it as spoofed.
                await until(lambda: attacker.got(codec.Welcome) or
                            f"dropped a frame from agent {attacker_id.agent_id}" in router.log(),
                            60, "the router to notice the attacker's connection")
                answers = await serve_requests(router, attacker)
                assert_all_served_by(answers, "victim")
                assert len(victim.infers) == REQUESTS
        finally:
            attacker.close()

    asyncio.run(scenario())


def test_a_peer_squatting_a_worker_id_before_the_node_connects_does_not_lock_it_out(router, identities):
    victim_id, attacker_id = identities

    async def scenario() -> None:
        attacker = HostilePeer(attacker_id, router.mesh_endpoint, routing_id=victim_id.worker_id.encode())
        victim = HonestNode(victim_id, "victim")
        try:
            await attacker.connect()
            await attacker.hello()
            async with victim.serving():
                answers = await serve_requests(router, attacker)
            assert_all_served_by(answers, "victim")
        finally:
            attacker.close()

    asyncio.run(scenario())


def test_an_older_agent_that_sets_its_worker_id_as_routing_id_still_serves(router, identities):
    """Agents from before this change set ROUTING_ID = worker id: the router still serves them."""
    legacy_id, _ = identities

    async def scenario() -> None:
        legacy = HostilePeer(legacy_id, router.mesh_endpoint, routing_id=legacy_id.worker_id.encode())
        try:
            await legacy.connect()
            await legacy.hello(models=("tiny",))
            await until(lambda: legacy.got(codec.Welcome), 60, "a welcome for the older agent")
            request = asyncio.ensure_future(chat(router.http_url))
            infer = (await until(legacy.infers, 60, "the request to reach the older agent"))[0]
            await legacy.send(codec.Done(id=infer.id, body=b'{"served": "legacy"}'))
            assert await request == (200, b'{"served": "legacy"}')
        finally:
            legacy.close()

    asyncio.run(scenario())


def test_when_an_older_agents_connection_drops_a_peer_taking_its_worker_id_gets_nothing(router, identities):
    """The worker id of an older agent is public: once its connection is gone, another
    enrolled key may connect under it, and must not inherit the old session."""
    victim_id, attacker_id = identities

    async def scenario() -> None:
        victim = HostilePeer(victim_id, router.mesh_endpoint, routing_id=victim_id.worker_id.encode())
        attacker = HostilePeer(attacker_id, router.mesh_endpoint, routing_id=victim_id.worker_id.encode())
        try:
            await victim.connect()
            await victim.hello(models=("tiny",))
            await until(lambda: victim.got(codec.Welcome), 60, "a welcome for the older agent")
            await victim.disconnect()
            await until(lambda: "a mesh connection closed" in router.log(), 60,
                        "the router to see the older agent's connection close")
            # Until libzmq has freed the address the attacker's connection is refused as a
            # duplicate (its hello never arrives): reconnect until the router hears it.
            for _ in range(30):
                await attacker.connect()
                await attacker.hello()
                try:
                    await until(lambda: attacker.got(codec.Welcome) or
                                f"dropped a frame from agent {attacker_id.agent_id}" in router.log(),
                                2, "the router to hear the attacker")
                    break
                except AssertionError:
                    continue
            status, body = await chat(router.http_url)
            assert not attacker.infers(), "the attacker received the older agent's request"
            assert status in (404, 503), (status, body)
        finally:
            victim.close()
            attacker.close()

    asyncio.run(scenario())


def test_the_same_node_reconnecting_while_its_old_connection_lingers_takes_over(router, identities):
    """A node whose old connection the router has not yet seen die proves its key and serves at once."""
    victim_id, _ = identities

    async def scenario() -> None:
        stale = HostilePeer(victim_id, router.mesh_endpoint, routing_id=os.urandom(16))
        victim = HonestNode(victim_id, "victim")
        try:
            await stale.connect()            # the node's earlier connection: alive, never read again
            await stale.hello(models=("tiny",))
            await until(lambda: stale.got(codec.Welcome), 60, "a welcome for the first connection")
            async with victim.serving():
                answers = [await chat(router.http_url) for _ in range(3)]
            assert_all_served_by(answers, "victim")
            assert not stale.infers()
        finally:
            stale.close()

    asyncio.run(scenario())
