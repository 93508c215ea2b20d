"""Requests that arrive while a node switches over wait for it (`xim-router serve --hold-for-node`).

A ximd node that re-executes in place for an upgrade drains, drops its link
and says hello again on a new connection a few seconds later. A request for
its model that arrives meanwhile waits at the router for a node (bounded),
instead of an immediate 503.

Each test runs a real `xim-router serve` and a node that speaks the
protocol's frames itself over a real CURVE DEALER (tests/security/rawnode.py):
hello, lease, drain, done, a closed connection and a new one. Timings are
asserted loosely: at least the bound, well under a generous ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import time
import urllib.parse

import pytest

from tests.security.rawnode import MODEL, RawNode, chat_body, get, in_thread, post_json, serve_whole_answer, start_request
from tests.support.router import RouterProcess, wait_for
from xim_proto import codec
from xim_router import cli, keys, openai_api
from xim_router import store as store_mod
from xim_router.mesh import Router, Session

ANSWER = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}
RECONNECT_S = 1.5            # how long the node is away in the reconnect tests
CEILING_S = 8.0              # generous room above any expected time on a slow machine


def health(router: RouterProcess) -> dict:
    return json.loads(get(router.http_url + "/healthz", 10)[1])


def held(router: RouterProcess, n: int) -> bool:
    return health(router)["requests_held"] == n


def connected(router: RouterProcess, n: int) -> bool:
    return health(router)["agents_connected"] == n


def serving_node(router: RouterProcess) -> RawNode:
    node = RawNode(router)
    node.hello()
    node.lease()
    return node


def drop(router: RouterProcess, node: RawNode) -> None:
    """The node's link goes (its process re-executes): the router sees the connection close."""
    node.close()
    wait_for(lambda: connected(router, 0), 30, "the router to end the node's session")


def come_back(node: RawNode) -> None:
    """The same node on a new connection, with a new session: its hello declares the model
    ready (no lease here: waiting for its ack would skip the infer that may come first)."""
    node.reconnect()
    node.hello()


def timed(fn, *args, **kw):
    started = time.monotonic()
    result = fn(*args, **kw)
    return result, time.monotonic() - started


def answer_of(response) -> tuple[int, dict, dict]:
    """(status, body, headers) of a urlopen response or HTTPError."""
    return response.status if hasattr(response, "status") else response.code, \
        json.loads(response.read()), dict(response.headers)


@pytest.fixture
def holding_router(tmp_path):
    with RouterProcess(tmp_path, extra_args=("--hold-for-node", "10s")) as proc:
        yield proc


def test_a_request_waits_for_its_node_to_reconnect(holding_router):
    node = serving_node(holding_router)
    try:
        drop(holding_router, node)
        request = in_thread(timed, start_request, holding_router, stream=False)
        wait_for(lambda: held(holding_router, 1), 30, "the request to wait for a node")
        time.sleep(RECONNECT_S)
        come_back(node)
        serve_whole_answer(node, ANSWER)
        response, elapsed = request.result(30)
        status, body, _ = answer_of(response)
        assert status == 200 and body == ANSWER, body
        # The added latency is the node's time away, not the bound.
        assert RECONNECT_S <= elapsed < RECONNECT_S + CEILING_S, elapsed
        after = health(holding_router)
        assert after["requests_held"] == 0 and after["requests_held_total"] == 1, after
        assert after["requests_held_seconds_total"] >= RECONNECT_S, after
    finally:
        node.close()


def test_a_request_waits_while_its_node_drains_and_is_served_after_it_comes_back(holding_router):
    node = serving_node(holding_router)
    try:
        node.send(codec.Drain(reason="re-exec for an upgrade"))
        node.expect(codec.DrainAck)
        request = in_thread(start_request, holding_router, stream=False)
        wait_for(lambda: held(holding_router, 1), 30, "the request to wait for a node")
        assert not [m for m in node.drain_inbox(0.5) if isinstance(m, codec.Infer)], \
            "the router sent a request to a draining node"
        node.close()                        # the re-exec: the link drops, a new one comes
        come_back(node)
        infer = serve_whole_answer(node, ANSWER)
        status, body, _ = answer_of(request.result(30))
        assert status == 200 and body == ANSWER and infer.model == MODEL
    finally:
        node.close()


def test_a_node_that_refuses_while_switching_gets_the_request_again_once_back(holding_router):
    """The node drains before the router hears of it: its `draining` refusal is held too."""
    node = serving_node(holding_router)
    try:
        request = in_thread(start_request, holding_router, stream=False)
        refused = node.expect(codec.Infer)
        node.send(codec.Error(code="draining", message="re-exec for an upgrade", retryable=True,
                              http_status=503, id=refused.id))
        wait_for(lambda: held(holding_router, 1), 30, "the refused request to wait for a node")
        node.close()
        come_back(node)
        again = serve_whole_answer(node, ANSWER)
        status, body, _ = answer_of(request.result(30))
        assert status == 200 and body == ANSWER
        assert again.id != refused.id and again.id.startswith(refused.id)
    finally:
        node.close()


def test_nothing_comes_back_a_retryable_503_after_the_bound(tmp_path):
    bound_s = 2.0
    with RouterProcess(tmp_path, extra_args=("--hold-for-node", f"{bound_s:g}s")) as router:
        node = serving_node(router)
        drop(router, node)
        response, elapsed = timed(start_request, router, stream=False)
        status, body, headers = answer_of(response)
        assert status == 503 and body["error"]["code"] == "engine_unavailable", body
        assert "Retry-After" in headers and "waited" in body["error"]["message"], (headers, body)
        assert bound_s <= elapsed < bound_s + CEILING_S, elapsed
        assert held(router, 0)


