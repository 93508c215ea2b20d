"""Join key → identity: enrollment with a router.

docs/protocol.md §3 is the HTTP API this speaks (its paths and refusals:
xim_proto.enroll); the identity it produces and its file: ximd.identity. The join key is read from the config, a file, stdin or a
systemd credential — never from argv — and only its source and fingerprint
are ever logged.

What `ximd enroll` / `ximd unenroll` print, and their exit statuses, are
ximd.commands.enroll's; this module only returns identities and raises.

Token refresh: the mesh link calls the function from ``token_refresher(cfg)``
before the token lapses and whenever the router answers ``token_expired``
(docs/protocol.md §3.2).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import aiohttp
import zmq

from xim_proto import enroll as enroll_api
from xim_proto.codec import PROTOCOL_VERSIONS
from xim_proto.joinkey import JOIN_KEY_SHAPE, fingerprint, is_join_key
from ximd import __version__
from ximd.config import DEFAULT_CONFIG_PATH, FALLBACK_MAX_CONCURRENT, RouterSection
from ximd.identity import (
    IDENTITY_DIR,
    EnrollmentError,
    EnrollmentRejected,
    Identity,
    IdentityError,
    IdentitySaveError,
    PendingEnrollment,
    TokenRefresher,
    load_identity,
    load_pending,
    pending_path,
    remove_pending,
    save_identity,
    save_pending,
)
from ximd.logs import phase_fields

log = logging.getLogger("ximd.enrollment")

CREDENTIAL_NAME = "join-key"
NOTHING_SPENT = "nothing was sent to the router and the join key is still unused"
HTTP_TIMEOUT_S = 30.0
# Every answer of the enrollment API is a small JSON object; anything longer is not one.
MAX_REPLY_BYTES = 1 << 20


# ---------------------------------------------------------------- errors
# (EnrollmentError, IdentityError and EnrollmentRejected live in ximd.identity,
# below the mesh link, which handles a refused token refresh.)


class JoinKeyError(EnrollmentError):
    """A join key source is set but unreadable, empty or not a join key."""


class RouterConfigError(EnrollmentError):
    """router.* settings do not allow talking to the router (no URL, http without insecure…)."""


class RouterUnreachable(EnrollmentError):
    """No usable answer from the router this time: try again later."""


# ---------------------------------------------------------------- the join key


def _read_source(path: str, stdin: IO[str] | None) -> str:
    if path == "-":
        return (stdin or sys.stdin).read()
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise JoinKeyError(f"cannot read the join key file {path}: {exc.strerror}") from None


def _credential_text(environ: Mapping[str, str], stdin: IO[str] | None) -> str:
    """The join-key credential's text; blank when absent.

    The unit's fallback `SetCredential=join-key:\\n` (systemd 252 fails the
    start when LoadCredential= names a missing file) is a lone newline: no key.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY")
    path = Path(directory) / CREDENTIAL_NAME if directory else None
    if path is None or not path.exists():
        return ""
    return _read_source(str(path), stdin).strip()


# What LoadCredential=join-key: reads at the unit's start (systemd/ximd.service).
JOIN_KEY_CREDENTIAL_SOURCE = "/etc/xerotier/join-key"


