"""The node's identity: who it is to its router, kept on disk between starts.

``<state_dir>/enrollment/identity.json`` (directory 0700, file 0600, written
atomically, owned by the state directory's owner even when root writes it,
never through a link planted there: see "the enrollment directory" below), and
``pending.json`` beside it while an enrollment is under way.
This module sits below both enrollment (which creates identities) and the mesh
link (which uses one and renews its token through a ``TokenRefresher``), so the
link never imports the enrollment client (tests/unit/test_import_rules.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xim_proto.files import (
    Owner,
    UnsafePath,
    opened_directory,
    private_subdirectory,
    read_text_at,
    write_atomically_at,
)

log = logging.getLogger("ximd.enrollment")

IDENTITY_DIR = "enrollment"
IDENTITY_FILE = "identity.json"
PENDING_FILE = "pending.json"          # the keypair of an enrollment not finished yet
RETIRED_SUFFIX = ".revoked"
IDENTITY_FORMAT = 1


# ---------------------------------------------------------------- errors


class EnrollmentError(Exception):
    """Base of everything enrollment and the identity raise on purpose; str() is fit for the user."""


class IdentityError(EnrollmentError):
    """The identity file exists but cannot be used."""


class IdentityDenied(IdentityError):
    """This user may not read the enrollment directory (it is the service account's, 0700)."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


class IdentitySaveError(EnrollmentError):
    """A file of the enrollment directory could not be written (full disk, unsafe directory…)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot save {path}: {reason}")


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


def pending_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / IDENTITY_DIR / PENDING_FILE


# ---------------------------------------------------------------- the enrollment directory
#
# Root may write here (`ximd enroll`), into a state directory the service
# account owns: below the state directory nothing is reached by path
# (xim_proto.files: descriptors, O_NOFOLLOW, ownership checked).


def _state_owner(state_fd: int) -> Owner | None:
    """Whose files we write, when root writes them: the state directory's owner."""
    if os.geteuid() != 0:
        return None
    st = os.fstat(state_fd)
    return st.st_uid, st.st_gid


@contextlib.contextmanager
def _enrollment_dir(state_dir: Path, *, create: bool) -> Iterator[tuple[int | None, Owner | None]]:
    """(descriptor of <state>/enrollment or None when absent and not `create`, owner to give files)."""
    if create:
        state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            state_fd = stack.enter_context(opened_directory(state_dir))
        except FileNotFoundError:
            if create:
                raise
            yield None, None
            return
        owner = _state_owner(state_fd)
        fd = stack.enter_context(private_subdirectory(
            state_fd, IDENTITY_DIR, shown=str(state_dir / IDENTITY_DIR), owner=owner, create=create))
        yield fd, owner


def _read(state_dir: str | os.PathLike, name: str) -> tuple[str, os.stat_result] | None:
    """A file of the enrollment directory: (text, status), None when there is none.
    IdentityError when it cannot be read safely."""
    shown = Path(state_dir) / IDENTITY_DIR / name
    try:
        with _enrollment_dir(Path(state_dir), create=False) as (fd, _):
            return None if fd is None else read_text_at(fd, name, shown=str(shown))
    except UnsafePath as exc:
        raise IdentityError(str(exc)) from None
    except PermissionError as exc:
        raise IdentityDenied(f"cannot read {shown}: {exc.strerror or exc}", shown) from None
    except OSError as exc:
        raise IdentityError(f"cannot read {shown}: {exc.strerror or exc}") from None


def _write(state_dir: str | os.PathLike, name: str, data: dict[str, Any]) -> Path:
    """Write a file of the enrollment directory atomically (0600 in 0700); IdentitySaveError."""
    path = Path(state_dir) / IDENTITY_DIR / name
    try:
        with _enrollment_dir(Path(state_dir), create=True) as (fd, owner):
            assert fd is not None            # create=True: made or refused
            write_atomically_at(fd, name, json.dumps(data, indent=2) + "\n", mode=0o600, owner=owner)
    except UnsafePath as exc:
        raise IdentitySaveError(path, str(exc)) from None
    except OSError as exc:
        raise IdentitySaveError(path, exc.strerror or str(exc)) from None
    return path


def _remove(state_dir: str | os.PathLike, name: str, *, keep_as: str | None = None) -> Path | None:
    """Remove (or rename to `keep_as`) a file of the enrollment directory; its path, or None."""
    directory = Path(state_dir) / IDENTITY_DIR
    try:
        with _enrollment_dir(Path(state_dir), create=False) as (fd, _):
            if fd is None:
                return None
            if keep_as is None:
                os.unlink(name, dir_fd=fd)
            else:
                os.replace(name, keep_as, src_dir_fd=fd, dst_dir_fd=fd)
            os.fsync(fd)
    except FileNotFoundError:
        return None
    except UnsafePath as exc:
        raise IdentityError(str(exc)) from None
    return directory / (keep_as or name)


# ---------------------------------------------------------------- the identity file


def load_identity(state_dir: str | os.PathLike) -> Identity | None:
    """The saved identity, None when there is none; IdentityError when it is unusable."""
    path = identity_path(state_dir)
    found = _read(state_dir, IDENTITY_FILE)
    if found is None:
        return None
    text, st = found
    try:
        identity = Identity.from_json(json.loads(text))
    except ValueError as exc:
        raise IdentityError(f"{path} is not a valid identity ({exc}); move it away and enroll "
                            "again with a new join key (`ximd enroll`)") from None
    mode = st.st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is readable by others (mode %03o); it holds the node's secret key: "
                    "chmod 600 it", path, mode)
    return identity


