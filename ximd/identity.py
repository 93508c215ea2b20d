"""The node's identity: who it is to its router, kept on disk between starts.

``<state_dir>/enrollment/identity.json`` (directory 0700, file 0600, written
atomically, owned by the state directory's owner even when root writes it).
This module sits below both enrollment (which creates identities) and the mesh
link (which uses one and renews its token through a ``TokenRefresher``), so the
link never imports the enrollment client (tests/unit/test_import_rules.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xim_proto.files import write_atomically

log = logging.getLogger("ximd.enrollment")

IDENTITY_DIR = "enrollment"
IDENTITY_FILE = "identity.json"
IDENTITY_FORMAT = 1


# ---------------------------------------------------------------- errors


class EnrollmentError(Exception):
    """Base of everything enrollment and the identity raise on purpose; str() is fit for the user."""


class IdentityError(EnrollmentError):
    """The identity file exists but cannot be used."""


class EnrollmentRejected(EnrollmentError):
    """The router said no, definitively: bad, used or expired key; revoked identity."""

    def __init__(self, code: str, message: str, status: int | None = None):
        self.code, self.message, self.status = code, message, status
        super().__init__(f"the router refused ({code}): {message}")


# ---------------------------------------------------------------- identity


@dataclass(frozen=True)
class Identity:
    agent_id: str
    worker_id: str
    router_url: str
    mesh_endpoints: tuple[str, ...]
    router_public_key: str
    agent_public_key: str
    agent_secret_key: str = field(repr=False)
    token: str = field(repr=False)
    token_expires_at: float = 0.0
    enrolled_at: float = 0.0
    assigned_model: str | None = None
    join_key_fingerprint: str = ""

    def with_token(self, token: str, expires_at: float) -> Identity:
        return dataclasses.replace(self, token=token, token_expires_at=expires_at)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mesh_endpoints"] = list(self.mesh_endpoints)
        return {"format": IDENTITY_FORMAT, **data}

    @classmethod
    def from_json(cls, data: Any) -> Identity:
        """Build from the file's JSON; ValueError says what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format") != IDENTITY_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {IDENTITY_FORMAT}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                raise ValueError(f"field {f.name!r} is missing")
            kwargs[f.name] = data[f.name]
        for name in ("agent_id", "worker_id", "router_url", "router_public_key",
                     "agent_public_key", "agent_secret_key", "token"):
            if not isinstance(kwargs[name], str) or not kwargs[name]:
                raise ValueError(f"field {name!r} must be a non-empty string")
        endpoints = kwargs["mesh_endpoints"]
        if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) for e in endpoints):
            raise ValueError("field 'mesh_endpoints' must be a non-empty list of strings")
        kwargs["mesh_endpoints"] = tuple(endpoints)
        for name in ("token_expires_at", "enrolled_at"):
            if not isinstance(kwargs[name], (int, float)) or isinstance(kwargs[name], bool):
                raise ValueError(f"field {name!r} must be a number")
        return cls(**kwargs)


# What the mesh link calls to renew its token: the identity with a new token, or
# EnrollmentRejected (final: the node is unknown or revoked) or another
# EnrollmentError (try again later).
TokenRefresher = Callable[[Identity], Awaitable[Identity]]


def identity_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / IDENTITY_DIR / IDENTITY_FILE


def load_identity(state_dir: str | os.PathLike) -> Identity | None:
    """The saved identity, None when there is none; IdentityError when it is unusable."""
    path = identity_path(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    try:
        identity = Identity.from_json(json.loads(text))
    except ValueError as exc:
        raise IdentityError(f"{path} is not a valid identity ({exc}); move it away and enroll "
                            "again with a new join key (`ximd enroll`)") from None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is readable by others (mode %03o); it holds the node's secret key: "
                    "chmod 600 it", path, mode)
    return identity


def _owner_of(path: Path) -> tuple[int, int] | None:
    """Whose files we write, when root writes them: the state directory's owner."""
    if os.geteuid() != 0:
        return None
    st = path.stat()
    return st.st_uid, st.st_gid


def save_identity(state_dir: str | os.PathLike, identity: Identity) -> Path:
    """Write the identity atomically (xim_proto.files); 0600 in a 0700 directory."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    owner = _owner_of(state_dir)
    directory = state_dir / IDENTITY_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    if owner:
        os.chown(directory, *owner)
    text = json.dumps(identity.to_json(), indent=2) + "\n"
    return write_atomically(directory / IDENTITY_FILE, text, mode=0o600, owner=owner)


def remove_identity(state_dir: str | os.PathLike) -> Path | None:
    """Delete the identity (after unenroll or revocation); the path it had, or None."""
    path = identity_path(state_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path
