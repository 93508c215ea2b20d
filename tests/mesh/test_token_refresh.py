"""The link's one token-refresh ladder and what each of its four callers makes of it:
the same SessionEnd and log lines for renewed, refused for good and failed for now."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from xim_proto import codec
from ximd.identity import EnrollmentError, EnrollmentRejected, Identity
from ximd.mesh.link import FailedForNow, MeshLink, RefusedForGood, Renewed, SessionEnd
from ximd.mesh.report import HelloInfo, LeaseInfo
from ximd.mesh.state import LinkState

IDENTITY = Identity(agent_id="a", worker_id="w", router_url="http://unused", mesh_endpoints=("tcp://127.0.0.1:1",),
                    router_public_key="r" * 40, agent_public_key="p" * 40, agent_secret_key="s" * 40,
                    token="old", token_expires_at=0.0)
RENEWED = dataclasses.replace(IDENTITY, token="new", token_expires_at=4e9)
REVOKED = EnrollmentRejected("revoked", "this node was revoked")
OFFLINE = EnrollmentError("cannot reach the router: connection refused")


def refresher(outcome: Exception | None):
    async def refresh(identity: Identity) -> Identity:
        if outcome is not None:
            raise outcome
        return RENEWED
    return refresh


async def _ignore(msg: codec.Message) -> None:
    pass


def link_with(outcome: Exception | None) -> MeshLink:
    link = MeshLink(IDENTITY, hello_info=lambda: HelloInfo(max_concurrent=1),
                    lease_info=lambda: LeaseInfo(max_concurrent=1), on_message=_ignore,
                    on_state=lambda state, detail: None, token_refresher=refresher(outcome))
    link.endpoint = "tcp://router:5555"
    return link


@pytest.mark.parametrize(("outcome", "expected"), [
    (None, Renewed()),
    (REVOKED, RefusedForGood("revoked", "this node was revoked")),
    (OFFLINE, FailedForNow(OFFLINE)),
])
def test_one_refresh_says_how_it_went_and_keeps_the_identity_unless_renewed(outcome, expected):
    link = link_with(outcome)
    assert asyncio.run(link._refresh_token(link.token_refresher)) == expected
    assert link.identity == (RENEWED if outcome is None else IDENTITY)


CURVE = "the router at tcp://router:5555 refused this node's CURVE key"


@pytest.mark.parametrize(("outcome", "end"), [
    (None, SessionEnd(CURVE)),
    (REVOKED, SessionEnd(f"{CURVE}: this node was revoked (revoked)", final=True)),
    (OFFLINE, SessionEnd(f"{CURVE}; could not ask why: cannot reach the router: connection refused")),
])
def test_refused_curve_key(outcome, end):
    assert asyncio.run(link_with(outcome)._auth_failed()) == end


REJECTED = "router rejected the session: token too old (token_expired)"


@pytest.mark.parametrize(("outcome", "end"), [
    (None, SessionEnd(f"{REJECTED}; token refreshed", retry_now=True)),
    (REVOKED, SessionEnd(f"{REJECTED}; refresh refused: this node was revoked (revoked)", final=True)),
    (OFFLINE, SessionEnd(f"{REJECTED}; refresh failed: cannot reach the router: connection refused")),
])
def test_token_rejected_by_the_router(outcome, end):
    link = link_with(outcome)
    link.state = LinkState.CONNECTED
    assert asyncio.run(link._on_reject(codec.Reject(code="token_expired", message="token too old"))) == end


@pytest.mark.parametrize(("outcome", "end", "warning"), [
    (None, None, None),
    (REVOKED, SessionEnd("token refresh refused: this node was revoked (revoked)", final=True), None),
    (OFFLINE, None, "token refresh failed, trying with the current token: cannot reach the router: connection refused"),
])
def test_refresh_due_before_a_session(outcome, end, warning, caplog):
    with caplog.at_level(logging.WARNING, logger="ximd.mesh"):
        assert asyncio.run(link_with(outcome)._refresh_if_due()) == end
    assert [r.getMessage() for r in caplog.records if r.name == "ximd.mesh"] == ([warning] if warning else [])


@pytest.mark.parametrize(("outcome", "level", "line"), [
    (None, None, None),
    (REVOKED, logging.ERROR, "token refresh refused: this node was revoked (revoked); the router will end this session"),
    (OFFLINE, logging.WARNING, "token refresh failed, will retry: cannot reach the router: connection refused"),
    (RuntimeError("bug"), logging.ERROR, "token refresh failed"),
])
def test_refresh_in_the_background(outcome, level, line, caplog):
    link = link_with(outcome)
    with caplog.at_level(logging.WARNING, logger="ximd.mesh"):
        asyncio.run(link._refresh_in_background(link.token_refresher))
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "ximd.mesh"]
    assert records == ([(level, line)] if line else [])
    assert link._refreshing is None
