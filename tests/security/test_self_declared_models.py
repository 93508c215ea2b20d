"""Finding 2: a node must not serve what it merely claims, nor take more than the operator allows.

The attack: an enrolled node (a real MeshLink with its own CURVE key) says in
hello and in every lease that it has the honest node's model ready and
accepts 10**9 requests at once. Before the fix the router believed it and
sent it nearly every request for that model — client prompts included.

Each test runs a real `xim-router serve`, an honest node and the hostile
one, and sends N requests through the router's OpenAI API with the official
`openai` client. Both nodes hold every request they get until all N have
been placed, so what each node holds at once is exactly what the router
chose to give it, whatever the speed of this machine.
"""

from __future__ import annotations

import asyncio
import json
import re

import openai
import pytest

from tests.mesh.helpers import enroll_fresh, load_config, until, wait_for, write_agent_config
from tests.support.router import RouterProcess
from xim_proto import codec
from ximd.mesh.link import Backoff, MeshLink
from ximd.mesh.report import HelloInfo, LeaseInfo
from ximd.mesh.state import LinkState

MODEL = "team-a/model"
OTHER = "team-b/model"
REQUESTS = 8
TIMEOUT_S = 30


class HoldingNode:
    """A node on a real MeshLink that holds each infer until `release` is set, then answers it.

    It says whatever it is told to say about itself (``models``,
    ``max_concurrent``) and records what the router sent it.
    """

    def __init__(self, name: str, identity, *, models: tuple[str, ...], max_concurrent: int):
        self.name = name
        self.identity = identity
        self.models = tuple(codec.Model(name=m, state="ready") for m in models)
        self.max_concurrent = max_concurrent
        self.received = 0
        self.held: set[str] = set()
        self.most_held = 0
        self.release = asyncio.Event()
        self._answers: set[asyncio.Task] = set()
        self.link = MeshLink(identity, hello_info=self.hello_info, lease_info=self.lease_info,
                             on_message=self.on_message, on_state=self.on_state,
                             backoff=Backoff(initial=0.1, maximum=1.0), lease_interval=0.5)

    def hello_info(self) -> HelloInfo:
        return HelloInfo(hostname=self.name, models=self.models, max_concurrent=self.max_concurrent)

    def lease_info(self) -> LeaseInfo:
        return LeaseInfo(models=self.models, max_concurrent=self.max_concurrent, running=len(self.held),
                         in_flight=tuple(self.held), engine_state="healthy")

    async def on_message(self, msg: codec.Message) -> None:
        if isinstance(msg, codec.Infer):
            self.received += 1
            self.held.add(msg.id)
            self.most_held = max(self.most_held, len(self.held))
            task = asyncio.ensure_future(self._answer(msg))
            self._answers.add(task)
            task.add_done_callback(self._answers.discard)

    def on_state(self, state: LinkState, detail: str) -> None:
        pass

    async def _answer(self, infer: codec.Infer) -> None:
        await self.release.wait()
        body = json.dumps({"id": infer.id, "object": "chat.completion", "created": 0, "model": infer.model,
                           "system_fingerprint": self.name,
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": f"from {self.name}"}}]})
        await self.link.send(codec.Done(id=infer.id, finish_reason="stop", body=body.encode()))
        self.held.discard(infer.id)


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def connected(router: RouterProcess, node: HoldingNode) -> None:
    """Wait until the router has the node's session and has recorded a lease from it."""
    await until(lambda: node.link.state == LinkState.CONNECTED, TIMEOUT_S, f"{node.name} to connect")
    await until(lambda: node.link.last_lease_ack_at, TIMEOUT_S, f"a lease_ack for {node.name}")


async def send_requests(router: RouterProcess, nodes: list[HoldingNode]) -> list[str]:
    """REQUESTS chat completions for MODEL at once; which node answered each."""
    client = openai.AsyncOpenAI(base_url=router.http_url + "/v1", api_key="unused", max_retries=0,
                                timeout=TIMEOUT_S)
    calls = [asyncio.ensure_future(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"secret prompt {i}"}]))
        for i in range(REQUESTS)]
    try:
        # Every request placed on some node: what each holds now is all the router gave it.
        await until(lambda: sum(n.received for n in nodes) == REQUESTS or any(c.done() for c in calls),
                    TIMEOUT_S, f"the router to place all {REQUESTS} requests")
    finally:
        for node in nodes:
            node.release.set()
    answers = await asyncio.gather(*calls)
    await client.close()
    return [a.system_fingerprint or "" for a in answers]


def run_scenario(router: RouterProcess, honest: HoldingNode, hostile: HoldingNode, *,
                 before_requests=None) -> list[str]:
    async def scenario() -> list[str]:
        honest_task = asyncio.ensure_future(honest.link.run())
        await connected(router, honest)
        hostile_task = asyncio.ensure_future(hostile.link.run())
        try:
            await connected(router, hostile)
            if before_requests is not None:
                await before_requests()
            return await send_requests(router, [honest, hostile])
        finally:
            for node, task in ((hostile, hostile_task), (honest, honest_task)):
                await node.link.close()
                await asyncio.wait_for(task, 10)
    return asyncio.run(scenario())



