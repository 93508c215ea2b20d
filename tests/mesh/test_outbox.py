"""transport.Outbox: frames go out at once on an idle link, in bursts on a busy one,
in order, and never into a later session. Real ZeroMQ sockets over inproc."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import zmq

from xim_proto import codec
from xim_proto.transport import Outbox, flush_delay
from ximd.mesh.link import is_mid_stream


@pytest.mark.parametrize("last, now, delay", [(-float("inf"), 5.0, 0.0), (1.0, 1.5, 0.0),
                                              (1.0, 1.0005, 0.0015), (1.0, 1.002, 0.0)])
def test_flush_delay_is_zero_on_an_idle_link_and_the_rest_of_the_interval_otherwise(last, now, delay):
    assert flush_delay(last, now, 0.002) == pytest.approx(delay)


@contextlib.contextmanager
def socket_pair(sndhwm: int = 1000):
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    tx.setsockopt(zmq.SNDHWM, sndhwm)
    rx.setsockopt(zmq.RCVHWM, sndhwm)
    rx.bind("inproc://outbox")
    tx.connect("inproc://outbox")
    try:
        yield rx, tx
    finally:
        rx.close(linger=0)
        tx.close(linger=0)
        ctx.term()


def received(rx: zmq.Socket) -> list[bytes]:
    out = []
    while rx.poll(0):
        out.append(rx.recv())
    return out


def test_first_frame_goes_at_once_the_next_ones_together_and_in_order():
    async def scenario():
        with socket_pair() as (rx, tx):
            sends = []
            box = Outbox(asyncio.get_running_loop(), tx, lambda: sends.append(1), interval_s=0.05)
            box.put(b"1")
            assert received(rx) == [b"1"] and len(sends) == 1     # idle link: no wait
            box.put(b"2")
            box.put(b"3")
            assert received(rx) == []                             # gathered ...
            await asyncio.sleep(0.1)
            assert received(rx) == [b"2", b"3"] and len(sends) == 2   # ... and sent as one burst
    asyncio.run(scenario())


def test_an_urgent_frame_goes_at_once_with_what_gathered_before_it():
    async def scenario():
        with socket_pair() as (rx, tx):
            box = Outbox(asyncio.get_running_loop(), tx, lambda: None, interval_s=10)
            box.put(b"1")
            box.put(b"2")
            assert received(rx) == [b"1"]
            box.put(b"first token", urgent=True)
            assert received(rx) == [b"2", b"first token"]
    asyncio.run(scenario())


def test_only_chunks_after_the_first_may_wait():
    assert not is_mid_stream(codec.Chunk(id="r", seq=0, data=[b"{}"]))
    assert is_mid_stream(codec.Chunk(id="r", seq=1, data=[b"{}"]))
    assert not is_mid_stream(codec.Done(id="r"))
    assert not is_mid_stream(codec.Bye(reason="x"))


def test_a_peer_that_stops_reading_keeps_the_rest_queued_until_there_is_room():
    async def scenario():
        with socket_pair(sndhwm=2) as (rx, tx):
            box = Outbox(asyncio.get_running_loop(), tx, lambda: None, interval_s=0.01, limit=100)
            for i in range(20):
                box.put(b"%d" % i)
            await asyncio.sleep(0.05)
            got = received(rx)
            assert len(got) < 20                                  # the pipe filled up
            for _ in range(100):
                await asyncio.sleep(0.01)
                got += received(rx)
                if len(got) == 20:
                    break
            assert got == [b"%d" % i for i in range(20)]          # nothing lost, order kept
    asyncio.run(scenario())


def test_full_and_close_drop_what_a_dead_session_had_queued():
    async def scenario():
        with socket_pair() as (rx, tx):
            box = Outbox(asyncio.get_running_loop(), tx, lambda: None, interval_s=0.05, limit=3)
            box.put(b"sent at once")
            box.put(b"a")
            box.put(b"b")
            box.put(b"c")
            assert box.full()
            box.close()
            await asyncio.sleep(0.1)
            assert received(rx) == [b"sent at once"] and not box.full()
    asyncio.run(scenario())



# ---------------------------------------------------------------- batches (revision 1.3)


def chunk(i: int) -> bytes:
    return codec.encode(codec.Chunk(id="r", seq=i + 1, data=[b"%d" % i]))


def unbatched(messages: list[bytes]) -> list[bytes]:
    """The frames the messages carry, in order."""
    out = []
    for message in messages:
        msg = codec.decode(message, sender=codec.AGENT)
        out += msg.frames if isinstance(msg, codec.Batch) else [message]
    return out


def test_with_batches_a_burst_is_one_message_and_an_idle_frame_goes_alone():
    async def scenario():
        with socket_pair() as (rx, tx):
            box = Outbox(asyncio.get_running_loop(), tx, lambda: None, interval_s=0.05, pack=codec.batched)
            box.put(chunk(0))
            assert received(rx) == [chunk(0)]                     # alone: as it is, no envelope
            for i in range(1, 6):
                box.put(chunk(i))
            await asyncio.sleep(0.1)
            [message] = received(rx)
            assert codec.decode(message) == codec.Batch(frames=[chunk(i) for i in range(1, 6)])
    asyncio.run(scenario())


def test_with_batches_an_urgent_frame_goes_at_once_after_what_gathered_before_it():
    async def scenario():
        with socket_pair() as (rx, tx):
            box = Outbox(asyncio.get_running_loop(), tx, lambda: None, interval_s=10, pack=codec.batched)
            box.put(chunk(0))
            box.put(chunk(1))
            box.put(chunk(2))
            done = codec.encode(codec.Done(id="r"))
            box.put(done, urgent=True)
            [message] = received(rx)[1:]
            assert codec.decode(message) == codec.Batch(frames=[chunk(1), chunk(2), done])
    asyncio.run(scenario())


def test_with_batches_a_peer_that_stops_reading_loses_nothing_and_order_is_kept():
    async def scenario():
        with socket_pair(sndhwm=2) as (rx, tx):
            box = Outbox(asyncio.get_running_loop(), tx, lambda: None, interval_s=0.01, limit=10_000,
                         pack=codec.batched)
            count = 8 * codec.MAX_BATCH_FRAMES + 7          # more batches than the pipe takes
            box.put(chunk(0))
            for i in range(1, count):
                box.put(chunk(i))
            got: list[bytes] = []
            for _ in range(300):
                await asyncio.sleep(0.01)
                got += received(rx)
                if len(unbatched(got)) == count:
                    break
            assert unbatched(got) == [chunk(i) for i in range(count)]
            assert len(got) < count                         # they did travel in batches
    asyncio.run(scenario())
