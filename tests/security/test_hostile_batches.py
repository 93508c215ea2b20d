"""A hostile node's `batch` frames (protocol revision 1.3) get it nothing a single frame would not.

A real `xim-router serve` and enrolled raw CURVE nodes (tests/security/rawnode.py).
Each frame in a batch is handled as if it had come alone, in order: a malformed one
is dropped and answered like any malformed frame, every message spends the node's
allowances on its own, and what may not travel in a batch (a hello, another batch),
a batch outside a session, a batch from a node that did not offer batches, and a
batch over the count limit are refused the way a malformed frame is.
"""

from __future__ import annotations

import time

import msgpack
import pytest

from tests.security.rawnode import RawNode
from tests.support.router import RouterProcess
from xim_proto import codec

BATCHES = ("credit", "cancel", codec.BATCH)


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    with RouterProcess(tmp_path_factory.mktemp("hostile-batches"), lease_timeout="120s") as proc:
        yield proc


def batch(*items: codec.Message | bytes) -> bytes:
    return codec.encode(codec.Batch(frames=[i if isinstance(i, bytes) else codec.encode(i) for i in items]))


def summary(messages: list[codec.Message]) -> list[tuple]:
    """What the router answered, in order, in a comparable form."""
    out: list[tuple] = []
    for m in messages:
        if isinstance(m, codec.LeaseAck):
            out.append(("lease_ack", m.seq))
        elif isinstance(m, (codec.Error, codec.Reject)):
            out.append((m.TYPE, m.code))
        else:
            out.append((m.TYPE,))
    return out


@pytest.fixture
def node(router):
    """A node in a session that offered batches."""
    n = RawNode(router, hostname="batcher")
    welcome = n.hello(capabilities=BATCHES)
    assert codec.BATCH in welcome.capabilities
    n.drain_inbox(0.3)
    try:
        yield n
    finally:
        n.close()


def test_the_frames_of_a_batch_are_handled_in_order(node):
    node.send(batch(*(node.lease_msg() for _ in range(5))))
    assert summary(node.drain_inbox(1.0)) == [("lease_ack", seq) for seq in range(1, 6)]


def test_a_malformed_frame_in_a_batch_is_dropped_and_answered_the_others_are_handled(node, router):
    node.send(batch(node.lease_msg(), b"\xc1 not msgpack", node.lease_msg()))
    assert summary(node.drain_inbox(1.0)) == [("lease_ack", 1), ("error", "malformed"), ("lease_ack", 2)]
    assert f"dropped a malformed frame from agent {node.agent_id}: in a batch: malformed" in router.log()


@pytest.mark.parametrize("inner", ["batch", "hello"])
def test_a_batch_or_a_hello_inside_a_batch_is_refused(node, inner):
    first, hidden, last = node.lease_msg(), node.lease_msg(), node.lease_msg()
    nested = batch(hidden) if inner == "batch" else codec.encode(codec.Hello(
        token=node.token, versions=[1], agent_version="x", hostname="x", capabilities=list(BATCHES),
        hardware={}, models=[], max_concurrent=1))
    node.send(batch(first, nested, last))
    # The nested batch's lease is never read; the hello opens no new session (no welcome).
    assert summary(node.drain_inbox(1.0)) == [("lease_ack", 1), ("error", "unexpected_type"), ("lease_ack", 3)]


def test_a_batch_over_the_count_limit_is_refused_whole(node):
    node.send(codec.encode(codec.Batch(frames=[codec.encode(node.lease_msg())
                                               for _ in range(codec.MAX_BATCH_FRAMES)])))
    node.drain_inbox(1.0)
    over = [codec.encode(node.lease_msg()) for _ in range(codec.MAX_BATCH_FRAMES + 1)]
    node.send(msgpack.packb({"v": 1, "type": "batch", "frames": over}, use_bin_type=True))
    assert summary(node.drain_inbox(1.0)) == [("error", "too_large")]


def test_each_message_in_a_batch_spends_the_nodes_allowance(node, router):
    """100 leases in one message buy no more than 100 single leases: the burst, then drops."""
    node.send(batch(*(node.lease_msg() for _ in range(100))))
    got = summary(node.drain_inbox(1.0))
    acks = [a for a in got if a[0] == "lease_ack"]
    assert 20 <= len(acks) <= 35, got              # a burst of 30 (the hello took one), a few refilled
    assert ("error", "rate_limited") in got
    assert "is over its rate of 10 unsolicited frames/s" in router.log()


def test_each_stray_answer_in_a_batch_spends_the_nodes_allowance(node, router):
    """Answers about requests nobody has cost the router a cancel each, up to the node's budget
    (300 at once, then 100/s): 512 of them in two messages are not 2 answers' worth, nor 512."""
    chunks = [codec.Chunk(id=f"nobody-{i}", seq=1, data=[b"{}"]) for i in range(codec.MAX_BATCH_FRAMES)]
    before = router.mesh_event("rate_limited")
    started = time.monotonic()
    node.send(batch(*chunks))
    node.send(batch(*chunks))
    assert any(isinstance(m, codec.Cancel) for m in node.drain_inbox(1.0))
    refilled = 100 * (time.monotonic() - started)
    assert 2 * codec.MAX_BATCH_FRAMES - 300 - refilled <= router.mesh_event("rate_limited") - before \
        <= 2 * codec.MAX_BATCH_FRAMES - 300


def test_a_batch_ends_at_a_bye_the_rest_is_outside_the_session(node):
    node.send(batch(node.lease_msg(), codec.Bye(reason="done"), node.lease_msg()))
    got = summary(node.drain_inbox(1.0))
    assert got[:2] == [("lease_ack", 1), ("bye",)]
    assert ("lease_ack", 2) not in got and got[2:] in ([], [("reject", "no_session")])


def test_a_batch_outside_a_session_is_answered_no_session(router):
    stranger = RawNode(router, hostname="no-hello")
    try:
        stranger.send(batch(stranger.lease_msg()))
        assert summary(stranger.drain_inbox(1.0)) == [("reject", "no_session")]
    finally:
        stranger.close()


def test_a_batch_from_a_node_that_did_not_offer_batches_is_refused(router):
    old = RawNode(router, hostname="old-node")
    try:
        welcome = old.hello()                          # capabilities without batch: an older node
        assert codec.BATCH in welcome.capabilities     # the router offers, the node did not
        old.drain_inbox(0.3)
        old.send(batch(old.lease_msg(), old.lease_msg()))
        assert summary(old.drain_inbox(1.0)) == [("error", "unexpected_type")]
        assert old.lease().seq == 3                    # single frames are served as ever
    finally:
        old.close()
