"""The channel between the router's core and one of its HTTP workers (`--workers N`).

One connected unix stream socket per worker, made by the core with socketpair(2)
and handed to the worker process as an inherited file descriptor: it has no
name in the file system, so no other process, of this user or another, can
reach it, and either side sees the other's end as end-of-file at once (a
worker that dies fails its requests; a core that dies stops its workers).

What travels is a stream of MessagePack arrays, ``[kind, …]`` (xim_router.workers
lists the kinds). Messages sent in one turn of the event loop leave in one
write: a burst of chunk frames the core read from the mesh in one go reaches
the worker as one `send` and one wake-up; the middle of a stream may wait up to
2 ms for more (`send_later`), as frames on the mesh do. The chunk payloads are
the node's own bytes, copied, never parsed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import cast

import msgpack

log = logging.getLogger("xim_router.ipc")

# A request body is at most 1 MiB (xim_router.http.MAX_BODY_BYTES); a chunk frame at most
# codec's frame limit. Anything bigger on this channel is a bug on the other side.
MAX_MESSAGE_BYTES = 16 << 20
# How long the middle of a stream may wait for more (the mesh's transport.Outbox waits 2 ms).
LATER_S = 0.002


class Channel(asyncio.Protocol):
    """Send and receive ``[kind, …]`` messages; ``on_message(msg)`` for each one that
    arrives, ``on_lost()`` once when the other side is gone (or sent garbage)."""

    def __init__(self, on_message: Callable[[list], None], on_lost: Callable[[], None]):
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES)
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)
        self._out: list[bytes] = []
        self._soon = False                                  # a flush is due this turn
        self._later: asyncio.TimerHandle | None = None      # or after LATER_S
        self._lost = False

    @classmethod
    async def connect(cls, sock: socket.socket, on_message: Callable[[list], None],
                      on_lost: Callable[[], None]) -> Channel:
        """A channel on a connected unix stream socket (one end of a socketpair)."""
        loop = asyncio.get_running_loop()
        _, channel = await loop.connect_accepted_socket(lambda: cls(on_message, on_lost), sock)
        return channel

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, but not necessarily asyncio's class: uvloop's is its own.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)          # BufferFull past MAX_MESSAGE_BYTES unread
            for msg in self._unpacker:
                if not isinstance(msg, list) or not msg:
                    raise ValueError(f"not a message: {type(msg).__name__}")
                self.on_message(msg)
        except Exception:
            log.exception("the other end of a worker channel sent what cannot be read; closing it")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self.on_lost()

    # ---------------------------------------------------------------- sending

    @property
    def closed(self) -> bool:
        return self._lost or self.transport is None or self.transport.is_closing()

    def send(self, *msg: object) -> None:
        """Queue one message; what is queued in this turn of the loop leaves in one write."""
        if self.closed:
            return
        self._out.append(self._packer.pack(msg))
        if not self._soon:
            self._soon = True
            asyncio.get_running_loop().call_soon(self.flush)

    def send_later(self, *msg: object) -> None:
        """Queue one message that may wait up to LATER_S for others (the middle of a stream:
        transport.Outbox's rule on the mesh), so that a busy channel writes, and its reader
        wakes, once for many."""
        if self.closed:
            return
        self._out.append(self._packer.pack(msg))
        if self._later is None and not self._soon:
            self._later = asyncio.get_running_loop().call_later(LATER_S, self.flush)

    def flush(self) -> None:
        self._soon = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        out, self._out = self._out, []
        if out and not self.closed:
            assert self.transport is not None
            self.transport.write(b"".join(out))

    def close(self) -> None:
        """Write what is queued, then close (the other side sees end-of-file)."""
        self.flush()
        if self.transport is not None:
            self.transport.close()
