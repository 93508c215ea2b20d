"""The codec: round trips, every rejection path, and arbitrary bytes (hypothesis)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xim_proto import codec
from xim_proto.codec import ProtocolError


def sample_messages() -> list[codec.Message]:
    model = codec.Model(name="tiny", state="ready", max_model_len=2048)
    return [
        codec.Hello(token="xat_secret", versions=[1], agent_version="0.1.0", hostname="n1",
                    capabilities=["stream", "credit"], hardware={"gpus": [], "ram_bytes": 1 << 34},
                    models=[model], max_concurrent=8),
        codec.Welcome(version=1, session="s1", router_version="0.1.0", lease_interval_s=5.0,
                      lease_timeout_s=15.0, max_frame_bytes=codec.MAX_FRAME_BYTES,
                      capabilities=["credit"], assigned_model="tiny"),
        codec.Reject(code="revoked", message="identity revoked", retry_after_s=None),
        codec.Lease(seq=3, running=1, waiting=0, kv_cache_usage=0.25, engine_state="ready",
                    models=[model], in_flight=["r1"], max_concurrent=8, draining=False),
        codec.LeaseAck(seq=3, stale=["r0"]),
        codec.Group(group="llama-405b", epoch=4, action="run", model="meta-llama/Llama-3.1-405B",
                    tensor_parallel_size=8, pipeline_parallel_size=2, rank=1, size=2,
                    leader_address="10.0.0.10", leader_port=29500),
        codec.Infer(id="r1", model="tiny", endpoint="chat.completions", body=b'{"messages":[]}',
                    stream=True, deadline_s=30.0, credit=16),
        codec.Chunk(id="r1", seq=0, data=[b'{"choices":[]}', b'{"choices":[1]}']),
        codec.Done(id="r1", finish_reason="stop", usage=codec.Usage(3, 4, 7)),
        codec.Error(code="at_capacity", message="8 running", retryable=True, http_status=429, id="r2"),
        codec.Cancel(id="r1", reason="client went away"),
        codec.Credit(id="r1", n=4),
        codec.Drain(reason="SIGTERM"),
        codec.DrainAck(in_flight=2),
        codec.Bye(reason="shutting down"),
        codec.Batch(frames=[codec.encode(codec.Chunk(id="r1", seq=1, data=[b"{}"])),
                            codec.encode(codec.Done(id="r1"))]),
    ]


def test_every_message_type_has_a_sample():
    assert {type(m).TYPE for m in sample_messages()} == set(codec.MESSAGES)


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).TYPE)
def test_round_trip(msg):
    assert codec.decode(codec.encode(msg)) == msg


def test_envelope_is_a_flat_map_with_version_and_type():
    raw = msgpack.unpackb(codec.encode(codec.Credit(id="r1", n=2)))
    assert raw == {"v": 1, "type": "credit", "id": "r1", "n": 2}


def test_optional_fields_are_omitted_and_nil_means_absent():
    raw = msgpack.unpackb(codec.encode(codec.Done(id="r1")))
    assert raw == {"v": 1, "type": "done", "id": "r1"}
    frame = msgpack.packb({"v": 1, "type": "done", "id": "r1", "usage": None})
    assert codec.decode(frame) == codec.Done(id="r1")


def test_unknown_fields_are_ignored_for_forward_compatibility():
    frame = msgpack.packb({"v": 1, "type": "credit", "id": "r1", "n": 2, "later": [1, 2]})
    assert codec.decode(frame) == codec.Credit(id="r1", n=2)


def test_float_fields_accept_integers():
    frame = msgpack.packb({"v": 1, "type": "drain_ack", "in_flight": 0})
    assert codec.decode(frame) == codec.DrainAck(in_flight=0)
    lease = msgpack.unpackb(codec.encode(sample_messages()[3]))
    lease["kv_cache_usage"] = 0
    assert codec.decode(msgpack.packb(lease)).kv_cache_usage == 0.0


def test_token_is_not_in_repr():
    assert "xat_secret" not in repr(sample_messages()[0])


def expect(code: str, frame: bytes, detail: str = "", **kw):
    with pytest.raises(ProtocolError) as info:
        codec.decode(frame, **kw)
    assert info.value.code == code
    assert detail in info.value.detail
    return info.value


def test_truncated_frame_is_malformed():
    frame = codec.encode(sample_messages()[0])
    for cut in (1, len(frame) // 2, len(frame) - 1):
        expect("malformed", frame[:cut])


def test_trailing_bytes_are_malformed():
    expect("malformed", codec.encode(codec.Bye(reason="x")) + b"\x00")


def test_not_a_map_is_malformed():
    expect("malformed", msgpack.packb([1, 2, 3]), "not a map")


def test_missing_version_and_type():
    expect("malformed", msgpack.packb({"type": "bye", "reason": "x"}), "envelope field v")
    expect("malformed", msgpack.packb({"v": 1, "reason": "x"}), "envelope field type")
    expect("malformed", msgpack.packb({"v": True, "type": "bye", "reason": "x"}), "envelope field v")


def test_wrong_version():
    err = expect("unsupported_version", msgpack.packb({"v": 99, "type": "bye", "reason": "x"}))
    assert "99" in err.detail


def test_unknown_type():
    expect("unknown_type", msgpack.packb({"v": 1, "type": "teleport"}), "teleport")


def test_missing_field_is_named():
    expect("malformed", msgpack.packb({"v": 1, "type": "credit", "id": "r1"}),
           "credit.n: missing required field")


def test_wrong_type_is_named():
    expect("malformed", msgpack.packb({"v": 1, "type": "credit", "id": "r1", "n": "2"}),
           "credit.n: expected int, got str")
    expect("malformed", msgpack.packb({"v": 1, "type": "credit", "id": "r1", "n": True}),
           "expected int, got bool")
    expect("malformed", msgpack.packb({"v": 1, "type": "chunk", "id": "r", "seq": 0,
                                       "data": ["text, not bin"]}, use_bin_type=True),
           "chunk.data: expected bin")


def test_nested_record_is_validated():
    lease = msgpack.unpackb(codec.encode(sample_messages()[3]))
    lease["models"] = [{"name": "tiny"}]
    expect("malformed", msgpack.packb(lease), "lease.models.state: missing required field")


def test_non_string_map_keys_are_malformed():
    hello = msgpack.unpackb(codec.encode(sample_messages()[0]))
    hello["hardware"] = {b"bytes key": 2}
    expect("malformed", msgpack.packb(hello, use_bin_type=True), "hello.hardware: map keys")
    hello["hardware"] = {1: 2}
    expect("malformed", msgpack.packb(hello), "not one MessagePack value")


def test_oversized_frame_is_refused_both_ways():
    expect("too_large", b"\x00" * (codec.MAX_FRAME_BYTES + 1))
    big = codec.Chunk(id="r1", seq=0, data=[b"x" * codec.MAX_FRAME_BYTES])
    with pytest.raises(ProtocolError) as info:
        codec.encode(big)
    assert info.value.code == "too_large"


def test_role_check():
    welcome = codec.encode(sample_messages()[1])
    assert isinstance(codec.decode(welcome, sender=codec.ROUTER), codec.Welcome)
    expect("unexpected_type", welcome, "welcome is not sent by the agent", sender=codec.AGENT)
    error = codec.encode(sample_messages()[9])
    codec.decode(error, sender=codec.AGENT)
    codec.decode(error, sender=codec.ROUTER)


def test_encode_validates_our_own_messages():
    with pytest.raises(ProtocolError, match="credit.n: expected int"):
        codec.encode(codec.Credit(id="r1", n="3"))
    with pytest.raises(ProtocolError, match="missing required field"):
        codec.encode(codec.Credit(id=None, n=3))


def test_hello_always_travels_in_a_version_1_envelope():
    assert msgpack.unpackb(codec.encode(sample_messages()[0], version=7))["v"] == 1


def test_error_for_uses_the_code_table():
    err = codec.error_for("at_capacity", "full", request_id="r9")
    assert (err.retryable, err.http_status, err.id) == (True, 429, "r9")
    with pytest.raises(KeyError):
        codec.error_for("no_such_code", "x")


# ---------------------------------------------------------------- properties


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_ever_raise_protocol_error(frame):
    try:
        codec.decode(frame)
    except ProtocolError as exc:
        assert exc.code in codec.PROTOCOL_ERROR_CODES


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=800, deadline=None)
@given(st.sampled_from(sorted(codec.MESSAGES)), st.integers(0, 2),
       st.dictionaries(st.sampled_from(["id", "n", "seq", "data", "code", "message", "token",
                                        "models", "usage", "body", "versions", "hardware",
                                        "retryable", "http_status", "reason", "in_flight"]),
                       msgpack_values, max_size=8))
def test_well_formed_maps_with_random_fields_only_raise_protocol_error(kind, version, fields):
    frame = msgpack.packb({"v": version, "type": kind, **fields}, use_bin_type=True)
    try:
        msg = codec.decode(frame)
    except ProtocolError:
        return
    # Whatever decodes must encode again to the same message.
    assert codec.decode(codec.encode(msg)) == msg


@st.composite
def chunks(draw):
    data = draw(st.lists(st.binary(max_size=200), max_size=20))
    return codec.Chunk(id=draw(st.text(min_size=1, max_size=36)), seq=draw(st.integers(0, 2**31)),
                       data=data)


@settings(max_examples=300, deadline=None)
@given(chunks())
def test_chunk_round_trip(chunk):
    assert codec.decode(codec.encode(chunk)) == chunk


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=50), st.integers(0, 2**32), st.integers(0, 10_000),
       st.floats(0, 1), st.lists(st.text(max_size=10), max_size=5), st.booleans())
def test_lease_round_trip(state, seq, running, usage, ids, draining):
    lease = codec.Lease(seq=seq, running=running, waiting=0, kv_cache_usage=usage,
                        engine_state=state, models=[codec.Model(name="m", state=state)],
                        in_flight=ids, max_concurrent=4, draining=draining)
    assert codec.decode(codec.encode(lease)) == lease


# ---------------------------------------------------------------- batches (revision 1.3)


def frames_of(n: int, size: int = 0) -> list[bytes]:
    return [codec.encode(codec.Chunk(id=f"r{i}", seq=i + 1, data=[b"x" * size])) for i in range(n)]


def unpacked(messages) -> list[bytes]:
    """The frames a list of (message, count) carries, in order, each batch checked as it is read."""
    out = []
    for message, count in messages:
        assert len(message) <= codec.MAX_FRAME_BYTES
        msg = codec.decode(message, sender=codec.AGENT)
        if isinstance(msg, codec.Batch):
            assert 2 <= count == len(msg.frames) <= codec.MAX_BATCH_FRAMES
            out += msg.frames
        else:
            assert count == 1
            out.append(message)
    return out


def test_a_batch_carries_the_frames_as_they_would_travel_alone_in_order():
    frames = frames_of(5)
    [(message, count)] = list(codec.batched(frames, version=1))
    assert count == 5
    assert msgpack.unpackb(message) == {"v": 1, "type": "batch", "frames": frames}
    batch = codec.decode(message, sender=codec.AGENT)
    assert batch == codec.Batch(frames=frames)
    assert [codec.decode(f, sender=codec.AGENT, batched=True) for f in batch.frames] == \
        [codec.decode(f) for f in frames]


def test_a_single_frame_goes_as_it_is():
    frames = frames_of(1)
    assert list(codec.batched(frames)) == [(frames[0], 1)]


@pytest.mark.parametrize("n, size", [(codec.MAX_BATCH_FRAMES + 1, 0), (3 * codec.MAX_BATCH_FRAMES, 10),
                                     (40, 100_000), (9, 300_000), (3, codec.MAX_FRAME_BYTES - 100)])
def test_batches_keep_the_size_and_count_limits_and_the_order(n, size):
    frames = frames_of(n, size)
    messages = list(codec.batched(frames))
    assert unpacked(messages) == frames
    assert sum(count for _, count in messages) == n


@pytest.mark.parametrize("size", [0, 200, 255 - 40, 256, 65535 - 40, 65536, 500_000])
@pytest.mark.parametrize("version", [1, 127, 65535])
def test_what_the_sender_allows_for_the_envelope_is_enough(size, version):
    """The batch of frames of every bin header size is never longer than the sender reckoned,
    so a batch it packs up to the frame limit stays within it."""
    frames = frames_of(2, size)
    [(message, count)] = list(codec.batched(frames, version=version))
    assert count == 2
    assert len(message) <= codec._BATCH_ENVELOPE_BYTES + sum(len(f) + codec._BATCH_ITEM_BYTES for f in frames)


def test_batches_are_packed_lazily():
    """A sender stopped by a full queue packs only what it sends."""
    packed = codec.batched(frames_of(3 * codec.MAX_BATCH_FRAMES))
    _, count = next(packed)
    assert count == codec.MAX_BATCH_FRAMES


@pytest.mark.parametrize("inner", [codec.Hello(token="t", versions=[1], agent_version="1", hostname="h",
                                               capabilities=[], hardware={}, models=[], max_concurrent=1),
                                   codec.Batch(frames=[])], ids=["hello", "batch"])
def test_a_hello_or_a_batch_may_not_travel_inside_a_batch(inner):
    frame = codec.encode(inner)
    assert codec.decode(frame) == inner                       # alone it is fine
    with pytest.raises(ProtocolError) as caught:
        codec.decode(frame, batched=True)
    assert caught.value.code == "unexpected_type"


def test_a_batch_over_the_count_limit_is_too_large():
    frame = msgpack.packb({"v": 1, "type": "batch", "frames": [b"x"] * (codec.MAX_BATCH_FRAMES + 1)})
    with pytest.raises(ProtocolError) as caught:
        codec.decode(frame, sender=codec.AGENT)
    assert caught.value.code == "too_large"


@pytest.mark.parametrize("frames", [["not bin"], [[b"nested list"]], b"not a list", [None]])
def test_a_batch_of_anything_but_bins_is_malformed(frames):
    with pytest.raises(ProtocolError) as caught:
        codec.decode(msgpack.packb({"v": 1, "type": "batch", "frames": frames}, use_bin_type=True))
    assert caught.value.code == "malformed"


def test_only_the_agent_sends_batches():
    frame = codec.encode(codec.Batch(frames=frames_of(2)))
    with pytest.raises(ProtocolError, match="unexpected_type"):
        codec.decode(frame, sender=codec.ROUTER)


def group_status(**changes) -> codec.GroupStatus:
    values = dict(group="llama-405b", epoch=4, rank=1, state="waiting", fabric_address="fd00::11",
                  fabric_port=29500, engine_version="0.32.0", model_ready=True,
                  detail="waiting for the leader")
    values.update(changes)
    return codec.GroupStatus(**values)


def test_a_lease_carries_the_agents_part_in_a_group():
    lease = codec.Lease(seq=3, running=0, waiting=0, kv_cache_usage=0.0, engine_state="starting", models=[],
                        in_flight=[], max_concurrent=4, draining=False, group=group_status())
    decoded = codec.decode(codec.encode(lease), sender=codec.AGENT)
    assert decoded == lease and decoded.group.detail == "waiting for the leader"


def test_a_lease_without_a_group_stays_as_it_was():
    """An agent not in a group sends the lease of revision 1.2: no group field at all."""
    lease = codec.Lease(seq=1, running=0, waiting=0, kv_cache_usage=0.0, engine_state="ready", models=[],
                        in_flight=[], max_concurrent=4, draining=False)
    assert "group" not in msgpack.unpackb(codec.encode(lease))


def test_an_older_router_reads_a_lease_with_a_group():
    """Unknown fields are ignored: what a revision 1.2 decoder does with lease.group (docs §4.3)."""
    raw = msgpack.unpackb(codec.encode(codec.Lease(
        seq=1, running=0, waiting=0, kv_cache_usage=0.0, engine_state="ready", models=[], in_flight=[],
        max_concurrent=4, draining=False, group=group_status())))
    assert isinstance(raw["group"], dict) and raw["group"]["rank"] == 1


def test_the_group_status_is_checked_like_any_record():
    raw = msgpack.unpackb(codec.encode(codec.Lease(
        seq=1, running=0, waiting=0, kv_cache_usage=0.0, engine_state="ready", models=[], in_flight=[],
        max_concurrent=4, draining=False, group=group_status())))
    raw["group"]["epoch"] = "4"
    with pytest.raises(ProtocolError, match=r"lease.group.epoch: expected int"):
        codec.decode(msgpack.packb(raw))
    raw["group"]["epoch"], raw["group"]["detail"] = 4, "x" * 1025
    with pytest.raises(ProtocolError, match="too_large"):
        codec.decode(msgpack.packb(raw))


def test_only_the_router_assigns_groups():
    frame = codec.encode(next(m for m in sample_messages() if isinstance(m, codec.Group)))
    assert isinstance(codec.decode(frame, sender=codec.ROUTER), codec.Group)
    with pytest.raises(ProtocolError, match="unexpected_type"):
        codec.decode(frame, sender=codec.AGENT)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=64), st.integers(0, 2**63 - 1), st.sampled_from(["run", "wait", "leave"]),
       st.integers(1, 64), st.integers(1, 16), st.integers(0, 255), st.integers(2, 256),
       st.one_of(st.none(), st.ip_addresses().map(str)), st.one_of(st.none(), st.integers(1, 65535)),
       st.one_of(st.none(), st.text(max_size=1024)))
def test_group_round_trip(name, epoch, action, tp, pp, rank, size, address, port, reason):
    msg = codec.Group(group=name, epoch=epoch, action=action, model="m", tensor_parallel_size=tp,
                      pipeline_parallel_size=pp, rank=rank, size=size, leader_address=address, leader_port=port,
                      reason=reason)
    assert codec.decode(codec.encode(msg), sender=codec.ROUTER) == msg
