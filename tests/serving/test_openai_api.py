"""The router's OpenAI API, through the official `openai` client, over the real mesh and bridge.

See tests/serving/stack.py for what runs: the real router (CURVE ROUTER,
ZAP, store, HTTP app), a real CURVE DEALER agent feeding the real bridge,
and the stand-in engine as its own process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time

import aiohttp
import openai
import pytest

from tests.serving.stack import MODEL, ServingStack
from tests.support.standin_engine import engine_gauge, wait_for_gauge
from xim_proto import codec
from ximd.serve import Bridge

KEY = "sk-test-key"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def stack(tmp_path, engine, request):
    options = getattr(request, "param", {})
    stack = ServingStack(tmp_path, engine.socket_path, api_keys=frozenset({KEY}), **options).start()
    try:
        yield stack
    finally:
        stack.stop()


def client(stack, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=30)


def async_client(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


# ---------------------------------------------------------------- the happy paths


def test_models_lists_what_the_agents_serve(stack):
    assert [m.id for m in client(stack).models.list()] == [MODEL]


def test_chat_not_streamed(stack):
    reply = client(stack).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert reply.object == "chat.completion"
    assert len(reply.choices[0].message.content.split()) == 8
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 8)


def test_chat_streamed_with_usage(stack):
    stream = client(stack).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 8
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streamed_without_usage_shows_no_usage_chunk(stack):
    chunks = list(client(stack).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,
                                                        stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert len("".join(c.choices[0].delta.content or "" for c in chunks).split()) == 5


class UsageInDoneOnly(Bridge):
    """An agent that follows docs/protocol.md to the letter: usage in done.usage, no done.body."""

    async def _send(self, msg):
        if isinstance(msg, codec.Done) and msg.body and b'"choices":[]' in msg.body:
            msg = dataclasses.replace(msg, body=None)
        await super()._send(msg)


@pytest.mark.parametrize("stack", [{"bridge_class": UsageInDoneOnly}], indirect=True)
def test_usage_chunk_is_built_from_done_usage_when_the_agent_sends_only_that(stack):
    chunks = list(client(stack).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].object == "chat.completion.chunk"


def test_completions_streamed_and_not(stack):
    c = client(stack)
    whole = c.completions.create(model=MODEL, prompt="once upon a time", max_tokens=6)
    assert len(whole.choices[0].text.split()) == 6 and whole.usage.total_tokens == 4 + 6
    parts = list(c.completions.create(model=MODEL, prompt="once upon a time", max_tokens=6, stream=True,
                                      stream_options={"include_usage": True}))
    assert len("".join(p.choices[0].text for p in parts if p.choices).split()) == 6
    assert parts[-1].usage.completion_tokens == 6


def test_async_client_runs_streams_side_by_side(stack):
    async def scenario():
        c = async_client(stack)

        async def one_chat():
            stream = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10,
                                                     stream=True, stream_options={"include_usage": True})
            return [chunk async for chunk in stream]

        async def one_completion():
            return await c.completions.create(model=MODEL, prompt="a b c", max_tokens=4)

        results = await asyncio.gather(*(one_chat() for _ in range(4)), one_completion())
        await c.close()
        return results

    *chats, completion = asyncio.run(scenario())
    for chunks in chats:
        assert chunks[-1].usage.completion_tokens == 10
    assert completion.usage.completion_tokens == 4


def test_stream_is_server_sent_events_exactly_as_openai_writes_them(stack):
    async def scenario():
        async with aiohttp.ClientSession() as s:
            async with s.post(stack.url + "/v1/chat/completions",
                              headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3,
                                    "stream": True}) as resp:
                return resp.status, resp.headers, await resp.read()

    status, headers, raw = asyncio.run(scenario())
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Request-Id"].startswith("xim-")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for event in events[:-2]:
        assert event.startswith(b"data: {") and b"\n" not in event
        json.loads(event[6:])


# ---------------------------------------------------------------- keys and errors


def test_a_wrong_or_missing_api_key_is_a_401_openai_style(stack):
    with pytest.raises(openai.AuthenticationError) as caught:
        client(stack, key="sk-wrong").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(stack, key="sk-wrong").models.list()

    async def no_header():
        async with aiohttp.ClientSession() as s:
            async with s.get(stack.url + "/v1/models") as resp:
                return resp.status, await resp.json()

    status, body = asyncio.run(no_header())
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_an_unknown_model_is_a_404_naming_what_is_served(stack):
    with pytest.raises(openai.NotFoundError) as caught:
        client(stack).chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert "gpt-9" in caught.value.message and "tiny" in caught.value.message


@pytest.mark.parametrize("body, problem", [
    (b"{not json", "not valid JSON"), (b'["a list"]', "JSON object"),
    (b'{"messages": []}', "'model' is required"), (b'{"model": "tiny", "stream": "yes"}', "'stream'"),
])
def test_bad_bodies_are_400s_that_say_why(stack, body, problem):
    async def scenario():
        async with aiohttp.ClientSession() as s:
            async with s.post(stack.url + "/v1/chat/completions", data=body,
                              headers={"Authorization": f"Bearer {KEY}",
                                       "Content-Type": "application/json"}) as resp:
                return resp.status, await resp.json()

    status, answer = asyncio.run(scenario())
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert problem in answer["error"]["message"]


def test_an_engine_error_keeps_its_status_and_message(stack):
    with pytest.raises(openai.InternalServerError) as caught:
        client(stack).chat.completions.create(model=MODEL, messages=MESSAGES,
                                              extra_body={"x_standin": {"fail_status": 500}})
    assert caught.value.status_code == 500 and "HTTP 500" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        client(stack).chat.completions.create(model=MODEL, messages=MESSAGES,
                                              extra_body={"x_standin": {"fail_status": 400}})


def test_an_engine_that_breaks_mid_stream_raises_in_the_client(stack):
    stream = client(stack).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50,
                                                   stream=True,
                                                   extra_body={"x_standin": {"fail_after_tokens": 3}})
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk)
    assert received and "engine" in str(caught.value.message)


@pytest.mark.parametrize("stack", [{"max_concurrent": 2}], indirect=True)
def test_more_requests_than_max_concurrent_get_429_and_nothing_hangs(stack, engine):
    async def scenario():
        c = async_client(stack)

        async def hanging():
            return await c.chat.completions.create(model=MODEL, messages=MESSAGES, timeout=20,
                                                   extra_body={"x_standin": {"hang": True}})

        held = [asyncio.ensure_future(hanging()) for _ in range(2)]
        await wait_for_gauge(engine.socket_path, 2)
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(c.chat.completions.create(model=MODEL, messages=MESSAGES)
                                          for _ in range(3)), return_exceptions=True)
        refused_in = time.monotonic() - t0
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        await wait_for_gauge(engine.socket_path, 0)       # the held slots were freed on disconnect
        after = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        await c.close()
        return outcomes, refused_in, after

    outcomes, refused_in, after = asyncio.run(scenario())
    assert all(isinstance(o, openai.RateLimitError) for o in outcomes), outcomes
    assert outcomes[0].code == "at_capacity" and outcomes[0].response.headers["Retry-After"] == "1"
    assert refused_in < 5
    assert after.usage.completion_tokens == 2


def test_a_client_that_disconnects_mid_stream_frees_the_engine_slot(stack, engine):
    async def scenario():
        async with aiohttp.ClientSession() as s:
            resp = await s.post(stack.url + "/v1/chat/completions",
                                headers={"Authorization": f"Bearer {KEY}"},
                                json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5000,
                                      "stream": True})
            await resp.content.readany()              # the stream is flowing
            assert await engine_gauge(engine.socket_path) == 1
            resp.close()                               # the client goes away
        await wait_for_gauge(engine.socket_path, 0)

    asyncio.run(scenario())
    assert stack.call(asyncio.sleep(0, result=stack.agents[0].bridge.running)) == 0


def test_a_client_gone_before_the_first_token_is_no_error_and_frees_the_slot(stack, engine, caplog):
    # The request is sent whole, then the socket closes at once: the first token comes
    # back (5 ms) before the router's disconnect poll notices, onto a closing transport.
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 5000, "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    caplog.set_level(logging.INFO, logger="xim_router")
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", stack.port)) as raw:
            raw.sendall(head + body)
    deadline = time.monotonic() + 10
    while stack.call(asyncio.sleep(0, result=stack.agents[0].bridge.running)):
        assert time.monotonic() < deadline, "a request of a departed client kept its slot"
        time.sleep(0.05)
    asyncio.run(wait_for_gauge(engine.socket_path, 0))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("stack", [{"request_timeout_s": 0.5}], indirect=True)
def test_a_request_past_its_deadline_is_a_504(stack, engine):
    with pytest.raises(openai.APIStatusError) as caught:
        client(stack).chat.completions.create(model=MODEL, messages=MESSAGES,
                                              extra_body={"x_standin": {"hang": True}})
    assert caught.value.status_code == 504 and caught.value.code == "timeout"
    asyncio.run(wait_for_gauge(engine.socket_path, 0))


# ---------------------------------------------------------------- more than one agent


@pytest.mark.parametrize("stack", [{"max_concurrent": 1}], indirect=True)
def test_a_full_agent_is_skipped_for_one_with_room(stack, engine):
    second = stack.call(stack._add_agent(1))

    async def scenario():
        c = async_client(stack)
        held = asyncio.ensure_future(c.chat.completions.create(
            model=MODEL, messages=MESSAGES, timeout=20, extra_body={"x_standin": {"hang": True}}))
        await wait_for_gauge(engine.socket_path, 1)
        reply = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        await c.close()
        return reply

    reply = asyncio.run(scenario())
    assert reply.usage.completion_tokens == 3
    served = [a.bridge.metrics.requests_by_outcome.get("ok", 0) for a in stack.agents]
    assert served == [0, 1] and stack.agents[1] is second


def test_a_retryable_refusal_moves_the_request_to_another_agent(stack):
    stack.call(stack._add_agent(8))
    first = stack.agents[0]
    first.bridge.draining = True          # refuses, though the router has not heard of it yet
    reply = client(stack).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert first.bridge.metrics.requests_by_outcome == {"draining": 1}
    assert stack.agents[1].bridge.metrics.requests_by_outcome == {"ok": 1}


def test_a_model_whose_agent_is_away_is_503_not_404(stack):
    agent = stack.agents[0]
    stack.call(agent.close())                     # says bye: the router ends the session

    async def session_gone():
        for _ in range(200):
            if not stack.router.sessions:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the router kept the session")

    stack.call(session_gone())
    with pytest.raises(openai.APIStatusError) as caught:
        client(stack).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.status_code == 503 and caught.value.code == "engine_unavailable"
    stack.agents.remove(agent)
