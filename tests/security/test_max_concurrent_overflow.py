"""Finding 10 (one item): the enrollment's max_concurrent is a bounded integer.

Before the fix the router took any integer ≥ 1: 2**63 made SQLite raise
OverflowError (a 500 with a traceback in the log) after the join key had been
looked up, and 10**9 was stored as the node's capacity. Driven over raw HTTP
against a real `xim-router serve`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import zmq

from xim_router.policy import MAX_CONCURRENT_LIMIT


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def enroll_body(join_key: str, max_concurrent) -> dict:
    return {"join_key": join_key, "curve_public_key": zmq.curve_keypair()[0].decode(),
            "hostname": "h", "max_concurrent": max_concurrent, "agent_version": "t"}



@pytest.mark.parametrize("value", [2**63, 2**64 + 1, 10**9, MAX_CONCURRENT_LIMIT + 1, 0, -1])
def test_an_out_of_range_max_concurrent_is_refused_and_spends_nothing(router, value):
    key = router.join_key()
    status, body = post(router.http_url + "/v1/enroll", enroll_body(key, value))
    assert (status, body["error"]["code"]) == (400, "bad_request"), (status, body)
    assert f"1 to {MAX_CONCURRENT_LIMIT}" in body["error"]["message"]
    assert "Traceback" not in router.log()
    # The key was not spent: the same key still enrolls a node with a sane value.
    status, body = post(router.http_url + "/v1/enroll", enroll_body(key, MAX_CONCURRENT_LIMIT))
    assert status == 200, body
    assert router.agent(body["agent_id"])["declared_max_concurrent"] == MAX_CONCURRENT_LIMIT
