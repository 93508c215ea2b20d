"""Finding 5: one enrolled node must not be able to stall the router.

A hostile node (a raw DEALER with an enrolled CURVE key) sends frames that
unpack into a million values, floods leases and control frames, and puts
newlines and terminal escapes in every string it sends. The router keeps
answering, an honest node keeps serving, the decoder refuses before it
builds the flood, the journal stays one clean line per event, and libzmq
cannot queue more than a bounded number of bytes per peer.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path

import msgpack
import pytest
import zmq

from tests.security.rawnode import MODEL, RawNode, get, in_thread, serve_whole_answer, start_request
from tests.support.router import RouterProcess
from xim_proto import codec, ratelimit, transport

MILLION = 1_000_000
PEER_QUEUE_BYTES = 64 * 1024 * 1024     # per peer and direction (docs/protocol.md §4.1)


def router(tmp_path: Path) -> RouterProcess:
    # Leases are sent by hand here: give the raw nodes all the time they need.
    return RouterProcess(tmp_path, lease_interval="10s", lease_timeout="120s")


def lease_map(**fields) -> dict:
    base = {"v": 1, "type": "lease", "seq": 1, "running": 0, "waiting": 0, "kv_cache_usage": 0.0,
            "engine_state": "ready", "models": [], "in_flight": [], "max_concurrent": 4,
            "draining": False}
    return {**base, **fields}


def million_values_frame() -> bytes:
    """A lease whose in_flight holds a million (empty) request ids: just under 1 MiB."""
    frame = msgpack.packb(lease_map(in_flight=[""] * MILLION))
    assert len(frame) <= codec.MAX_FRAME_BYTES
    return frame


def nested_values_frame() -> bytes:
    """A hello whose free-form hardware map nests a million small ints."""
    hello = {"v": 1, "type": "hello", "token": "t", "versions": [1], "agent_version": "a",
             "hostname": "h", "capabilities": [], "models": [], "max_concurrent": 1,
             "hardware": {"x": [[7] * 1000 for _ in range(1000)]}}
    frame = msgpack.packb(hello)
    assert len(frame) <= codec.MAX_FRAME_BYTES
    return frame


class HealthWatch:
    """Ask /healthz over and over from a thread; keep the slowest answer's time."""

    def __init__(self, url: str):
        self.url = url
        self.worst_s = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                get(self.url + "/healthz", 120)
                self.answers += 1
            finally:
                self.worst_s = max(self.worst_s, time.monotonic() - started)
            time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(150)


def honest_node_serves(proc: RouterProcess, node: RawNode) -> None:
    assert isinstance(node.lease(), codec.LeaseAck)
    answered = in_thread(start_request, proc, stream=False)
    serve_whole_answer(node, {"model": MODEL, "choices": []})
    assert answered.result(60).status == 200


# ---------------------------------------------------------------- (a) a million values


@pytest.mark.parametrize("frame", [million_values_frame(), nested_values_frame()],
                         ids=["flat", "nested"])