def join_key_awaits_restart(environ: Mapping[str, str], source: str | None = None) -> bool:
    """Whether a join key file was put in place that this process cannot have until it restarts:
    ximd runs under the unit (a credentials directory), its join-key credential is the blank
    fallback, and the file the credential is made from exists now. Only its existence is looked
    at (it is root's, 0600): systemd copies it at the next start, not at a reload."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return False
    try:
        blank = not (Path(directory) / CREDENTIAL_NAME).read_text(errors="replace").strip()
    except OSError:
        blank = True
    return blank and os.path.lexists(source or JOIN_KEY_CREDENTIAL_SOURCE)


def read_join_key(cfg, *, join_key_file: str | None = None, stdin: IO[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(key, source) from the first source that is set, or None when none is.

    Order: ``join_key_file`` (the --join-key-file flag; "-" = stdin), then
    router.join_key (config file, drop-ins or XEROTIER_AGENT_JOIN_KEY, folded
    by ximd.config), router.join_key_file, $CREDENTIALS_DIRECTORY/join-key.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    origins = getattr(cfg, "origins", {})
    if join_key_file:
        source = "standard input" if join_key_file == "-" else f"--join-key-file {join_key_file}"
        text = _read_source(join_key_file, stdin)
    elif cfg.router.join_key:
        source = f"router.join_key ({origins.get('router.join_key', 'config')})"
        text = cfg.router.join_key
    elif cfg.router.join_key_file:
        source = f"router.join_key_file {cfg.router.join_key_file}"
        text = _read_source(cfg.router.join_key_file, stdin)
    elif credential := _credential_text(env, stdin):
        source = f"systemd credential {CREDENTIAL_NAME}"
        text = credential
    else:
        return None
    key = text.strip()
    if not key:
        raise JoinKeyError(f"the join key from {source} is empty")
    if not is_join_key(key):
        raise JoinKeyError(f"the join key from {source} is not a join key (expected {JOIN_KEY_SHAPE})")
    return key, source


# ---------------------------------------------------------------- HTTP


def router_ssl(url: str, router: RouterSection):
    """The `ssl` argument for aiohttp: a context, False (unverified), or None (plain http).

    ``router`` is the config's [router] section: ``allow_http`` permits http://,
    ``tls_skip_verify`` turns the certificate check off (said in the log each time).
    """
    scheme = urlsplit(url).scheme
    if scheme == "http":
        if not router.allow_http:
            raise RouterConfigError(f"router.url {url} is plain http: use https, or set "
                                    "router.allow_http = true to allow it (testing only)")
        return None
    if scheme != "https":
        raise RouterConfigError(f"router.url {url!r} must start with https:// (or http:// with "
                                "router.allow_http)")
    if router.ca_file:        # a CA to check against wins over skipping the check
        try:
            return ssl.create_default_context(cafile=router.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise RouterConfigError(f"router.ca_file {router.ca_file}: cannot load it as a CA "
                                    f"bundle ({getattr(exc, 'strerror', None) or exc})") from None
    if router.tls_skip_verify:
        log.warning("router.tls_skip_verify: the certificate of %s is not checked; anyone on the "
                    "path can pose as the router and take the join key (set router.ca_file instead)", url)
        return False
    return ssl.create_default_context()


async def _post(url: str, *, body: dict, ssl_arg, token: str | None = None,
                timeout_s: float = HTTP_TIMEOUT_S) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        # trust_env: HTTPS_PROXY/HTTP_PROXY and NO_PROXY from the environment (the unit's
        # Environment= or a drop-in), as curl and apt honour them on a host behind a proxy.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                         trust_env=True) as http:
            # No redirects: following one would re-send the join key or the token
            # to wherever the answer points, https → http included.
            async with http.post(url, json=body, headers=headers, ssl=ssl_arg,
                                 allow_redirects=False) as resp:
                status = resp.status
                if 300 <= status < 400:
                    raise RouterConfigError(_redirect_refusal(url, status, resp.headers.get("Location")))
                raw = await _read_capped(resp, url)
    except aiohttp.ClientConnectorCertificateError as exc:
        raise RouterUnreachable(f"the certificate of {url} is not trusted "
                                f"({exc.certificate_error}); set router.ca_file to the CA that "
                                "signed it") from None
    except aiohttp.ClientSSLError as exc:
        raise RouterUnreachable(f"TLS with {url} failed: {exc}") from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise RouterUnreachable(f"cannot reach the router at {url}: "
                                f"{exc or type(exc).__name__}") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):     # RecursionError: nested past Python's limit
        data = None
    if status == 200 and isinstance(data, dict):
        return data
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code", "unknown") if isinstance(error, dict) else "unknown"
    message = error.get("message", "") if isinstance(error, dict) else raw[:200].decode(errors="replace")
    if enroll_api.is_final_refusal(status):
        raise EnrollmentRejected(code, message, status)
    raise RouterUnreachable(f"the router at {url} answered {status} ({code}): {message}")


def _redirect_refusal(url: str, status: int, location: str | None) -> str:
    where = repr(location[:200]) if location else "nowhere (no Location)"
    return (f"the router at {url} answered {status}, a redirect to {where}; ximd does not follow "
            "redirects (they would carry the join key or token elsewhere): set router.url to the "
            "router's own address")


async def _read_capped(resp: aiohttp.ClientResponse, url: str) -> bytes:
    """The answer's body, or RouterUnreachable once it passes MAX_REPLY_BYTES."""
    too_long = RouterUnreachable(f"the answer of {url} is longer than {MAX_REPLY_BYTES} bytes; "
                                 "is this an XIM router?")
    if resp.content_length is not None and resp.content_length > MAX_REPLY_BYTES:
        raise too_long
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise too_long
        chunks.append(chunk)
    return b"".join(chunks)


