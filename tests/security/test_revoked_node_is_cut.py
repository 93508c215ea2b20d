"""Finding 9: a revoked node must lose its session, its streams and the mesh at once.

A hostile enrolled node (a raw DEALER with its enrolled CURVE key) is streaming
an answer to a real client through a real `xim-router serve` when the operator
runs `xim-router revoke`. The lease timeout is two minutes, so nothing but the
revocation can end the session within the waits below. The client's stream
must end with an error event, the node must hear `revoked`, whatever it sends
afterwards must reach no client, and a new connection with its key must fail
the CURVE handshake (ZAP reads the store on every connection).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import pytest
import zmq

from tests.mesh.helpers import load_config, write_agent_config
from tests.security.curve_probe import handshake_outcome
from tests.support.router import RouterProcess, wait_for
from xim_proto import codec, transport
from ximd import enrollment

MODEL = codec.Model(name="tiny", state="ready")


@pytest.fixture
def router(tmp_path):
    with RouterProcess(tmp_path, lease_interval="5s", lease_timeout="120s", dead_after="10m") as proc:
        yield proc


def connect(router: RouterProcess, identity) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    transport.apply_common_options(sock)
    sock.setsockopt(zmq.ROUTING_ID, identity.worker_id.encode())
    sock.setsockopt(zmq.CURVE_SERVERKEY, router.public_key.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, identity.agent_public_key.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, identity.agent_secret_key.encode())
    sock.connect(router.mesh_endpoint)
    return sock


def receive(sock: zmq.Socket, kind: type, timeout_s: float = 30.0):
    """The next message of ``kind`` from the router, skipping lease acks and the like."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = codec.decode(sock.recv(), sender=codec.ROUTER)
            if isinstance(msg, kind):
                return msg
    raise AssertionError(f"no {kind.__name__} from the router within {timeout_s} s")


def stream_in_background(url: str) -> dict:
    """POST a streaming chat completion in a thread; the dict gets its body when it ends."""
    result: dict = {}

    def run():
        req = urllib.request.Request(url + "/v1/chat/completions", method="POST", data=json.dumps(
            {"model": MODEL.name, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode())
        with urllib.request.urlopen(req, timeout=120) as resp:
            result["body"] = resp.read().decode()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["thread"] = thread
    return result


def test_revocation_ends_the_session_its_streams_and_its_connections(router, tmp_path):
    cfg = load_config(write_agent_config(tmp_path / "agent.toml", url=router.http_url,
                                         state_dir=tmp_path / "agent-state"))
    identity = asyncio.run(enrollment.enroll(cfg, router.join_key(), hostname="hostile", hardware={}))
    node = connect(router, identity)
    node.send(codec.encode(codec.Hello(token=identity.token, versions=[1], agent_version="t",
                                       hostname="hostile", capabilities=[], hardware={},
                                       models=[MODEL], max_concurrent=4)))
    receive(node, codec.Welcome)

    client = stream_in_background(router.http_url)
    infer = receive(node, codec.Infer)
    node.send(codec.encode(codec.Chunk(id=infer.id, seq=0, data=[b'{"choices":[{"delta":{"content":"a"}}]}'])))
    wait_for(lambda: router.agent(identity.agent_id)["state"] == "active", 30, "the node to be active")

    router.revoke(identity.agent_id)
    reject = receive(node, codec.Reject)
    assert reject.code == "revoked"
    client["thread"].join(30)
    assert "body" in client, "the client's stream was still open 30 s after the revocation"
    body = client["body"]
    assert '"content":"a"' in body                       # what came before the revocation
    assert "agent_unavailable" in body and "[DONE]" not in body, body

    # The node ignores the reject: what it sends now reaches nobody, a new hello is refused.
    node.send(codec.encode(codec.Chunk(id=infer.id, seq=1, data=[b'{"late":true}'])))
    node.send(codec.encode(codec.Hello(token=identity.token, versions=[1], agent_version="t",
                                       hostname="hostile", capabilities=[], hardware={},
                                       models=[MODEL], max_concurrent=4)))
    assert receive(node, codec.Reject).code in ("no_session", "revoked")
    assert receive(node, codec.Reject).code in ("no_session", "revoked")
    node.close(linger=0)
    # A new connection with the revoked key does not get through the handshake.
    outcome = handshake_outcome(router.mesh_endpoint, router.public_key,
                                (identity.agent_public_key.encode(), identity.agent_secret_key.encode()))
    assert outcome == "failed"
    assert router.agent(identity.agent_id)["state"] == "revoked"
