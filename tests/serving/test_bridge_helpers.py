"""The bridge's pure helpers: SSE framing, error mapping, usage request, frame splitting."""

from __future__ import annotations

import json

import pytest

from ximd.serve import (
    engine_error_message,
    error_code_for_status,
    frames_of,
    has_finish_reason,
    sse_data,
    with_usage_requested,
)


@pytest.mark.parametrize("event, data", [
    (b'data: {"a":1}', b'{"a":1}'),
    (b'data:{"a":1}', b'{"a":1}'),
    (b"data: one\ndata: two", b"one\ntwo"),
    (b"data: one\r\ndata: two", b"one\ntwo"),
    (b": keep-alive", None),
    (b"event: ping\ndata: x", b"x"),
    (b"", None),
])
def test_sse_data(event, data):
    assert sse_data(event) == data


@pytest.mark.parametrize("payload, finished", [
    (b'{"choices":[{"finish_reason":null}]}', False),
    (b'{"choices":[{"finish_reason":"length"}]}', True),
    (b'{"choices":[{"finish_reason": null}]}', False),
    (b'{"choices":[{"finish_reason": "stop"}]}', True),
    (b'{"choices":[{"finish_reason":null,"stop_reason":"x"}]}', False),
    (b'{"choices":[{"finish_reason":null},{"finish_reason":"stop"}]}', True),
    (b'{"choices":[]}', False),
])
def test_has_finish_reason(payload, finished):
    assert has_finish_reason(payload) is finished


@pytest.mark.parametrize("status, code", [
    (400, "bad_request"), (422, "bad_request"), (413, "bad_request"), (404, "model_not_found"),
    (429, "at_capacity"), (500, "internal"), (502, "engine_unavailable"),
    (503, "engine_unavailable"), (504, "timeout"), (408, "timeout"),
])
def test_error_code_for_status(status, code):
    assert error_code_for_status(status) == code


@pytest.mark.parametrize("body, text", [
    (b'{"error":{"message":"max_tokens too big","type":"BadRequestError","code":400}}',
     "max_tokens too big"),
    (b'{"object":"error","message":"older vLLM shape","code":400}', "older vLLM shape"),
    (b'{"detail":"Not Found"}', "Not Found"),
    (b"<html>proxy error</html>", "<html>proxy error</html>"),
    (b"", "no details"),
])
def test_engine_error_message(body, text):
    message = engine_error_message(400, body)
    assert message.startswith("engine answered HTTP 400: ") and text in message


def test_usage_is_requested_once_and_other_options_survive():
    body = json.dumps({"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": False}})
    out = json.loads(with_usage_requested(body.encode()))
    assert out["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    already = b'{"stream_options":{"include_usage":true}}'
    assert with_usage_requested(already) is already
    # A client that said no still gets none shown (the router's business); the engine is asked.
    refused = json.loads(with_usage_requested(b'{"stream_options":{"include_usage":false}}'))
    assert refused["stream_options"] == {"include_usage": True}
    assert with_usage_requested(b"not json") == b"not json"
    assert with_usage_requested(b"[1]") == b"[1]"


def test_frames_of_respects_the_limit_but_never_splits_a_payload():
    parts = [b"a" * 40, b"b" * 40, b"c" * 40, b"d" * 200]
    assert [len(g) for g in frames_of(parts, limit=100)] == [2, 1, 1]
    assert list(frames_of([], limit=100)) == []