def _endpoint(base: str, path: str) -> str:
    return base.rstrip("/") + path


def hardware_summary() -> dict:
    """What enrollment tells the router about this host (best effort, JSON-safe)."""
    try:
        from ximd import hardware
        return json.loads(json.dumps(dataclasses.asdict(hardware.detect()), default=str))
    except Exception as exc:           # detection problems must not block enrollment
        log.debug("no hardware summary for enrollment: %s", exc)
        return {}


def _max_concurrent(cfg) -> int:
    value = cfg.agent.max_concurrent
    return value if isinstance(value, int) and not isinstance(value, bool) else FALLBACK_MAX_CONCURRENT


# tcp://HOST:PORT and nothing else ZeroMQ would also take: no other transport (ipc://
# would dial a local socket the router names), no `iface;` source part, no wildcard.
_MESH_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def is_mesh_endpoint(text: str) -> bool:
    """Whether ``text`` is a mesh endpoint the node may dial (docs/protocol.md §3.1)."""
    if not text.startswith("tcp://"):
        return False
    host, sep, port = text[len("tcp://"):].rpartition(":")
    return bool(sep and _MESH_HOST.fullmatch(host) and len(port) <= 5 and port.isdecimal() and port.isascii()
                and 1 <= int(port) <= 65535)


