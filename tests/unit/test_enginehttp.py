"""ximd.enginehttp's pure parts: the request template, the head parser, the body decoders.

No sockets: every split of the bytes a server could send is fed to the
parsers directly (hypothesis picks the split points).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ximd.enginehttp import (
    MAX_CHUNK_LINE_BYTES,
    MAX_HEAD_BYTES,
    ChunkedDecoder,
    LengthDecoder,
    ProtocolError,
    UntilCloseDecoder,
    body_decoder,
    parse_head,
    request_bytes,
)

# What uvicorn (httptools) writes for vLLM's streamed answer, and for its 500 on a crash.
UVICORN_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ndate: Mon, 30 Nov 2026 10:00:00 GMT\r\nserver: uvicorn\r\n"
                    b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")
UVICORN_500_HEAD = (b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: 21\r\nconnection: close\r\n\r\n")


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] or [b""]


def chunked(payloads: list[bytes], extensions: list[bytes] | None = None, trailers: bytes = b"") -> bytes:
    out = []
    for i, payload in enumerate(payloads):
        ext = extensions[i % len(extensions)] if extensions else b""
        out.append(b"%x%s\r\n%s\r\n" % (len(payload), ext, payload))
    return b"".join(out) + b"0\r\n" + trailers + b"\r\n"


def decode_all(decoder, pieces: list[bytes]) -> bytes:
    return b"".join(decoder.feed(piece) for piece in pieces)


# ---------------------------------------------------------------- the request


def test_the_post_template_has_exactly_the_headers_the_engine_needs():
    assert request_bytes("POST", "/v1/chat/completions", b'{"a":1}', request_id="xim-42") == (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: engine\r\nContent-Type: application/json\r\n"
        b"Content-Length: 7\r\nX-Request-Id: xim-42\r\n\r\n{\"a\":1}")
    assert request_bytes("GET", "/v1/models") == b"GET /v1/models HTTP/1.1\r\nHost: engine\r\n\r\n"


@pytest.mark.parametrize("bad", ["a\r\nX-Evil: 1", "a\nb", "naïve", "tab\there"])
def test_a_request_id_that_could_break_the_header_is_refused(bad):
    with pytest.raises(ValueError, match="cannot travel"):
        request_bytes("POST", "/v1/completions", b"{}", request_id=bad)


# ---------------------------------------------------------------- the head


def test_uvicorns_streamed_head_is_read():
    head, used = parse_head(UVICORN_SSE_HEAD + b"5\r\nhello")
    assert used == len(UVICORN_SSE_HEAD)
    assert (head.status, head.reason, head.chunked, head.content_length, head.keep_alive) == (
        200, "OK", True, None, True)
    assert head.content_type == "text/event-stream"
    assert head.header(b"server") == b"uvicorn"


def test_connection_close_and_http_1_0_are_not_kept_alive():
    head, _ = parse_head(UVICORN_500_HEAD)
    assert (head.status, head.content_length, head.keep_alive) == (500, 21, False)
    head, _ = parse_head(b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\ncontent-length: 0\r\n\r\n")
    assert not head.keep_alive
    head, _ = parse_head(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert not head.keep_alive


def test_framing_rules():
    no_framing, _ = parse_head(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n")
    assert (no_framing.content_length, no_framing.chunked, no_framing.keep_alive) == (None, False, False)
    assert isinstance(body_decoder(no_framing), UntilCloseDecoder)
    both, _ = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert both.chunked and not both.keep_alive          # chunked wins; never reuse such a connection
    assert isinstance(body_decoder(both), ChunkedDecoder)
    empty, _ = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert empty.content_length == 0 and body_decoder(empty).done
    repeated, _ = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n")
    assert repeated.content_length == 3
    assert no_framing.content_type == "application/json"
    untyped, _ = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert untyped.content_type == "application/octet-stream"


def test_an_interim_answer_is_a_head_of_its_own():
    head, used = parse_head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert (head.status, used) == (100, 25)


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(UVICORN_SSE_HEAD)), max_size=4))
def test_a_head_split_anywhere_is_incomplete_until_its_last_byte(cuts):
    received = b""
    for piece in splits(UVICORN_SSE_HEAD, cuts):
        received += piece
        parsed = parse_head(received)
        assert (parsed is not None) == (received == UVICORN_SSE_HEAD)


@pytest.mark.parametrize("data, match", [
    (b"garbage", "did not answer with HTTP"),
    (b"\x00\x01\x02", "did not answer with HTTP"),
    (b"HTTP/2 200\r\n\r\n", "status line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 abc OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 099 Odd\r\n\r\n", "not an HTTP status"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\na: b\r\n  folded\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", "transfer-coding"),
])
def test_bad_heads_are_a_clean_protocol_error(data, match):
    with pytest.raises(ProtocolError, match=match):
        parse_head(data)


def test_an_endless_head_is_refused_at_the_limit():
    endless = b"HTTP/1.1 200 OK\r\n" + b"x-filler: " + b"a" * MAX_HEAD_BYTES
    assert parse_head(endless[:MAX_HEAD_BYTES]) is None
    with pytest.raises(ProtocolError, match="over"):
        parse_head(endless)


# ---------------------------------------------------------------- chunked bodies


payload_lists = st.lists(st.binary(min_size=1, max_size=300), max_size=12)


@settings(max_examples=300)
@given(payloads=payload_lists, cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=30),
       extensions=st.sampled_from([None, [b";name=value"], [b"; a=1;b", b" ;x=\"q\""]]),
       trailers=st.sampled_from([b"", b"x-trailer: 1\r\n", b"a: 1\r\nb: 2\r\n"]))
def test_chunked_bodies_decode_whatever_the_split(payloads, cuts, extensions, trailers):
    wire = chunked(payloads, extensions, trailers)
    decoder = ChunkedDecoder()
    pieces = splits(wire, cuts)
    out = b""
    for i, piece in enumerate(pieces):
        out += decoder.feed(piece)
        assert decoder.done == (i == len(pieces) - 1), "done before (or not at) the last byte"
    assert out == b"".join(payloads)
    assert decoder.extra == b""


def test_several_chunks_in_one_read_come_out_as_one_piece_and_data_is_not_held_back():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"5\r\nhello\r\n6\r\n world\r\n3\r\nabc") == b"hello worldabc"
    assert decoder.feed(b"\r") == b""
    assert decoder.feed(b"\n2") == b"" and not decoder.done   # half a size line is held, not data


def test_a_chunk_split_mid_data_is_handed_on_as_it_arrives():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"a\r\n01234") == b"01234"
    assert decoder.feed(b"56789\r\n0\r\n") == b"56789"
    assert not decoder.done
    assert decoder.feed(b"\r\n") == b"" and decoder.done


def test_bytes_after_the_last_chunk_are_extra():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n") == b"ok"
    assert decoder.done and decoder.extra == b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize("wire, match", [
    (b"zz\r\n", "chunk size"),
    (b"+5\r\nhello\r\n", "chunk size"),
    (b"0x5\r\nhello\r\n", "chunk size"),
    (b" 5\r\nhello\r\n", "chunk size"),
    (b"5_0\r\n", "chunk size"),
    (b"\r\n", "chunk size"),
    (b"11111111111111111\r\n", "chunk size"),              # 17 hex digits
    (b"5\r\nhelloXX", "CRLF"),
    (b"5\r\nhello\n0\r\n\r\n", "CRLF"),
])
def test_bad_chunked_input_is_a_clean_protocol_error(wire, match):
    decoder = ChunkedDecoder()
    with pytest.raises(ProtocolError, match=match):
        decoder.feed(wire)


def test_what_came_before_a_fault_in_the_same_read_is_kept_with_the_error():
    with pytest.raises(ProtocolError) as caught:
        ChunkedDecoder().feed(b"2\r\nok\r\n3\r\nyes\r\nzz\r\n")
    assert caught.value.body == b"okyes"


def test_a_huge_chunk_size_line_is_an_error_not_memory_growth():
    decoder = ChunkedDecoder()
    fed = 0
    with pytest.raises(ProtocolError, match="chunk-size line"):
        while True:
            decoder.feed(b"1;" + b"e" * 1022 if fed == 0 else b"e" * 1024)
            fed += 1024
            assert len(decoder._partial) <= MAX_CHUNK_LINE_BYTES
    assert fed <= MAX_CHUNK_LINE_BYTES + 1024


def test_endless_trailers_are_an_error():
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n")
    with pytest.raises(ProtocolError, match="trailers"):
        for _ in range(MAX_HEAD_BYTES // 16 + 2):
            decoder.feed(b"x-t: 0123456789\r\n")


# ---------------------------------------------------------------- other framings


@given(body=st.binary(max_size=500), cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8))
def test_a_content_length_body_decodes_whatever_the_split(body, cuts):
    decoder = LengthDecoder(len(body))
    assert decode_all(decoder, splits(body + b"EXTRA", cuts)) == body
    assert decoder.done


def test_bytes_beyond_the_content_length_are_extra():
    decoder = LengthDecoder(3)
    assert decoder.feed(b"abcdef") == b"abc"
    assert decoder.done and decoder.extra == b"def"
    assert LengthDecoder(0).done


def test_a_body_without_framing_runs_to_the_close():
    decoder = UntilCloseDecoder()
    assert decode_all(decoder, [b"a", b"bc"]) == b"abc"
    assert decoder.ends_at_close and not decoder.done