def test_an_unknown_model_is_404_at_once(router):
    """The default router holds (10 s); a model nobody ever served is not worth waiting for."""
    node = serving_node(router)
    try:
        (status, body), elapsed = timed(post_json, router.http_url + "/v1/chat/completions",
                                        {"model": "nobody/serves-this", "messages": []})
        assert status == 404 and body["error"]["code"] == "model_not_found", body
        assert elapsed < 2.0, elapsed
    finally:
        node.close()


def test_a_client_that_goes_away_while_held_is_dropped(holding_router):
    node = serving_node(holding_router)
    try:
        drop(holding_router, node)
        url = urllib.parse.urlsplit(holding_router.http_url)
        client = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        client.request("POST", "/v1/chat/completions", body=chat_body(stream=False),
                       headers={"Content-Type": "application/json"})
        wait_for(lambda: held(holding_router, 1), 30, "the request to wait for a node")
        client.close()                          # the client gives up before any node is back
        wait_for(lambda: held(holding_router, 0), 10, "the router to stop holding the request")
        come_back(node)
        got = node.drain_inbox(2.0)
        assert not [m for m in got if isinstance(m, codec.Infer)], \
            "a request whose client had gone reached the node"
        node.lease()
        status, body, _ = answer_of(_served(holding_router, node))     # and the node serves again
        assert status == 200 and body == ANSWER
    finally:
        node.close()


def _served(router: RouterProcess, node: RawNode):
    request = in_thread(start_request, router, stream=False)
    serve_whole_answer(node, ANSWER)
    return request.result(30)


def test_hold_for_node_0_keeps_the_immediate_503(tmp_path):
    with RouterProcess(tmp_path, extra_args=("--hold-for-node", "0")) as router:
        node = serving_node(router)
        drop(router, node)
        response, elapsed = timed(start_request, router, stream=False)
        status, body, headers = answer_of(response)
        assert status == 503 and body["error"]["code"] == "engine_unavailable", body
        assert "Retry-After" in headers and "waited" not in body["error"]["message"]
        assert elapsed < 2.0, elapsed
        assert health(router)["requests_held_total"] == 0


def test_requests_past_hold_max_requests_get_the_503_at_once(tmp_path):
    with RouterProcess(tmp_path, extra_args=("--hold-for-node", "30s", "--hold-max-requests", "1")) as router:
        node = serving_node(router)
        drop(router, node)
        first = in_thread(start_request, router, stream=False)
        wait_for(lambda: held(router, 1), 30, "the first request to wait for a node")
        response, elapsed = timed(start_request, router, stream=False)
        status, body, headers = answer_of(response)
        assert status == 503 and "Retry-After" in headers, body
        assert "already wait" in body["error"]["message"] and elapsed < 5.0, (body, elapsed)
        assert held(router, 1)              # the first one still waits
        come_back(node)
        serve_whole_answer(node, ANSWER)
        assert answer_of(first.result(30))[0] == 200
        node.close()


def test_a_router_that_stops_answers_held_requests_at_once(tmp_path):
    """A held request does not keep `xim-router` from stopping for the rest of its wait."""
    router = RouterProcess(tmp_path, extra_args=("--hold-for-node", "60s")).start()
    try:
        node = serving_node(router)
        drop(router, node)
        request = in_thread(start_request, router, stream=False)
        wait_for(lambda: held(router, 1), 30, "the request to wait for a node")
        code, elapsed = timed(router.stop)
        assert code == 0 and elapsed < 8.0, (code, elapsed)
        status, body, headers = answer_of(request.result(10))
        assert status == 503 and body["error"]["code"] == "draining" and "Retry-After" in headers, body
    finally:
        router.stop()


# ---------------------------------------------------------------- the parts, in process


def test_hold_for_node_takes_a_duration_or_0():
    assert [cli._duration_or_zero(t) for t in ("0", "0s", "0.0", "2.5s", "1m")] == [0, 0, 0, 2.5, 60]
    for bad in ("-1s", "soon", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            cli._duration_or_zero(bad)
    with pytest.raises(ValueError, match="0 or more"):
        openai_api.api_settings(hold_s=-1)


def _lease(seq: int, state: str) -> codec.Lease:
    return codec.Lease(seq=seq, running=0, waiting=0, kv_cache_usage=0.0, engine_state="ready",
                       models=[codec.Model(name=MODEL, state=state)], in_flight=[], max_concurrent=4,
                       draining=False)


def test_availability_is_signalled_when_a_model_becomes_ready_not_on_every_lease(tmp_path):
    store = store_mod.Store(tmp_path / "state")
    router = Router(store, keys.load_or_create_keypair(tmp_path / "state"), mesh_bind="tcp://127.0.0.1:0")
    hello = codec.Hello(token="t", versions=[1], agent_version="test", hostname="h", capabilities=[],
                        hardware={}, models=[codec.Model(name=MODEL, state="loading")], max_concurrent=4)
    session = Session(agent_id="a", worker_id="w", routing_id=b"r", connection_fd=None, session_id="s",
                      version=1, hello=hello, connected_at=0.0, last_seen=0.0)
    router._bind(session)

    async def scenario() -> list[bool]:
        seen = []
        for seq, state in enumerate(("loading", "ready", "ready", "loading", "ready"), 1):
            event = router.availability()
            router._on_session_message(session, _lease(seq, state))
            seen.append(event.is_set())
        await asyncio.gather(*router._background, return_exceptions=True)
        return seen

    try:
        assert asyncio.run(scenario()) == [False, True, False, False, True]
    finally:
        router.store_worker.close()
        store.close()