def save_identity(state_dir: str | os.PathLike, identity: Identity) -> Path:
    """Write the identity atomically (xim_proto.files); 0600 in a 0700 directory.
    IdentitySaveError says where and why it could not."""
    return _write(state_dir, IDENTITY_FILE, identity.to_json())


def remove_identity(state_dir: str | os.PathLike) -> Path | None:
    """Delete the identity (after unenroll); the path it had, or None."""
    return _remove(state_dir, IDENTITY_FILE)


def retire_identity(state_dir: str | os.PathLike) -> Path | None:
    """Keep a refused identity as evidence (identity.json.revoked); where it went, or None."""
    return _remove(state_dir, IDENTITY_FILE, keep_as=IDENTITY_FILE + RETIRED_SUFFIX)


# ---------------------------------------------------------------- the pending enrollment
#
# The join key is single-use: the keypair is saved before the key is spent, so a
# node that dies (or cannot save its identity) after the router said yes retries
# with the same keypair, and the router answers with the same agent
# (docs/protocol.md §3.1, "A repeated enrollment").


@dataclass(frozen=True)
class PendingEnrollment:
    router_url: str
    join_key_fingerprint: str
    agent_public_key: str
    agent_secret_key: str = field(repr=False)
    created_at: float = 0.0

    def matches(self, router_url: str, join_key_fingerprint: str) -> bool:
        return (self.router_url, self.join_key_fingerprint) == (router_url, join_key_fingerprint)

    def to_json(self) -> dict[str, Any]:
        return {"format": IDENTITY_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> PendingEnrollment:
        if not isinstance(data, dict) or data.get("format") != IDENTITY_FORMAT:
            raise ValueError("not a pending enrollment of this format")
        texts: dict[str, str] = {}
        for name in PENDING_TEXT_FIELDS:
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"field {name!r} must be a non-empty string")
            texts[name] = value
        created = data.get("created_at")
        if not isinstance(created, (int, float)) or isinstance(created, bool):
            raise ValueError("field 'created_at' must be a number")
        return cls(**texts, created_at=float(created))


PENDING_TEXT_FIELDS = ("router_url", "join_key_fingerprint", "agent_public_key", "agent_secret_key")


def load_pending(state_dir: str | os.PathLike) -> PendingEnrollment | None:
    """The saved keypair of an enrollment not finished yet; None when there is none or it is unusable."""
    found = _read(state_dir, PENDING_FILE)
    if found is None:
        return None
    try:
        return PendingEnrollment.from_json(json.loads(found[0]))
    except ValueError as exc:
        log.warning("ignoring %s (%s): a new keypair is made", pending_path(state_dir), exc)
        return None


def save_pending(state_dir: str | os.PathLike, pending: PendingEnrollment) -> Path:
    return _write(state_dir, PENDING_FILE, pending.to_json())


def remove_pending(state_dir: str | os.PathLike) -> Path | None:
    return _remove(state_dir, PENDING_FILE)
