"""Finding 10: deeply nested JSON and bodies at the size limit answered 500 with a traceback.

Raw HTTP against a real `xim-router serve`: every hostile body gets a 400 (or 413)
in the API's own error shape — OpenAI's on the OpenAI routes — quickly, the log
holds no traceback, and the router keeps answering.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.support.router import RouterProcess

LIMIT = 1 << 20          # xim_router.http.MAX_BODY_BYTES
HOSTILE = {
    "nested arrays": b"[" * 100_000,
    "nested arrays just under the limit": b"[" * (LIMIT - 16),
    "nested objects": b'{"a":' * 150_000,
}
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    with RouterProcess(tmp_path_factory.mktemp("hostile-bodies")) as proc:
        yield proc


def post(url: str, body: bytes) -> tuple[int, dict, float]:
    started = time.monotonic()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, json.loads(raw), time.monotonic() - started


@pytest.mark.parametrize("name", list(HOSTILE))
def test_nested_json_is_a_400_on_the_enrollment_api(router, name):
    status, body, _ = post(router.http_url + "/v1/enroll", HOSTILE[name])
    assert (status, body) == (400, {"error": {"code": "bad_request",
                                              "message": "the body is nested too deeply"}}), body
    assert "Traceback" not in router.log()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_nested_json_is_an_openai_400(router, path, name):
    status, body, elapsed = post(router.http_url + path, HOSTILE[name])
    assert status == 400, body
    assert set(body["error"]) == OPENAI_ERROR_KEYS, body
    assert body["error"]["code"] == "bad_request" and "nested too deeply" in body["error"]["message"]
    assert elapsed < 30            # bounded: refused, not worked through
    assert "Traceback" not in router.log()


def test_a_body_over_the_limit_is_an_openai_413(router):
    status, body, _ = post(router.http_url + "/v1/chat/completions", b" " * (LIMIT + 1))
    assert status == 413 and set(body["error"]) == OPENAI_ERROR_KEYS, body
    assert body["error"]["code"] == "too_large"


def test_the_router_keeps_serving_after_hostile_bodies(router):
    for body in HOSTILE.values():
        post(router.http_url + "/v1/chat/completions", body)
    with urllib.request.urlopen(router.http_url + "/healthz", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"
    status, body, _ = post(router.http_url + "/v1/chat/completions",
                           json.dumps({"model": "absent", "messages": []}).encode())
    assert status in (404, 503) and set(body["error"]) == OPENAI_ERROR_KEYS
    assert "Traceback" not in router.log()