def test_the_decoder_refuses_a_million_values_before_building_them(frame):
    tracemalloc.start()
    try:
        with pytest.raises(codec.ProtocolError) as refused:
            codec.decode(frame, sender=codec.AGENT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.code == "too_large"
    assert "values" in refused.value.detail
    # A million list slots alone are 8 MB; the decoder stops after a bounded few.
    assert peak < 2 * 1024 * 1024, f"decoding allocated {peak} bytes before refusing"


def test_a_node_sending_million_value_frames_does_not_stall_the_router(tmp_path):
    with router(tmp_path) as proc:
        honest, hostile = RawNode(proc, hostname="honest"), RawNode(proc, hostname="hostile")
        try:
            honest.hello()
            honest.lease()
            hostile.hello()
            frames = [million_values_frame(), nested_values_frame()] * 5
            with HealthWatch(proc.http_url) as health:
                for frame in frames:
                    hostile.send(frame)
                honest_node_serves(proc, honest)          # queued behind the flood
            assert health.answers > 0
            assert health.worst_s < 3.0, (
                f"/healthz took {health.worst_s:.1f} s to answer while a node sent "
                f"{len(frames)} million-value frames")
            refusals = [m for m in hostile.drain_inbox() if isinstance(m, codec.Error)]
            assert refusals and refusals[0].code == "too_large"
            assert "Traceback" not in proc.log()
        finally:
            honest.close()
            hostile.close()


# ---------------------------------------------------------------- (b) floods


def test_a_lease_flood_is_dropped_counted_and_told_once(tmp_path):
    flood = 3000
    with router(tmp_path) as proc:
        honest, hostile = RawNode(proc, hostname="honest"), RawNode(proc, hostname="hostile")
        try:
            honest.hello()
            honest.lease()
            hostile.hello()
            for _ in range(flood):
                hostile.send(hostile.lease_msg())
            honest_node_serves(proc, honest)
            answers = hostile.drain_inbox()
            acks = [m for m in answers if isinstance(m, codec.LeaseAck)]
            told = [m for m in answers if isinstance(m, codec.Error) and m.code == "rate_limited"]
            # The router answered (hence did the work for) a small part of the flood only.
            assert len(acks) < flood // 10, f"the router answered {len(acks)} of {flood} flooded leases"
            assert 1 <= len(told) <= 2, told
            assert told[0].id is None and told[0].retryable
            log = proc.log()
            assert 1 <= log.count("over its rate") <= 2, log[-3000:]
            assert "Traceback" not in log
        finally:
            honest.close()
            hostile.close()


# ---------------------------------------------------------------- (c) what reaches the log


INJECTED = "\nFAKE 2024-01-01 INFO xim_router: all good\x1b[31m\x1b]0;pwned\x07\r\u202e"


def test_node_supplied_strings_reach_the_log_escaped_and_rate_limited(tmp_path):
    with router(tmp_path) as proc:
        honest, hostile = RawNode(proc, hostname="honest"), RawNode(proc, hostname="hostile")
        try:
            honest.hello()
            honest.lease()
            hostile.hello(hostname="evil" + INJECTED, agent_version="1.0" + INJECTED,
                          models=("m" + INJECTED,))
            hostile.lease(models=("m" + INJECTED,))
            hostile.send(codec.Drain(reason="drain" + INJECTED))
            hostile.send(codec.Bye(reason="bye" + INJECTED))
            hostile.expect(codec.Bye)
            hostile.send(codec.Hello(token=hostile.token, versions=[1], agent_version="a",
                                     hostname="x" * 255 + INJECTED, capabilities=[], hardware={},
                                     models=[], max_concurrent=1))     # over the hostname limit: refused
            assert hostile.expect(codec.Error).code == "too_large"
            hostile.hello()
            for i in range(200):
                hostile.send(codec.Error(code="internal" + INJECTED, message=f"boom {i}" + INJECTED,
                                         retryable=False, http_status=500))
            honest_node_serves(proc, honest)
            hostile.drain_inbox(1.0)
            log = proc.log()
            for raw in ("\x1b", "\x07", "\r", "\u202e"):
                assert raw not in log, f"a raw {raw!r} from the node reached the log"
            lines = log.splitlines()
            assert not [line for line in lines if line.startswith("FAKE")], "a node forged a log line"
            assert max(len(line) for line in lines) < 2000
            assert sum("reports internal" in line for line in lines) <= 2, "one line per frame: unthrottled"
            assert "evil\\x0aFAKE" in log                        # escaped, still readable
        finally:
            honest.close()
            hostile.close()


def test_escape_keeps_one_line_and_bounds_it():
    assert ratelimit.escape("plain text") == "plain text"
    assert ratelimit.escape("a\nb\x1b[31m\x07\r\x7f\x9b\u2028\u202e") == \
        "a\\x0ab\\x1b[31m\\x07\\x0d\\x7f\\x9b\\u2028\\u202e"
    assert ratelimit.escape("é ünïcode ok") == "é ünïcode ok"
    long = ratelimit.escape("y" * 1000, limit=100)
    assert long.startswith("y" * 100) and long.endswith("(1000 characters)") and len(long) < 130
    assert ratelimit.escape("\n" * 1000, limit=10).count("\\x0a") == 10


# ---------------------------------------------------------------- (d) what libzmq queues per peer


def test_one_peer_cannot_queue_gigabytes_in_the_transport():
    """A peer that the router does not read from fills its pipe to a bounded size, then waits."""
    frame = b"\x00" * (64 * 1024)
    cap = 4000                                 # 250 MiB: far past any sane bound
    ctx = zmq.Context()
    receiver, sender = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for sock in (receiver, sender):
            transport.apply_common_options(sock)
        port = receiver.bind_to_random_port("tcp://127.0.0.1")
        sender.connect(f"tcp://127.0.0.1:{port}")
        queued, refusals = 0, 0
        while queued < cap and refusals < 5:   # the receiver never reads
            try:
                sender.send(frame, zmq.DONTWAIT)
                queued += 1
                refusals = 0
            except zmq.Again:
                refusals += 1
                time.sleep(0.2)                # let the I/O threads move what they can
        # What docs/protocol.md §4.1 promises per peer and direction, plus both kernels' buffers.
        bound = PEER_QUEUE_BYTES + 2 * transport.SOCKET_BUFFER_BYTES + 1024 * 1024
        assert queued * len(frame) <= bound, (
            f"{queued * len(frame) >> 20} MiB queued toward a peer that reads nothing; "
            f"expected at most {bound >> 20} MiB")
        # Frames of the largest size fit the same budget.
        assert transport.HIGH_WATER_MARK * codec.MAX_FRAME_BYTES <= PEER_QUEUE_BYTES
    finally:
        receiver.close(0)
        sender.close(0)
        ctx.term()


# ---------------------------------------------------------------- per-field limits


def hello_map(**fields) -> dict:
    base = {"v": 1, "type": "hello", "token": "t", "versions": [1], "agent_version": "a",
            "hostname": "h", "capabilities": [], "hardware": {}, "models": [], "max_concurrent": 1}
    return {**base, **fields}


def model(name: str) -> dict:
    return {"name": name, "state": "ready"}


# (the frame at a field's limit, the same frame one over it, the field named in the refusal)
LIMIT_CASES = {
    "hello.hostname": (hello_map(hostname="h" * 255), hello_map(hostname="h" * 256)),
    "hello.capabilities": (hello_map(capabilities=["c"] * 32), hello_map(capabilities=["c"] * 33)),
    "hello.hardware": (hello_map(hardware={f"k{i}": i for i in range(64)}),
                       hello_map(hardware={f"k{i}": i for i in range(65)})),
    "hello.models": (hello_map(models=[model("m")] * 64), hello_map(models=[model("m")] * 65)),
    "hello.models.name": (hello_map(models=[model("m" * 256)]), hello_map(models=[model("m" * 257)])),
    "lease.in_flight": (lease_map(in_flight=["xim-0"] * 4096), lease_map(in_flight=["xim-0"] * 4097)),
    "lease.in_flight (an id)": (lease_map(in_flight=["i" * 256]), lease_map(in_flight=["i" * 257])),
    "lease.engine_state": (lease_map(engine_state="s" * 256), lease_map(engine_state="s" * 257)),
    "chunk.data": ({"v": 1, "type": "chunk", "id": "x", "seq": 0, "data": [b"{}"] * 8192},
                   {"v": 1, "type": "chunk", "id": "x", "seq": 0, "data": [b"{}"] * 8193}),
    "error.message": (
        {"v": 1, "type": "error", "code": "internal", "message": "m" * 65536, "retryable": False,
         "http_status": 500},
        {"v": 1, "type": "error", "code": "internal", "message": "m" * 65537, "retryable": False,
         "http_status": 500}),
}


@pytest.mark.parametrize("name", list(LIMIT_CASES))
def test_each_field_is_held_to_its_documented_limit(name):
    at_limit, over = LIMIT_CASES[name]
    codec.decode(msgpack.packb(at_limit), sender=codec.AGENT)          # an honest maximum passes
    with pytest.raises(codec.ProtocolError) as refused:
        codec.decode(msgpack.packb(over), sender=codec.AGENT)
    assert refused.value.code == "too_large"
    # The field is named, unless msgpack's own cap (the largest any field allows) stopped it first.
    field = name.split(" ")[0].rsplit(".", 1)[-1]
    assert field in refused.value.detail or "exceeds max_" in refused.value.detail, refused.value.detail


def test_a_frame_with_more_fields_than_a_map_may_hold_is_refused():
    crowded = lease_map(**{f"x{i}": 0 for i in range(64)})
    with pytest.raises(codec.ProtocolError) as refused:
        codec.decode(msgpack.packb(crowded), sender=codec.AGENT)
    assert refused.value.code == "too_large"
