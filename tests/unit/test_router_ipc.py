"""The channel between the router's core and an HTTP worker (xim_router.ipc), on a real socketpair."""

from __future__ import annotations

import asyncio
import logging
import socket

import msgpack

from xim_router import ipc


async def pair() -> tuple[ipc.Channel, socket.socket, list, asyncio.Event]:
    """A channel on one end of a socketpair, the other end raw; what arrived and whether it was lost."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got: list = []
    lost = asyncio.Event()
    channel = await ipc.Channel.connect(ours, got.append, lost.set)
    theirs.setblocking(False)
    return channel, theirs, got, lost


def test_messages_sent_in_one_turn_arrive_in_order():
    async def go():
        channel, theirs, got, lost = await pair()
        other = await ipc.Channel.connect(theirs, lambda msg: None, lambda: None)
        other.send("open", 1, "m", "chat.completions", b"{}", True)
        other.send_later("wrote", 1, 3)
        await asyncio.sleep(0.05)
        other.close()
        await asyncio.wait_for(lost.wait(), 5)
        channel.close()
        return got
    assert asyncio.run(go()) == [["open", 1, "m", "chat.completions", b"{}", True], ["wrote", 1, 3]]


def test_a_message_over_the_limit_closes_the_channel_saying_why(caplog):
    """Not asyncio's 'Fatal error: protocol.data_received() call failed' with msgpack's traceback:
    the channel's own line, and the other side is lost."""
    faults: list[dict] = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: faults.append(context))
        channel, theirs, got, lost = await pair()
        # ["c", 1, <a bin32 of twice the limit>]: the header of a message that never fits.
        header = msgpack.packb(["c", 1]).replace(b"\x92", b"\x93", 1) + b"\xc6" + \
            (ipc.MAX_MESSAGE_BYTES * 2).to_bytes(4, "big")
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(theirs, header)
        piece = b"\0" * (1 << 20)
        try:
            for _ in range(ipc.MAX_MESSAGE_BYTES // len(piece) + 2):
                await asyncio.wait_for(loop.sock_sendall(theirs, piece), 5)
        except (ConnectionError, TimeoutError):
            pass
        await asyncio.wait_for(lost.wait(), 5)
        theirs.close()
        return got

    with caplog.at_level(logging.ERROR, logger="xim_router.ipc"):
        assert asyncio.run(go()) == []
    assert not faults, faults
    assert any("cannot be read" in r.getMessage() for r in caplog.records)


def test_a_call_of_a_dead_worker_never_drops_the_restarted_workers_call_of_the_same_id():
    """A restarted worker numbers its calls afresh: when the dead worker's call ends late
    (its start failed, its client went, its answer ended) it must not remove the new call
    that now holds the same local id."""
    from types import SimpleNamespace

    from xim_router.workers import CoreCall

    link = SimpleNamespace(calls={})
    old = CoreCall(link, 1)                                    # type: ignore[arg-type]
    new = link.calls[1] = CoreCall(link, 1)                    # type: ignore[arg-type]
    old.cancel("router worker gone")
    assert link.calls == {1: new}
    new.cancel("client gone")
    assert link.calls == {}
