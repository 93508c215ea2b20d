"""An enrolled node that speaks raw frames, and an HTTP client for the router, for attack tests.

`RawNode` enrolls over the real HTTP API with a CURVE key of its own, then
drives a DEALER socket frame by frame: nothing of ximd is involved, so a
test can send what no honest agent would (a flood, a million values, control
characters) or play the honest node whose service must not suffer. Calls are
blocking and belong to one thread; HTTP calls to the router run in others
(`in_thread`).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zmq

from tests.support.router import RouterProcess
from xim_proto import codec, transport

MODEL = "tiny"


def post_json(url: str, body: dict, timeout_s: float = 30.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class RawNode:
    """One enrolled node on a raw CURVE DEALER."""

    def __init__(self, router: RouterProcess, *, hostname: str = "raw-node"):
        public, secret = (k.decode() for k in zmq.curve_keypair())
        status, body = post_json(router.http_url + "/v1/enroll", {
            "join_key": router.join_key(), "curve_public_key": public, "hostname": hostname,
            "max_concurrent": 4, "agent_version": "test"})
        assert status == 200, body
        self.agent_id: str = body["agent_id"]
        self.worker_id: str = body["worker_id"]
        self.token: str = body["token"]
        self.seq = 0
        self._router, self._keys = router, (public, secret)
        self._connect(self.worker_id.encode())

    def _connect(self, routing_id: bytes) -> None:
        public, secret = self._keys
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        transport.apply_common_options(self.sock)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.setsockopt(zmq.CURVE_SERVERKEY, self._router.public_key.encode())
        self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public.encode())
        self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret.encode())
        self.sock.connect(self._router.mesh_endpoint)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def reconnect(self) -> None:
        """The same node on a new connection (as after a re-exec): a fresh random routing id;
        call it after close(); the caller says hello again."""
        self._connect(os.urandom(16))

    # ------------------------------------------------------------ sending

    def send(self, msg: codec.Message | bytes) -> None:
        self.sock.send(msg if isinstance(msg, bytes) else codec.encode(msg))

    def hello(self, *, hostname: str = "raw-node", agent_version: str = "test",
              models: tuple[str, ...] = (MODEL,),
              capabilities: tuple[str, ...] = ("credit", "cancel")) -> codec.Welcome:
        self.send(codec.Hello(token=self.token, versions=[1], agent_version=agent_version,
                              hostname=hostname, capabilities=list(capabilities), hardware={},
                              models=[codec.Model(name=m, state="ready") for m in models],
                              max_concurrent=4))
        return self.expect(codec.Welcome)

    def lease_msg(self, *, models: tuple[str, ...] = (MODEL,), in_flight: list[str] | None = None,
                  running: int = 0, group: codec.GroupStatus | None = None) -> codec.Lease:
        self.seq += 1
        return codec.Lease(seq=self.seq, running=running, waiting=0, kv_cache_usage=0.0,
                           engine_state="ready", models=[codec.Model(name=m, state="ready") for m in models],
                           in_flight=in_flight or [], max_concurrent=4, draining=False, group=group)

    def lease(self, **kw: Any) -> codec.LeaseAck:
        self.send(self.lease_msg(**kw))
        return self.expect(codec.LeaseAck)

    # ------------------------------------------------------------ receiving

    def recv(self, timeout_s: float) -> codec.Message | None:
        if self.sock.poll(int(timeout_s * 1000)):
            return codec.decode(self.sock.recv(), sender=codec.ROUTER)
        return None

    def expect(self, kind: type, timeout_s: float = 30.0) -> Any:
        """The next message of ``kind``, skipping others (lease acks, credits)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if isinstance(msg, kind):
                return msg
        raise AssertionError(f"{self.worker_id}: no {kind.__name__} within {timeout_s} s")

    def drain_inbox(self, quiet_s: float = 2.0) -> list[codec.Message]:
        """Everything the router sent, until it has been quiet for ``quiet_s``."""
        got = []
        while (msg := self.recv(quiet_s)) is not None:
            got.append(msg)
        return got


def chunk_payload(text: str) -> bytes:
    return json.dumps({"object": "chat.completion.chunk", "model": MODEL,
                       "choices": [{"index": 0, "delta": {"content": text}}]}).encode()


def chat_body(*, stream: bool) -> bytes:
    return json.dumps({"model": MODEL, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


def start_request(router: RouterProcess, *, stream: bool, timeout_s: float = 120.0):
    """POST a chat completion; an open response (status, headers read) or an HTTPError."""
    req = urllib.request.Request(router.http_url + "/v1/chat/completions", data=chat_body(stream=stream),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        return exc


def get(url: str, timeout_s: float) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.status, resp.read()


_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="http-client")


def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Future:
    return _POOL.submit(fn, *args, **kw)


def serve_whole_answer(node: RawNode, answer: dict, timeout_s: float = 30.0) -> codec.Infer:
    """Take the next infer and answer it in one done (a non-streamed request)."""
    infer = node.expect(codec.Infer, timeout_s)
    node.send(codec.Done(id=infer.id, finish_reason="stop", body=json.dumps(answer).encode()))
    return infer
