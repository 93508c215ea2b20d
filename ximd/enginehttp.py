"""A lean HTTP/1.1 client for the engine's OpenAI API over its unix socket.

The bridge sends the engine one kind of request — a POST of a JSON body, and a
few GETs when it probes the engine — and reads one kind of answer: a status
line, headers, and a body framed by Content-Length, chunked, or the end of the
connection (what uvicorn, which vLLM runs on, sends). A general client
(aiohttp's) costs about 0.25 ms of CPU to build each request and half as much
again as a bare `asyncio.Protocol` to read each chunk (docs/performance.md);
this one writes a fixed template and decodes chunks in one small loop.

- **Pure parsing** (`request_bytes`, `parse_head`, `body_decoder`, the
  decoders): bytes in, values or `ProtocolError` out, no I/O, so every split of
  the input can be tested without a socket. Every buffer they keep is bounded
  (a head, a chunk-size line, the trailers), whatever the engine sends.
- **I/O** (`EngineClient`, `Response`): keep-alive connections on an
  `asyncio.Protocol`, a pool without a limit (admission is the bridge's job).
  `Response.read_some()` hands over every body byte that arrived since the
  last call, which is what lets the bridge coalesce. Body bytes nobody reads
  pause the transport above `HIGH_WATER_BYTES`, so a reader that stops (out of
  credit) makes the engine's socket fill. `Response.push(sink)` is the other
  way to read a body: each read's bytes go to ``sink`` inside the read
  callback, with no task woken and no future made per read (a streamed
  answer's per-token path, docs/performance.md); ``pause()``/``resume()`` are
  its back-pressure and ``pushed()`` the task's wait. `Response.close()` drops the
  connection (mid-answer, that is how the engine learns to abort);
  `release()` returns a fully read one to the pool, unless the engine said
  ``Connection: close`` or anything about the answer was off.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

MAX_HEAD_BYTES = 64 * 1024           # status line + headers (and, apart, the trailers)
MAX_CHUNK_LINE_BYTES = 4096          # a chunk-size line with its extensions
HIGH_WATER_BYTES = 64 * 1024         # unread body bytes above which reading pauses
# uvicorn closes a connection idle for 5 s (vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE); one idle
# for less is reused, an older one is closed here first rather than raced.
MAX_IDLE_S = 3.0

_HEX_DIGITS = b"0123456789abcdefABCDEF"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NO_BODY_STATUSES = (204, 304)

# Takes the body bytes of one read, in the connection's read callback (Response.push).
Sink = Callable[[bytes], None]


class EngineHTTPError(Exception):
    """The exchange with the engine failed."""


class Unreachable(EngineHTTPError):
    """No connection to the engine's socket (missing, refused, or the connect timed out)."""


class Broken(EngineHTTPError):
    """The connection ended before the answer was complete."""


class ProtocolError(EngineHTTPError):
    """The engine's answer is not HTTP/1.1 that this client reads.

    ``body``: what a decoder got out of the same feed before the fault (the
    caller hands it on like any body bytes, then fails).
    """

    body = b""


# ---------------------------------------------------------------- pure parsing


def request_bytes(method: str, path: str, body: bytes | None = None, request_id: str | None = None) -> bytes:
    """The whole request: the fixed template and the body.

    A POST carries ``Content-Type: application/json``; ``request_id`` goes in
    ``X-Request-Id`` (ValueError if it could not travel in a header).
    """
    head = b"%s %s HTTP/1.1\r\nHost: engine\r\n" % (method.encode("ascii"), path.encode("ascii"))
    if body is not None:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    if request_id is not None:
        if not request_id.isascii() or not request_id.isprintable():
            raise ValueError(f"request id {request_id!r} cannot travel in an HTTP header")
        head += b"X-Request-Id: %s\r\n" % request_id.encode("ascii")
    return head + b"\r\n" + body if body is not None else head + b"\r\n"


