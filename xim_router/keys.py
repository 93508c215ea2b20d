"""Secrets the router mints and checks: join keys, bearer tokens, its CURVE keypair.

Join keys and tokens are random strings shown once; only their SHA-256 is
stored, so a copy of the state directory does not let anyone enroll or pose
as an agent.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import zmq

from xim_proto.files import write_atomically
from xim_proto.joinkey import JOIN_KEY_PREFIX

TOKEN_PREFIX = "xat_"
CURVE_KEY_PATTERN = re.compile(r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")   # Z85, 32 bytes


def new_join_key() -> str:
    return JOIN_KEY_PREFIX + secrets.token_urlsafe(32)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """What the store keeps instead of a join key or token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def is_curve_public_key(text: object) -> bool:
    return isinstance(text, str) and bool(CURVE_KEY_PATTERN.match(text))


@dataclass(frozen=True)
class CurveKeypair:
    public: str      # Z85
    secret: str      # Z85

    def __repr__(self) -> str:
        return f"CurveKeypair(public={self.public!r})"


def load_or_create_keypair(state_dir: Path) -> CurveKeypair:
    """The router's CURVE keypair, created on first start (file mode 0600)."""
    path = state_dir / "curve_keypair.json"
    if path.exists():
        data = json.loads(path.read_text())
        return CurveKeypair(public=data["public"], secret=data["secret"])
    public, secret = zmq.curve_keypair()
    pair = CurveKeypair(public=public.decode(), secret=secret.decode())
    write_atomically(path, json.dumps({"public": pair.public, "secret": pair.secret}), mode=0o600)
    return pair


def parse_duration(text: str) -> float:
    """'90s', '15m', '24h', '7d' or plain seconds -> seconds (ValueError otherwise)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 15m, 24h, 7d)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    seconds = value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be more than zero")
    return seconds