def _str_field(data: dict, name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise RouterUnreachable(f"the router's answer lacks {name!r}; is this an XIM router?")
    return value


def _router_url(cfg) -> str:
    if not cfg.router.url:
        raise RouterConfigError("router.url is not set: put the router's URL in "
                                "/etc/xerotier/agent.toml ([router] url = \"https://…\") or "
                                "XEROTIER_AGENT_ROUTER_URL")
    return cfg.router.url


def new_keypair() -> tuple[str, str]:
    """A fresh CURVE keypair, Z85 (public, secret): the secret half never leaves this host."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


async def enroll(cfg, join_key: str, *, hostname: str | None = None,
                 hardware: dict | None = None, keypair: tuple[str, str] | None = None) -> Identity:
    """Enroll with ``keypair`` (public, secret), a fresh one when None; nothing is saved."""
    url = _router_url(cfg)
    ssl_arg = router_ssl(url, cfg.router)
    public, secret = keypair or new_keypair()
    data = await _post(_endpoint(url, enroll_api.ENROLL_PATH), ssl_arg=ssl_arg, body={
        "join_key": join_key,
        "curve_public_key": public,
        "hostname": hostname or socket.gethostname(),
        "hardware": hardware_summary() if hardware is None else hardware,
        "max_concurrent": _max_concurrent(cfg),
        "agent_version": __version__,
        "protocol_versions": list(PROTOCOL_VERSIONS),
    })
    endpoints = data.get("mesh_endpoints")
    if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) for e in endpoints):
        raise RouterUnreachable("the router's answer lacks 'mesh_endpoints'")
    for endpoint in endpoints:
        if not is_mesh_endpoint(endpoint):
            raise RouterUnreachable(f"the router at {url} offers the mesh endpoint {endpoint[:80]!r}; "
                                    "ximd dials only tcp://HOST:PORT endpoints (docs/protocol.md §3.1): "
                                    "the router's advertised mesh endpoints must be fixed")
    expires = data.get("token_expires_at")
    if not isinstance(expires, (int, float)):
        raise RouterUnreachable("the router's answer lacks 'token_expires_at'")
    assigned = data.get("assigned_model")
    return Identity(
        agent_id=_str_field(data, "agent_id"), worker_id=_str_field(data, "worker_id"),
        router_url=url, mesh_endpoints=tuple(endpoints),
        router_public_key=_str_field(data, "router_public_key"),
        agent_public_key=public, agent_secret_key=secret,
        token=_str_field(data, "token"), token_expires_at=float(expires),
        enrolled_at=time.time(), assigned_model=assigned if isinstance(assigned, str) else None,
        join_key_fingerprint=fingerprint(join_key))


async def enroll_and_save(cfg, join_key: str, *, source: str, hostname: str | None = None,
                          hardware: dict | None = None) -> tuple[Identity, Path]:
    """Enroll and save the identity, crash-safe: (identity, where it was saved).

    ``source`` says where the join key came from, for the log (never the key itself).

    The join key is single-use, so the keypair is saved (``pending.json``) before
    the key is spent and reused by the next attempt with the same key: a router
    answers a repeated enrollment from the same keypair with the same agent
    (docs/protocol.md §3.1). IdentitySaveError says what could not be written and
    whether the key was spent.
    """
    state_dir, url, key_fingerprint = cfg.agent.state_dir, _router_url(cfg), fingerprint(join_key)
    log.info("enrolling with %s using the join key from %s (%s)", url, source, key_fingerprint)
    try:
        pending = load_pending(state_dir)
    except IdentityError as exc:
        raise IdentitySaveError(pending_path(state_dir), f"{exc}; {NOTHING_SPENT}") from None
    if pending is not None and pending.matches(url, key_fingerprint):
        log.info("reusing the keypair of the unfinished enrollment with this join key (%s)",
                 key_fingerprint)
    else:
        public, secret = new_keypair()
        pending = PendingEnrollment(url, key_fingerprint, public, secret, time.time())
        try:
            save_pending(state_dir, pending)
        except IdentitySaveError as exc:
            raise IdentitySaveError(exc.path, f"{exc.reason}; {NOTHING_SPENT}") from None
    identity = await enroll(cfg, join_key, hostname=hostname, hardware=hardware,
                            keypair=(pending.agent_public_key, pending.agent_secret_key))
    try:
        path = save_identity(state_dir, identity)
    except IdentitySaveError as exc:
        raise IdentitySaveError(exc.path, (
            f"{exc.reason}; the router enrolled this node as agent {identity.agent_id}: once "
            f"this is fixed, enrolling again with the same join key gets the same agent "
            f"(the keypair is kept in {exc.path.parent})")) from None
    try:
        remove_pending(state_dir)
    except (EnrollmentError, OSError) as exc:     # the identity is safe; this is tidying
        log.warning("could not remove the finished enrollment's keypair file: %s", exc)
    return identity, path


async def refresh(cfg, identity: Identity) -> Identity:
    """The identity with a new token (the current one may have lapsed within the router's grace)."""
    ssl_arg = router_ssl(identity.router_url, cfg.router)
    data = await _post(_endpoint(identity.router_url, enroll_api.REFRESH_PATH), body={},
                       ssl_arg=ssl_arg, token=identity.token)
    expires = data.get("token_expires_at")
    if not isinstance(expires, (int, float)):
        raise RouterUnreachable("the router's refresh answer lacks 'token_expires_at'")
    return identity.with_token(_str_field(data, "token"), float(expires))


async def unenroll(cfg, identity: Identity) -> None:
    ssl_arg = router_ssl(identity.router_url, cfg.router)
    await _post(_endpoint(identity.router_url, enroll_api.UNENROLL_PATH), body={}, ssl_arg=ssl_arg,
                token=identity.token)


def token_refresher(cfg) -> TokenRefresher:
    """What the mesh link calls to renew its token: refresh over HTTP, then save."""
    async def refresh_and_save(identity: Identity) -> Identity:
        renewed = await refresh(cfg, identity)
        save_identity(cfg.agent.state_dir, renewed)
        log.info("token renewed; valid until %s", local_time(renewed.token_expires_at))
        return renewed
    return refresh_and_save


def local_time(epoch: float) -> str:
    """An epoch as the operator's local wall-clock time, for logs and the enroll command."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


# ---------------------------------------------------------------- what the engine must not see


def secret_paths(cfg, environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """Every file or directory holding a secret of the node: the identity (and a pending
    enrollment's keypair), the configuration files (the join key may be in them), the
    join key file, the Hugging Face token file and the systemd credentials. The engine's sandbox hides them."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    found = [Path(cfg.agent.state_dir) / IDENTITY_DIR, DEFAULT_CONFIG_PATH.parent,
             *(Path(source) for source in cfg.sources)]
    if cfg.router.join_key_file:
        found.append(Path(cfg.router.join_key_file))
    if cfg.model_cache.hf_token_file:
        found.append(Path(cfg.model_cache.hf_token_file))
    if env.get("CREDENTIALS_DIRECTORY"):
        found.append(Path(env["CREDENTIALS_DIRECTORY"]))
    return tuple(dict.fromkeys(found))


# ---------------------------------------------------------------- policy


def key_policy(identity: Identity, key_fingerprint: str, source: str) -> tuple[int, str]:
    """(log level, message) for a join key found while already enrolled."""
    if key_fingerprint == identity.join_key_fingerprint:
        return logging.INFO, (f"the join key from {source} is the one this node enrolled with; "
                              "it is not needed any more and can be removed")
    return logging.WARNING, (f"the join key from {source} ({key_fingerprint}) differs from the one "
                             f"this node enrolled with ({identity.join_key_fingerprint}); the node "
                             f"keeps its identity (agent {identity.agent_id}). To enroll again with "
                             "the new key run `ximd enroll --force`")


@dataclass(frozen=True)
class EnrollmentStatus:
    """What the daemon has after ensure_identity(): an identity, or why not."""

    identity: Identity | None
    reason: str = ""
    retry: bool = False         # True: the router was unreachable, try again later


async def ensure_identity(cfg, *, stdin: IO[str] | None = None) -> EnrollmentStatus:
    """For `ximd run` (start and reload): load the identity, or enroll with the join key."""
    try:
        identity = load_identity(cfg.agent.state_dir)
        found = read_join_key(cfg, stdin=stdin)
    except EnrollmentError as exc:
        log.error("%s", exc)
        return EnrollmentStatus(None, f"not enrolled: {exc}")
    if identity is not None:
        if found:
            level, message = key_policy(identity, fingerprint(found[0]), found[1])
            log.log(level, "%s", message)
        return EnrollmentStatus(identity)
    if found is None:
        return EnrollmentStatus(None, "not enrolled: no join key")
    key, source = found
    try:
        identity, path = await enroll_and_save(cfg, key, source=source)
    except RouterUnreachable as exc:
        log.warning("enrollment postponed: %s", exc)
        return EnrollmentStatus(None, f"enrollment pending: {exc}", retry=True)
    except IdentitySaveError as exc:
        # A full disk or a broken directory: the operator fixes it, the retry
        # reuses the saved keypair and the router answers with the same agent.
        log.error("enrollment not finished: %s", exc, extra=phase_fields("enrollment"))
        return EnrollmentStatus(None, f"enrollment not finished: {exc}", retry=True)
    except EnrollmentError as exc:
        log.error("enrollment failed: %s", exc)
        return EnrollmentStatus(None, f"not enrolled: {exc}")
    log.info("enrolled as agent %s (worker %s); identity in %s", identity.agent_id,
             identity.worker_id, path)
    return EnrollmentStatus(identity)