@dataclass(frozen=True)
class Head:
    """A response's status line and headers (names lower-cased, in order)."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...]
    keep_alive: bool                 # HTTP/1.1 without Connection: close
    content_length: int | None       # None: chunked, or the body runs to the close
    chunked: bool
    content_type: str                # the media type, lower-cased, without parameters

    def header(self, name: bytes) -> bytes | None:
        """The last value of header ``name`` (lower-case), or None."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None


def parse_head(buf: bytes) -> tuple[Head, int] | None:
    """The response head at the start of ``buf`` and its length, or None if it is not all there.

    Raises ProtocolError for anything that is not a response head, and for a
    head over MAX_HEAD_BYTES (so an endless one costs bounded memory).
    """
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
    if end < 0:
        if len(buf) >= MAX_HEAD_BYTES + 4:
            raise ProtocolError(f"the response head is over {MAX_HEAD_BYTES} bytes")
        if not b"HTTP/".startswith(buf[:5]):
            raise ProtocolError(f"the engine did not answer with HTTP: {bytes(buf[:40])!r}")
        return None
    lines = buf[:end].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.1 status line: {bytes(lines[0][:80])!r}")
    status = int(code)
    if status < 100:
        raise ProtocolError(f"not an HTTP status: {status}")
    headers = []
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    close = version == b"HTTP/1.0"
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ProtocolError(f"not a header line: {bytes(line[:80])!r}")
        name = name.lower()
        value = value.strip(b" \t")
        headers.append((name, value))
        if name == b"content-length":
            lengths.update(v.strip(b" \t") for v in value.split(b","))
        elif name == b"transfer-encoding":
            codings += [c.strip(b" \t").lower() for c in value.split(b",")]
        elif name == b"connection":
            close = close or b"close" in (t.strip(b" \t").lower() for t in value.split(b","))
    content_length: int | None = None
    chunked = False
    if 100 <= status < 200 or status in _NO_BODY_STATUSES:
        content_length = 0
    elif codings:
        if codings != [b"chunked"]:
            raise ProtocolError(f"unsupported transfer-coding {b', '.join(codings).decode('latin-1')!r}")
        chunked = True
        close = close or bool(lengths)      # both framings: a sign of smuggling, never reuse
    elif lengths:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit() or len(next(iter(lengths))) > 18:
            raise ProtocolError(f"bad Content-Length {b', '.join(sorted(lengths)).decode('latin-1')!r}")
        content_length = int(next(iter(lengths)))
    else:
        close = True                        # the body ends when the connection does
    media = next((value for name, value in reversed(headers) if name == b"content-type"), b"")
    content_type = media.split(b";", 1)[0].strip(b" \t").lower().decode("latin-1")
    return Head(status=status, reason=reason.decode("latin-1"), headers=tuple(headers), keep_alive=not close,
                content_length=content_length, chunked=chunked,
                content_type=content_type or "application/octet-stream"), end + 4


class BodyDecoder:
    """Turns the bytes after the head into body bytes; `done` once the body is complete.

    ``extra``: bytes that came after the end of the body in the same feed
    (nothing, from a well-behaved server; the connection is then not reused).
    Not fed again once done.
    """

    done = False
    extra = b""
    ends_at_close = False            # the body is whatever comes until the connection closes

    def feed(self, data: bytes) -> bytes:
        raise NotImplementedError


class LengthDecoder(BodyDecoder):
    def __init__(self, length: int):
        self.left = length
        self.done = length == 0

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.extra = data
            return b""
        if len(data) < self.left:
            self.left -= len(data)
            return data
        body, self.extra = data[:self.left], data[self.left:]
        self.left = 0
        self.done = True
        return body


