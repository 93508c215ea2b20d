"""Fuzz the mesh codec: every message type, both directions (docs/protocol.md §4-5).

decode() is what both ends run on frames a peer chose, so it must turn anything into
a message or a ProtocolError, never another exception; what it accepts must follow the
schema (an ``int`` field holds an int, not a bool; a record is a record), must respect
who may send it, and must survive encode() unchanged. Cases: arbitrary bytes, arbitrary
MessagePack values, and maps built from ``codec.catalogue()`` with hostile fields (wrong
types, 64-bit extremes, NaN, nil, unknown fields, nesting 200,000 deep, a tampered
envelope), each decoded as from the agent, as from the router, and with no role.

This module alone runs over 10,000 cases (printed at the end with -s); the seeds are
described in tests/security/fuzzing.py.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections import Counter
from typing import Any

import msgpack
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.security.fuzzing import (
    ANY_VALUE,
    CASES,
    fuzz_settings,
    hostile_batch,
    hostile_frame,
    seed_note,
    valid_map,
)
from xim_proto import codec

SENDERS = (codec.AGENT, codec.ROUTER, None)
MESSAGE_TYPES = sorted(codec.MESSAGES)
CASES_PER_RUN = 10_000
# Decodes that gave a message, per kind (3 decodes per case): the fuzz reaches past the envelope.
ACCEPTED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    total = sum(CASES.values())
    print(f"\ncodec fuzz: {total} cases, {seed_note()}: {dict(CASES)}; accepted: {dict(ACCEPTED)}")
    every_kind = {"bytes", "msgpack values"} | {f"{how} {name}" for name in MESSAGE_TYPES
                                                for how in ("hostile", "valid")}
    if every_kind <= set(CASES):         # the whole module ran (not a -k selection)
        assert total >= CASES_PER_RUN, f"only {total} cases ran: the CI floor is {CASES_PER_RUN}"


# ---------------------------------------------------------------- properties


def conforms(value: Any, wire_type: str) -> bool:
    """Whether a decoded value has the Python type the schema promises."""
    if wire_type == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if wire_type == "float":
        return type(value) is float
    if wire_type == "bool":
        return isinstance(value, bool)
    if wire_type in ("str", "bin", "map"):
        return isinstance(value, {"str": str, "bin": bytes, "map": dict}[wire_type]) and \
            (wire_type != "map" or all(isinstance(k, str) for k in value))
    if wire_type.startswith("list["):
        return isinstance(value, list) and all(conforms(v, wire_type[5:-1]) for v in value)
    record = codec.RECORDS[wire_type]
    return isinstance(value, record) and all(
        (getattr(value, name) is None and not required) or conforms(getattr(value, name), inner)
        for name, inner, required in codec.catalogue()[wire_type])


def check_decoded(frame: bytes, sender: str | None) -> codec.Message | None:
    """decode() under the documented contract; the message, or None for a ProtocolError."""
    try:
        msg = codec.decode(frame, sender=sender)
    except codec.ProtocolError as exc:
        assert exc.code in codec.PROTOCOL_ERROR_CODES, exc
        return None
    assert type(msg) is codec.MESSAGES[msg.TYPE]
    assert sender is None or sender in msg.SENDERS, f"{msg.TYPE} accepted from the {sender}"
    for name, wire_type, required in codec.catalogue()[msg.TYPE]:
        value = getattr(msg, name)
        assert (value is None and not required) or conforms(value, wire_type), (msg.TYPE, name, value)
    # Round trip: what was accepted encodes, and decodes to the same frame again
    # (bytes are compared, not messages: NaN != NaN).
    again = codec.encode(msg, version=codec.PROTOCOL_VERSION)
    assert codec.encode(codec.decode(again, sender=sender)) == again
    return msg


def decode_every_way(frame: bytes, kind: str) -> None:
    for sender in SENDERS:
        if check_decoded(frame, sender) is not None:
            ACCEPTED[kind] += 1
    CASES[kind] += 1


# ---------------------------------------------------------------- arbitrary input


@fuzz_settings(max_examples=2500)
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\xc1")                                        # never used in MessagePack
@example(b"\xdd\xff\xff\xff\xff")                        # an array claiming 4 G elements
@example(b"\x91" * 100_000 + b"\xc0")                   # nesting 100,000 deep
@example(b"\x81\x01\x01")                                # a map with an int key
def test_arbitrary_bytes(frame):
    decode_every_way(frame, "bytes")


@fuzz_settings(max_examples=1500)
@given(ANY_VALUE)
def test_arbitrary_messagepack_values(value):
    decode_every_way(msgpack.packb(value, use_bin_type=True), "msgpack values")


# ---------------------------------------------------------------- catalogue-shaped input


def values_counted(value: Any) -> int:
    """What decode()'s value budget counts for ``value``: every array item and map entry
    (key and value), at every depth."""
    if isinstance(value, (list, tuple)):
        return len(value) + sum(values_counted(v) for v in value)
    if isinstance(value, dict):
        return 2 * len(value) + sum(values_counted(k) + values_counted(v) for k, v in value.items())
    return 0


@fuzz_settings(max_examples=1500)
@given(ANY_VALUE)
@example([0] * codec.MAX_VALUES)                           # the densest: one byte per value
@example({0: [[]] * 1000, 1: {}})
@example([[0] * 15] * 1300)                                # just over the budget, 20,803 bytes
def test_a_frame_never_holds_more_values_than_bytes(value):
    """decode() counts values only in frames longer than MAX_VALUES bytes: sound only if
    no frame holds as many counted values as it has bytes."""
    frame = msgpack.packb(value, use_bin_type=True)
    assert values_counted(value) < len(frame)
    if values_counted(value) > codec.MAX_VALUES:           # over the budget: refused, as before
        with pytest.raises(codec.ProtocolError, match="values"):
            codec.decode(frame)


@pytest.mark.parametrize("name", MESSAGE_TYPES)
@fuzz_settings(max_examples=400)
@given(data=st.data())
def test_hostile_maps_of_each_message_type(name, data):
    decode_every_way(data.draw(hostile_frame(name)), f"hostile {name}")


@pytest.mark.parametrize("name", MESSAGE_TYPES)
@fuzz_settings(max_examples=150)
@given(data=st.data())
def test_valid_maps_of_each_message_type_decode_and_round_trip(name, data):
    fields = data.draw(valid_map(name))
    frame = msgpack.packb({**fields, "v": codec.PROTOCOL_VERSION, "type": name}, use_bin_type=True)
    for sender in SENDERS:
        msg = check_decoded(frame, sender)
        allowed = sender is None or sender in codec.MESSAGES[name].SENDERS
        assert (msg is not None) == allowed, f"a valid {name} from the {sender}: {msg}"
        if msg is not None:
            assert {f.name for f in dataclasses.fields(msg) if getattr(msg, f.name) is not None} == \
                {k for k, v in fields.items() if v is not None}
    CASES[f"valid {name}"] += 1


# ---------------------------------------------------------------- batches (revision 1.3)


def check_batched(frame: bytes, kind: str) -> None:
    """A batch as the router reads it: the envelope under decode()'s contract, then each of its
    frames as one on its own, where a hello or a batch is refused."""
    for sender in SENDERS:
        batch = check_decoded(frame, sender)
        if not isinstance(batch, codec.Batch):
            continue
        assert len(batch.frames) <= codec.MAX_BATCH_FRAMES
        for item in batch.frames:
            try:
                msg = codec.decode(item, sender=sender, batched=True)
            except codec.ProtocolError as exc:
                assert exc.code in codec.PROTOCOL_ERROR_CODES, exc
                continue
            assert msg.TYPE not in codec.NOT_BATCHED, f"a {msg.TYPE} accepted inside a batch"
            assert check_decoded(item, sender) == msg
            ACCEPTED[f"{kind} item"] += 1
    CASES[kind] += 1


@fuzz_settings(max_examples=600)
@given(hostile_batch())
def test_hostile_batches(frame):
    check_batched(frame, "hostile batches")


@fuzz_settings(max_examples=200)
@given(st.data())
def test_batches_of_valid_frames_give_back_each_frame(data):
    """Valid frames of any type in a batch: each comes back as it would alone, in order,
    except a hello or a batch, which are refused."""
    names = data.draw(st.lists(st.sampled_from(MESSAGE_TYPES), max_size=6))
    frames = [msgpack.packb({**data.draw(valid_map(name)), "v": codec.PROTOCOL_VERSION, "type": name},
                            use_bin_type=True) for name in names]
    batch = codec.decode(codec.encode(codec.Batch(frames=frames)), sender=codec.AGENT)
    assert isinstance(batch, codec.Batch) and batch.frames == frames
    for name, frame in zip(names, frames, strict=True):
        if name in codec.NOT_BATCHED:
            with pytest.raises(codec.ProtocolError, match="unexpected_type"):
                codec.decode(frame, batched=True)
        else:                                  # bytes compared, not messages: NaN != NaN
            assert codec.encode(codec.decode(frame, batched=True)) == codec.encode(codec.decode(frame))
    CASES["valid batches"] += 1


# ---------------------------------------------------------------- memory


def worst_case_frame() -> bytes:
    """A 1 MiB hello whose free-form hardware map unpacks into ~a million empty lists."""
    head = {"v": 1, "type": "hello", "token": "xat_x", "versions": [1], "agent_version": "1",
            "hostname": "h", "capabilities": [], "models": [], "max_concurrent": 1}
    count = codec.MAX_FRAME_BYTES - 200
    packed = msgpack.packb({**head, "hardware": {"x": []}}, use_bin_type=True)
    return packed.replace(b"\xa1x\x90", b"\xa1x\xdd" + count.to_bytes(4, "big") + b"\x90" * count)


# Peak Python memory one frame may cost to decode: 32 times the frame limit.
DECODE_MEMORY_BOUND = 32 * codec.MAX_FRAME_BYTES


def test_decoding_one_frame_costs_bounded_memory():
    frame = worst_case_frame()
    assert len(frame) <= codec.MAX_FRAME_BYTES
    tracemalloc.start()
    try:
        try:
            codec.decode(frame, sender=codec.AGENT)
        except codec.ProtocolError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= DECODE_MEMORY_BOUND, f"decoding one {len(frame)}-byte frame peaked at {peak >> 20} MiB"


def worst_case_batch(item: bytes) -> bytes:
    """A batch of as many copies of ``item`` as fit in one frame."""
    count = min(codec.MAX_BATCH_FRAMES, (codec.MAX_FRAME_BYTES - 64) // (len(item) + 5))
    return codec.encode(codec.Batch(frames=[item] * count))


def lease_full_of_lists() -> bytes:
    """A lease (allowed in a batch) whose unknown field unpacks into as many empty lists as one
    frame's value budget lets through: all of them thrown away after the decode."""
    fields = {"v": 1, "type": "lease", "seq": 1, "running": 0, "waiting": 0, "kv_cache_usage": 0.0,
              "engine_state": "x", "models": [], "in_flight": [], "max_concurrent": 1, "draining": False}
    left = codec.MAX_VALUES - 2 * (len(fields) + 1) - 3           # the maps' entries, x's 3 items
    thirds = [8000, 8000, left - 16000]
    return msgpack.packb({**fields, "x": [[[]] * n for n in thirds]}, use_bin_type=True)


def chunk_full_of_tiny_bins() -> bytes:
    """A chunk whose data is as many 2-byte bins as a field allows: all of them kept."""
    return codec.encode(codec.Chunk(id="r", seq=1, data=[b"ab"] * 8192))


@pytest.mark.parametrize("item", [lease_full_of_lists(), chunk_full_of_tiny_bins()], ids=["lists", "bins"])
def test_decoding_a_batch_and_every_frame_in_it_costs_bounded_memory(item):
    """The router decodes a batch, then each frame in it, and keeps what they hold: a whole
    frame's worth of hostile items costs what one frame may (each frame has its own budget)."""
    frame = worst_case_batch(item)
    assert len(frame) <= codec.MAX_FRAME_BYTES
    tracemalloc.start()
    try:
        kept = []
        batch = codec.decode(frame, sender=codec.AGENT)
        assert isinstance(batch, codec.Batch) and len(batch.frames) > 1
        for inner in batch.frames:
            try:
                kept.append(codec.decode(inner, sender=codec.AGENT, batched=True))
            except codec.ProtocolError:
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kept, "the items should decode: the test would measure nothing"
    assert peak <= DECODE_MEMORY_BOUND, f"decoding a {len(frame)}-byte batch peaked at {peak >> 20} MiB"
