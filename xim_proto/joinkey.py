"""The join key: its format and the fingerprint both sides log instead of the key.

A join key is minted by the router (``xim-router join-key create``), travels to
the node by hand or configuration management, and is spent once at enrollment
(docs/protocol.md §3). Neither side ever logs it: both name it by fingerprint.
"""

from __future__ import annotations

import hashlib
import re

JOIN_KEY_PREFIX = "xjk_"
JOIN_KEY_PATTERN = re.compile(r"^xjk_[A-Za-z0-9_-]{16,200}$")
JOIN_KEY_SHAPE = "xjk_ followed by 16 to 200 letters, digits, - or _"


def is_join_key(text: object) -> bool:
    return isinstance(text, str) and bool(JOIN_KEY_PATTERN.match(text))


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a join key (or any secret), fit for logs."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]