class UntilCloseDecoder(BodyDecoder):
    ends_at_close = True

    def feed(self, data: bytes) -> bytes:
        return data


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder(BodyDecoder):
    """Transfer-Encoding: chunked, fed any split of the bytes (RFC 9112 §7.1).

    Chunk extensions are ignored and trailers are read and dropped. What it
    holds between calls is at most one chunk-size or trailer line: the data
    of a chunk is handed on as it arrives.
    """

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0                # data bytes left in this chunk
        self._partial = b""           # an incomplete line (or chunk end) from the last feed
        self._trailer_bytes = 0

    def feed(self, data: bytes) -> bytes:
        if self._partial:
            data = self._partial + data
            self._partial = b""
        out: list[bytes] = []
        pos, end, state = 0, len(data), self._state
        try:
            while pos < end:
                if state == _SIZE:
                    eol = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE_BYTES + 2)
                    if eol < 0:
                        if end - pos > MAX_CHUNK_LINE_BYTES:
                            raise ProtocolError(f"a chunk-size line over {MAX_CHUNK_LINE_BYTES} bytes")
                        break                         # the rest of the line is still to come
                    digits = data[pos:eol]
                    if b";" in digits:                # extensions: ignored
                        digits = digits.split(b";", 1)[0].rstrip(b" \t")
                    if not 0 < len(digits) <= 16 or digits.translate(None, _HEX_DIGITS):
                        raise ProtocolError(f"not a chunk size: {bytes(data[pos:min(eol, pos + 40)])!r}")
                    start = eol + 2
                    size = int(digits, 16)
                    stop = start + size
                    if not size:
                        pos, state = start, _TRAILER
                    elif stop + 2 <= end:             # the usual case: the whole chunk is here
                        if not data.startswith(b"\r\n", stop):
                            raise ProtocolError("a chunk's data is not followed by CRLF")
                        out.append(data[start:stop])
                        pos = stop + 2
                    else:
                        pos, state, self._left = start, _DATA, size
                elif state == _DATA:
                    take = min(self._left, end - pos)
                    out.append(data if take == end else data[pos:pos + take])
                    pos += take
                    self._left -= take
                    if not self._left:
                        state = _DATA_END
                elif state == _DATA_END:
                    if end - pos < 2:
                        break
                    if not data.startswith(b"\r\n", pos):
                        raise ProtocolError("a chunk's data is not followed by CRLF")
                    pos += 2
                    state = _SIZE
                elif state == _TRAILER:
                    eol = data.find(b"\r\n", pos, pos + MAX_HEAD_BYTES + 2)
                    if eol < 0:
                        if end - pos > MAX_HEAD_BYTES:
                            raise ProtocolError(f"the trailers are over {MAX_HEAD_BYTES} bytes")
                        break
                    if eol == pos:                    # the empty line: the body is complete
                        pos += 2
                        state = _DONE
                        continue
                    self._trailer_bytes += eol + 2 - pos
                    if self._trailer_bytes > MAX_HEAD_BYTES:
                        raise ProtocolError(f"the trailers are over {MAX_HEAD_BYTES} bytes")
                    pos = eol + 2
                else:                                 # _DONE
                    self.extra = data[pos:]
                    pos = end
        except ProtocolError as exc:
            exc.body = b"".join(out)
            raise
        if pos < end:
            self._partial = data[pos:]
        self._state = state
        self.done = state == _DONE
        return out[0] if len(out) == 1 else b"".join(out)


def body_decoder(head: Head) -> BodyDecoder:
    """The decoder for the body that follows ``head`` (a response to a GET or POST)."""
    if head.chunked:
        return ChunkedDecoder()
    if head.content_length is not None:
        return LengthDecoder(head.content_length)
    return UntilCloseDecoder()


# ---------------------------------------------------------------- I/O


