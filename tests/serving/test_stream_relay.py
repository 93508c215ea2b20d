"""A streamed answer's pure parts: `EventStream` (SSE → payloads and what done carries) and
`StreamRelay` (payloads → frames sent now or kept, in order), with no socket and no loop."""

from __future__ import annotations

import json

import pytest

from xim_proto import codec
from ximd.serve import (
    MAX_CHUNK_DATA_BYTES,
    MAX_EVENT_BYTES,
    Bridge,
    EngineError,
    EventStream,
    StreamRelay,
    _Request,
)

USAGE = b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'


def token(text: str, finish: str | None = None) -> bytes:
    return json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]},
                      separators=(",", ":")).encode()


def sse(*payloads: bytes) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


# ---------------------------------------------------------------- EventStream


def test_events_split_across_reads_come_out_whole_and_once():
    stream = sse(token("a"), token("b"), token("c"))
    for cut in range(1, len(stream)):
        events = EventStream()
        frames = events.frames(stream[:cut]) + events.frames(stream[cut:])
        assert [p for frame in frames for p in frame] == [token("a"), token("b"), token("c")], cut


def test_the_usage_only_chunk_and_done_stay_out_of_the_frames_and_fill_what_done_carries():
    events = EventStream()
    frames = events.frames(sse(token("a"), token("b", "stop"), USAGE, b"[DONE]"))
    assert frames == [[token("a"), token("b", "stop")]]
    assert events.finish == "stop"
    assert events.usage == codec.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    assert events.usage_payload == USAGE
    assert events.ended_with_done()


def test_a_stream_without_done_did_not_end_well_and_a_last_done_may_lack_its_blank_line():
    events = EventStream()
    events.frames(sse(token("a")))
    assert not events.ended_with_done()
    events.frames(b"data: [DONE]\n")
    assert events.ended_with_done()


def test_comments_make_no_frame():
    assert EventStream().frames(b": keep-alive\n\n") == []


def test_a_read_over_the_frame_data_limit_is_split_into_frames():
    big = b'{"x":"' + b"y" * (MAX_CHUNK_DATA_BYTES // 3) + b'"}'
    frames = EventStream().frames(sse(big, big, big, big))
    assert [len(frame) for frame in frames] == [2, 2]


def test_an_event_that_never_ends_is_an_error_at_the_limit():
    events = EventStream()
    events.frames(b"data: " + b"x" * (MAX_EVENT_BYTES - 10))
    with pytest.raises(EngineError, match="an SSE event over"):
        events.frames(b"x" * 20)


# ---------------------------------------------------------------- StreamRelay


class Response:
    """What the relay uses of enginehttp.Response."""

    def __init__(self) -> None:
        self.paused = False

    def pause(self) -> None:
        self.paused = True


def request(credit: int) -> _Request:
    return _Request(infer=codec.Infer(id="r", model="m", endpoint="chat.completions", body=b"{}",
                                      stream=True, deadline_s=0, credit=credit),
                    received=0.0, credit=credit)


class Offer:
    """Sends unless told to refuse (``refusals``: how many offers in a row, as a full outbox
    would); spends the request's credit like Bridge._try_chunk."""

    def __init__(self, req: _Request, refusals: int = 0):
        self.req, self.refusals, self.sent = req, refusals, []

    def __call__(self, payloads: list[bytes]) -> bool:
        if self.req.credit <= 0:
            return False
        if self.refusals:
            self.refusals -= 1
            return False
        self.sent.append(payloads)
        self.req.spend()
        return True


def test_with_credit_and_room_each_read_is_sent_and_nothing_pauses():
    req, response = request(credit=10), Response()
    offer = Offer(req)
    relay = StreamRelay(req, response, offer)
    relay.feed(sse(token("a"), token("b")))
    relay.feed(sse(token("c")))
    assert offer.sent == [[token("a"), token("b")], [token("c")]]
    assert not relay.kept and not response.paused


def test_the_frame_that_spends_the_last_credit_goes_and_then_the_relay_pauses():
    req, response = request(credit=1), Response()
    offer = Offer(req)
    relay = StreamRelay(req, response, offer)
    relay.feed(sse(token("a")))
    assert offer.sent == [[token("a")]] and not relay.kept
    assert response.paused, "out of credit: what the engine writes next must wait in its socket"


def test_a_refused_frame_is_kept_with_every_frame_after_it_in_order():
    big = b'{"x":"' + b"y" * (MAX_CHUNK_DATA_BYTES // 2) + b'"}'
    req, response = request(credit=10), Response()
    offer = Offer(req, refusals=1)                 # the link would take the second frame
    relay = StreamRelay(req, response, offer)
    relay.feed(sse(big, big, big))                 # three frames from one read
    assert offer.sent == [] and list(relay.kept) == [[big], [big], [big]]
    assert response.paused


def test_reads_without_a_complete_event_neither_send_nor_pause():
    req, response = request(credit=5), Response()
    offer = Offer(req)
    relay = StreamRelay(req, response, offer)
    relay.feed(b"data: {\"choi")
    assert offer.sent == [] and not response.paused


def test_the_bridge_offers_nothing_for_a_request_being_cancelled():
    sent: list[codec.Message] = []

    def try_send(msg: codec.Message) -> bool:
        sent.append(msg)
        return True

    async def send(msg: codec.Message) -> None:
        raise AssertionError("not used")

    bridge = Bridge("/nonexistent.sock", max_concurrent=1, send=send, try_send=try_send)
    req = request(credit=5)
    assert bridge._try_chunk(req, [b"a"]) is True
    req.cancel_reason = "router"
    assert bridge._try_chunk(req, [b"b"]) is False
    assert [(m.seq, m.data) for m in sent] == [(0, [b"a"])] and req.credit == 4
