"""ZAP (ZeroMQ RFC 27): who may complete a CURVE handshake with the router.

libzmq asks this handler about every connection before any message from it
is delivered. Only the CURVE public key of an enrolled agent that is neither
revoked nor unenrolled passes; the reply's User-Id is the agent id, which the
router reads back from every frame to bind a connection to its identity.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils import z85

from xim_proto.ratelimit import RateLimitedLog
from xim_router import store as store_mod

log = logging.getLogger("xim_router.zap")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
# libzmq lets every CURVE client in when no ZAP handler is bound, unless the
# socket enforces its ZAP domain. The option is part of libzmq's draft API up
# to 4.3.x: a libzmq built without drafts (or an old pyzmq) refuses or lacks it.
_ZAP_ENFORCE_DOMAIN: int | None = getattr(zmq, "ZAP_ENFORCE_DOMAIN", None)


def _probe_enforce_support() -> bool:
    if _ZAP_ENFORCE_DOMAIN is None:
        return False
    ctx: zmq.Context = zmq.Context.instance()
    probe = ctx.socket(zmq.ROUTER)
    try:
        probe.setsockopt(_ZAP_ENFORCE_DOMAIN, 1)
        return True
    except zmq.ZMQError:
        return False
    finally:
        probe.close(linger=0)


ENFORCE_SUPPORTED = _probe_enforce_support()


@dataclass(frozen=True)
class ZapDecision:
    allowed: bool
    user_id: str      # the agent id when allowed
    reason: str


def decide(mechanism: bytes, credentials: list[bytes],
           lookup: Callable[[str], store_mod.Agent | None]) -> ZapDecision:
    """Pure decision for one ZAP request."""
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return ZapDecision(False, "", f"mechanism {mechanism.decode(errors='replace')} is not accepted")
    public_key = z85.encode(credentials[0]).decode()
    agent = lookup(public_key)
    if agent is None:
        return ZapDecision(False, "", f"unknown CURVE key {public_key}")
    if agent.state in store_mod.FINAL_STATES:
        return ZapDecision(False, "", f"agent {agent.agent_id} is {agent.state}")
    return ZapDecision(True, agent.agent_id, "enrolled agent")


def require_zap(sock: zmq.Socket, domain: bytes) -> bool:
    """Make ``sock`` ask ZAP about every connection and refuse all when no handler answers.

    False when this libzmq cannot enforce the domain: then the router relies on
    its handler being bound before the socket binds and staying up (it answers
    every request, refusing on any error), and says so in the log.
    """
    sock.setsockopt(zmq.ZAP_DOMAIN, domain)
    if ENFORCE_SUPPORTED:
        assert _ZAP_ENFORCE_DOMAIN is not None
        sock.setsockopt(_ZAP_ENFORCE_DOMAIN, 1)
        return True
    log.warning("this libzmq (%s) cannot enforce the ZAP domain (ZMQ_ZAP_ENFORCE_DOMAIN is a draft "
                "option it was built without): if the router's ZAP handler ever stopped, CURVE "
                "clients would no longer be checked", zmq.zmq_version())
    return False


class ZapHandler:
    """Answers ZAP requests for one zmq.Context; bind before the CURVE socket binds."""

    def __init__(self, ctx: zmq.asyncio.Context, lookup: Callable[[str], store_mod.Agent | None]):
        self.lookup = lookup
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.allowed = 0
        self.denied = 0
        self._limited = RateLimitedLog(log, interval_s=10.0)

    async def run(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                reply = self.answer(frames)
            except Exception:      # a bad request must not stop authentication for everyone
                log.exception("ZAP request could not be answered")
                continue
            if reply is not None:
                await self.sock.send_multipart(reply)

    def answer(self, frames: list[bytes]) -> list[bytes] | None:
        # [peer, empty, version, request_id, domain, address, identity, mechanism, *credentials]
        if len(frames) < 8 or frames[2] != ZAP_VERSION:
            log.warning("ignoring a malformed ZAP request (%d frames)", len(frames))
            return None
        peer, _, version, request_id, _domain, address, _identity, mechanism = frames[:8]
        try:
            decision = decide(mechanism, frames[8:], self.lookup)
        except Exception:      # e.g. the store is unreadable: refuse, and say so once
            log.exception("ZAP: could not check a CURVE key; refusing the connection")
            return [peer, b"", version, request_id, b"500", b"internal error", b"", b""]
        if decision.allowed:
            self.allowed += 1
            log.debug("ZAP: %s from %s allowed", decision.user_id, address.decode(errors="replace"))
            status, text = b"200", b"OK"
        else:
            self.denied += 1
            self._limited(logging.WARNING, address.decode(errors="replace"),
                          "refused a mesh connection from %s: %s",
                          address.decode(errors="replace"), decision.reason)
            status, text = b"400", decision.reason.encode()[:200]
        return [peer, b"", version, request_id, status, text, decision.user_id.encode(), b""]

    def close(self) -> None:
        self.sock.close()


def start(ctx: zmq.asyncio.Context, lookup) -> tuple[ZapHandler, asyncio.Task]:
    handler = ZapHandler(ctx, lookup)
    return handler, asyncio.ensure_future(handler.run())