class _Connection(asyncio.Protocol):
    """One keep-alive connection to the engine; one exchange at a time."""

    def __init__(self, client: EngineClient):
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.exchanging = False
        self.received = False                  # any byte of this exchange's answer
        self.reusable = False
        self.head: Head | None = None
        self._head_buf = b""
        self._decoder: BodyDecoder | None = None
        self._body: list[bytes] = []
        self._buffered = 0
        self.finished = False                  # the body is complete
        self.error: EngineHTTPError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False                   # reading stopped: bytes unread, or the sink's pause()
        self._sink: Sink | None = None         # push mode (Response.push)
        self._sink_error: Exception | None = None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, but not necessarily asyncio's class: uvloop's is its own.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._decoder is not None and not self.finished:
            self._feed_body(data)
        elif self.exchanging and self.error is None and not self.finished:
            self._feed_head(data)
        else:                                  # after the answer, or unasked: not HTTP we can follow
            self.reusable = False
            self.close()

    def eof_received(self) -> None:
        self._ended(None)                      # returning None: the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        self.closed = True
        self.client._forget(self)

    # ------------------------------------------------------------ parsing what arrives

    def _feed_head(self, data: bytes) -> None:
        self.received = True
        buf = self._head_buf + data if self._head_buf else data
        try:
            while True:
                parsed = parse_head(buf)
                if parsed is None:
                    self._head_buf = buf
                    return
                head, used = parsed
                buf = buf[used:]
                if head.status >= 200:
                    break
                if head.status == 101:
                    raise ProtocolError("the engine switched protocols")
                # 100 Continue and other interim answers: the real one follows
        except ProtocolError as exc:
            self._fail(exc)
            return
        self._head_buf = b""
        self.head = head
        self.reusable = head.keep_alive
        self._decoder = body_decoder(head)
        self._feed_body(buf)
        self._wake()

    def _feed_body(self, data: bytes) -> None:
        decoder = self._decoder
        assert decoder is not None
        try:
            body = decoder.feed(data)
        except ProtocolError as exc:
            if exc.body:
                self._hand_on(exc.body)
            self._fail(exc)
            return
        if decoder.done:
            self.finished = True
            if decoder.extra:
                self.reusable = False
        if body:
            self._hand_on(body)
        # A pushed body wakes nobody until it ends: the sink had the bytes already.
        if (body and self._sink is None) or self.finished:
            self._wake()

    def _hand_on(self, body: bytes) -> None:
        """To the sink, or kept for read_some() (and, while a sink paused, for resume_push())."""
        if self._sink is not None and not self._paused:
            self._push(body)
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _push(self, body: bytes) -> None:
        assert self._sink is not None
        try:
            self._sink(body)
        except Exception as exc:
            # Raised in asyncio's read callback, it would end up in the loop's exception
            # handler and leave the task waiting: the task gets it instead, and the exchange
            # cannot go on without its reader.
            self._sink_error = exc
            self._sink = None
            self.close()
            self._wake()

    def _ended(self, exc: Exception | None) -> None:
        self.reusable = False
        if not self.exchanging or self.finished or self.error is not None:
            return
        if self._decoder is not None and self._decoder.ends_at_close and exc is None:
            self.finished = True
        else:
            where = "mid-answer" if self.received else "before answering"
            self.error = Broken(f"the engine closed the connection {where}" + (f" ({exc})" if exc else ""))
        self._wake()

    def _fail(self, exc: EngineHTTPError) -> None:
        self.error = exc
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # ------------------------------------------------------------ what the client and Response use

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self.exchanging = True
        self.transport.write(request)

    async def read_head(self) -> Head:
        while self.head is None:
            if self.error is not None:
                raise self.error
            await self._wait()
        return self.head

    async def read_some(self) -> bytes:
        while not self._body:
            if self.finished:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait()
        data = self._unread()
        self._resume_reading()
        return data

    def _unread(self) -> bytes:
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._buffered = 0
        return data

    def _resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    # ------------------------------------------------------------ push mode (Response.push)

    def push(self, sink: Sink) -> None:
        self._sink = sink
        data = self._unread() if self._body else b""
        self._resume_reading()                 # nothing is left unread: any pause was for that
        if data:
            self._push(data)

    def pause_push(self) -> None:
        if not self._paused:
            self._paused = True
            if self.transport is not None and not self.closed:
                self.transport.pause_reading()
            self._wake()

    def resume_push(self) -> None:
        if not self._paused or self._sink is None:
            return
        self._paused = False
        if self._body:                         # a read that came in after pause_reading()
            self._push(self._unread())
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    async def pushed(self) -> bool:
        while True:
            if self._sink_error is not None:
                raise self._sink_error
            if self._paused:
                return False
            if self.finished:
                return True
            if self.error is not None:
                raise self.error
            await self._wait()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()             # nothing of ours left to write matters