@pytest.fixture
def agent_cfg(tmp_path, router):
    def make(name: str):
        return load_config(write_agent_config(tmp_path / f"{name}.toml", url=router.http_url,
                                              state_dir=tmp_path / f"{name}-state"))
    return make


def honest_node(router, agent_cfg) -> HoldingNode:
    identity = enroll_fresh(router, agent_cfg("honest"), model=MODEL)
    return HoldingNode("honest", identity, models=(MODEL,), max_concurrent=REQUESTS)


def hostile_node(router, agent_cfg, **key) -> HoldingNode:
    identity = enroll_fresh(router, agent_cfg("hostile"), **key)
    return HoldingNode("hostile", identity, models=(MODEL,), max_concurrent=10**9)


def refusal_lines(router: RouterProcess, hostile: HoldingNode) -> list[str]:
    return [line for line in router.log().splitlines()
            if "may not serve" in line and hostile.identity.worker_id in line]


def test_a_node_gets_no_request_for_a_model_it_may_not_serve(router, agent_cfg):
    honest = honest_node(router, agent_cfg)
    hostile = hostile_node(router, agent_cfg, model=OTHER)       # its key allows OTHER only

    answered_by = run_scenario(router, honest, hostile)

    assert hostile.received == 0, (
        f"the hostile node claimed {MODEL!r} (its join key allows only {OTHER!r}) and the router "
        f"sent it {hostile.received} of {REQUESTS} requests")
    assert answered_by == ["honest"] * REQUESTS        # the honest node kept serving all of them
    # The router says so once (not once per lease), with the node's string escaped.
    assert len(refusal_lines(router, hostile)) == 1, router.log()
    shown = router.agent(hostile.identity.agent_id)
    assert shown["models"] == [f"{MODEL}:ready"]
    assert shown["allowed_models"] == [OTHER]
    assert shown["refused_models"] == [MODEL]


def test_a_ceiling_bounds_a_node_that_claims_more(router, agent_cfg):
    honest = honest_node(router, agent_cfg)
    hostile = hostile_node(router, agent_cfg, allow_models=(MODEL,), max_concurrent=1)

    answered_by = run_scenario(router, honest, hostile)

    assert hostile.most_held <= 1, (
        f"the hostile node claimed max_concurrent=10**9 (its join key allows 1) and held "
        f"{hostile.most_held} of {REQUESTS} requests at once")
    assert hostile.received == 1            # allowed: it does get its one at a time
    assert sorted(answered_by) == ["honest"] * (REQUESTS - 1) + ["hostile"]
    shown = router.agent(hostile.identity.agent_id)
    assert (shown["declared_max_concurrent"], shown["max_concurrent_ceiling"],
            shown["effective_max_concurrent"]) == (10**9, 1, 1)
    assert refusal_lines(router, hostile) == []


def test_agents_set_narrows_a_connected_node_at_once(router, agent_cfg):
    honest = honest_node(router, agent_cfg)
    hostile = hostile_node(router, agent_cfg)                   # --allow-any-model

    async def narrow() -> None:
        await in_thread(router.set_agent, hostile.identity.agent_id, "--allow-model", OTHER)
        # The running router applies it within a sweep and says so when it next hears the claim.
        await in_thread(wait_for, lambda: refusal_lines(router, hostile), TIMEOUT_S,
                        "the router to refuse the hostile node's claim")

    answered_by = run_scenario(router, honest, hostile, before_requests=narrow)

    assert hostile.received == 0
    assert answered_by == ["honest"] * REQUESTS


def test_model_names_from_a_node_are_escaped_in_the_log_and_the_table(router, agent_cfg):
    identity = enroll_fresh(router, agent_cfg("hostile"), model=OTHER)
    forged = "x\n2099-01-01 INFO xim_router.mesh: \x1b[2Jall is well"
    node = HoldingNode("hostile", identity, models=(forged,), max_concurrent=1)

    async def scenario():
        task = asyncio.ensure_future(node.link.run())
        try:
            await connected(router, node)
            await in_thread(wait_for, lambda: refusal_lines(router, node), TIMEOUT_S, "the refusal line")
            # Nor does the router offer its clients a model only a refused claim names.
            client = openai.AsyncOpenAI(base_url=router.http_url + "/v1", api_key="unused", max_retries=0)
            listed = [m.id async for m in client.models.list()]
            await client.close()
            assert listed == []
        finally:
            await node.link.close()
            await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    log = router.log()
    assert "\x1b" not in log and not re.search(r"^2099-01-01", log, re.M)
    table = router.admin("agents").stdout
    assert "\x1b" not in table and "\n2099" not in table
