"""Enrollment over HTTP: POST /v1/enroll, /v1/enroll/refresh, /v1/unenroll (docs/protocol.md §3)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from xim_proto import codec
from xim_proto.enroll import ENROLL_PATH, REFRESH_PATH, REFUSAL_STATUS, UNENROLL_PATH
from xim_proto.joinkey import fingerprint, is_join_key
from xim_proto.ratelimit import escape
from xim_router import keys
from xim_router import store as store_mod
from xim_router.api_common import ROUTER_KEY, ApiError, bearer_token, read_json
from xim_router.mesh import Router
from xim_router.policy import MAX_CONCURRENT_LIMIT

log = logging.getLogger("xim_router.enroll")

WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]")


@dataclass(frozen=True)
class EnrollRequest:
    join_key: str
    curve_public_key: str
    hostname: str
    hardware: dict
    max_concurrent: int
    agent_version: str
    protocol_versions: list[int]


def _field(body: dict, name: str, kind: type, *, required: bool = True, default=None):
    value = body.get(name, default)
    if value is None and not required:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, "bad_request", f"field {name!r} must be a {kind.__name__}")
    return value


def parse_enroll_request(body: dict) -> EnrollRequest:
    """Validate an enroll body; ApiError names the first wrong field (never echoes the key)."""
    join_key = _field(body, "join_key", str)
    if not is_join_key(join_key):
        raise ApiError(400, "bad_request", "field 'join_key' is not a join key (xjk_…)")
    public_key = _field(body, "curve_public_key", str)
    if not keys.is_curve_public_key(public_key):
        raise ApiError(400, "bad_request", "field 'curve_public_key' must be a Z85 CURVE public key "
                                           "(40 characters)")
    hostname = _field(body, "hostname", str)
    if not 0 < len(hostname) <= 255:
        raise ApiError(400, "bad_request", "field 'hostname' must be 1 to 255 characters")
    max_concurrent = _field(body, "max_concurrent", int)
    if not 1 <= max_concurrent <= MAX_CONCURRENT_LIMIT:     # 2**63 would overflow SQLite's INTEGER
        raise ApiError(400, "bad_request", f"field 'max_concurrent' must be 1 to {MAX_CONCURRENT_LIMIT}")
    versions = _field(body, "protocol_versions", list, required=False, default=[1])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
        raise ApiError(400, "bad_request", "field 'protocol_versions' must be a list of integers")
    return EnrollRequest(join_key=join_key, curve_public_key=public_key, hostname=hostname,
                         hardware=_field(body, "hardware", dict, required=False, default={}),
                         max_concurrent=max_concurrent,
                         agent_version=_field(body, "agent_version", str),
                         protocol_versions=versions)


def advertised_endpoints(bound: str, request_host: str | None, configured: tuple[str, ...]) -> list[str]:
    """Mesh endpoints to hand an agent: configured ones, else the bound one with a
    wildcard host replaced by the host the agent used to reach this HTTP API."""
    if configured:
        return list(configured)
    parts = urlsplit(bound)
    host = parts.hostname or ""
    if (host in WILDCARD_HOSTS or parts.netloc.startswith("*")) and request_host:
        name = urlsplit("//" + request_host).hostname or request_host
        name = f"[{name}]" if ":" in name else name
        return [f"{parts.scheme}://{name}:{parts.port}"]
    return [bound]


def _refusal(exc: store_mod.StoreError) -> ApiError:
    return ApiError(REFUSAL_STATUS.get(exc.code, 400), exc.code, exc.message)


async def enroll(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    req = parse_enroll_request(await read_json(request))
    common = sorted(set(req.protocol_versions) & set(codec.PROTOCOL_VERSIONS))
    if not common:
        raise ApiError(400, "unsupported_version",
                       f"this router speaks protocol {list(codec.PROTOCOL_VERSIONS)}")
    try:
        enrolled = await router.store_worker.call(
            router.store.enroll, join_key=req.join_key, public_key=req.curve_public_key, hostname=req.hostname,
            hardware=req.hardware, max_concurrent=req.max_concurrent,
            agent_version=req.agent_version, token_ttl_s=router.settings.token_ttl_s)
    except store_mod.StoreError as exc:
        log.warning("refused enrollment of %s from %s with join key %s: %s", escape(req.hostname),
                    request.remote, fingerprint(req.join_key), exc.code)
        raise _refusal(exc) from None
    agent = enrolled.agent
    log.info("%s %s as agent %s (%s) with join key %s",
             "repeated the enrollment of" if enrolled.replayed else "enrolled", escape(req.hostname),
             agent.agent_id, agent.worker_id, agent.join_key_fingerprint)
    return web.json_response({
        "agent_id": agent.agent_id,
        "worker_id": agent.worker_id,
        "mesh_endpoints": advertised_endpoints(router.mesh_endpoint, request.host,
                                               router.advertise),
        "router_public_key": router.keypair.public,
        "token": enrolled.token,
        "token_expires_at": enrolled.token_expires_at,
        "assigned_model": agent.assigned_model,
        "protocol_version": common[-1],
    })


async def refresh(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    token, grace_s = bearer_token(request), router.settings.token_grace_s
    try:
        agent = await router.store_worker.call(router.store.check_token, token, grace_s=grace_s)
        router.store.require_recent_proof(agent, within_s=grace_s)
        token, expires_at = await router.store_worker.call(
            router.store.refresh_token, token, ttl_s=router.settings.token_ttl_s, grace_s=grace_s)
    except store_mod.StoreError as exc:
        raise _refusal(exc) from None
    return web.json_response({"token": token, "token_expires_at": expires_at})


async def unenroll(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    grace_s = router.settings.token_grace_s
    try:
        agent = await router.store_worker.call(router.store.check_token, bearer_token(request),
                                               grace_s=grace_s)
        router.store.require_recent_proof(agent, within_s=grace_s)
    except store_mod.StoreError as exc:
        raise _refusal(exc) from None
    await router.store_worker.call(router.store.final_state, agent.agent_id, store_mod.UNENROLLED)
    router.end_agent(agent.agent_id, "revoked", "this agent unenrolled", store_mod.UNENROLLED)
    log.info("agent %s (%s) unenrolled", agent.agent_id, agent.worker_id)
    return web.json_response({"agent_id": agent.agent_id, "state": store_mod.UNENROLLED})


def add_routes(app: web.Application) -> None:
    app.router.add_post(ENROLL_PATH, enroll)
    app.router.add_post(REFRESH_PATH, refresh)
    app.router.add_post(UNENROLL_PATH, unenroll)