class Response:
    """The answer to one request: the head, read; the body, as it arrives."""

    def __init__(self, conn: _Connection, head: Head):
        self._conn = conn
        self.head = head
        self.status = head.status
        self.content_type = head.content_type
        self._done = False

    async def read_some(self) -> bytes:
        """Every body byte that arrived since the last call (waits for one); b"" at the end.

        Raises Broken or ProtocolError once what arrived before the failure has been read.
        """
        return await self._conn.read_some()

    def push(self, sink: Sink) -> None:
        """Hand the body to ``sink`` from now on: what arrived already at once, then each
        read's bytes in the connection's read callback, as they arrive (no buffering).

        ``sink`` runs outside any task, so it must not block; an exception it raises
        closes the connection and is raised by `pushed()`.
        """
        self._conn.push(sink)

    def pause(self) -> None:
        """Stop reading the engine (the sink gets nothing more) and wake `pushed()`'s caller."""
        self._conn.pause_push()

    def resume(self) -> None:
        """Read the engine again after `pause()`."""
        self._conn.resume_push()

    async def pushed(self) -> bool:
        """Wait until the pushed body ended (True) or the response is paused (False).

        Raises what the sink raised, or Broken/ProtocolError once the bytes that came
        before the failure went to the sink (and, paused, only after `resume()`).
        """
        return await self._conn.pushed()

    async def read(self, limit: int) -> bytes:
        """The body up to ``limit`` bytes (all of it if shorter); stops reading at the limit."""
        parts: list[bytes] = []
        size = 0
        while size < limit:
            data = await self._conn.read_some()
            if not data:
                break
            parts.append(data)
            size += len(data)
        return b"".join(parts)[:limit]

    def release(self) -> None:
        """Done with the answer: a fully read connection goes back to the pool, any other is dropped."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.finished and conn.reusable and not conn._body and not conn._paused and not conn.closed:
            conn.exchanging = False
            self._conn.client._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection, whatever is left of the answer (the engine aborts the request)."""
        if not self._done:
            self._done = True
            self._conn.close()


class EngineClient:
    """HTTP/1.1 to the engine's unix socket, on pooled keep-alive connections (no limit)."""

    def __init__(self, socket_path: Path | str, *, connect_timeout_s: float = 5.0, max_idle_s: float = MAX_IDLE_S):
        self.socket_path = str(socket_path)
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_s = max_idle_s
        self._idle: list[_Connection] = []

    async def request(self, method: str, path: str, body: bytes | None = None, *,
                      request_id: str | None = None) -> Response:
        """Send one request and read the answer's head.

        Raises ValueError (a request id no header can carry), Unreachable, or
        Broken/ProtocolError (the engine answered nothing usable). A pooled
        connection the engine closed before answering is retried once on a
        fresh one: it was closed while idle, and the engine never saw the request.
        """
        request = request_bytes(method, path, body, request_id)
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, request)
            except Broken:
                if conn.received:
                    raise
        return await self._exchange(await self._connect(), request)

    async def _exchange(self, conn: _Connection, request: bytes) -> Response:
        conn.send(request)
        try:
            return Response(conn, await conn.read_head())
        except BaseException:
            conn.close()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_unix_connection(lambda: _Connection(self), self.socket_path)
        except TimeoutError:
            raise Unreachable(f"no connection within {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise Unreachable(exc.strerror or str(exc)) from None
        return conn

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()            # the most recently used: the likeliest alive
            if conn.closed:
                continue
            if now - conn.idle_since > self.max_idle_s:
                conn.close()
                continue
            return conn
        return None

    def _put(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        """Close the pooled connections (those still in use close with their Response)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
