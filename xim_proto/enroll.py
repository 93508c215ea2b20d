"""The enrollment HTTP API both sides speak (docs/protocol.md §3): paths and refusals."""

from __future__ import annotations

ENROLL_PATH = "/v1/enroll"
REFRESH_PATH = "/v1/enroll/refresh"
UNENROLL_PATH = "/v1/unenroll"

# The HTTP status of each refusal a router gives (docs/protocol.md §3.4). A 4xx
# other than 408 and 429 is final for the request that got it: the node does not
# retry the same key or token.
REFUSAL_STATUS: dict[str, int] = {
    "invalid_join_key": 401,
    "join_key_expired": 403,
    "join_key_used": 403,
    "key_in_use": 409,
    "invalid_token": 401,
    "token_expired": 401,
    "revoked": 401,
}


def is_final_refusal(status: int) -> bool:
    """Whether an HTTP answer with ``status`` refuses for good (retrying cannot help)."""
    return 400 <= status < 500 and status not in (408, 429)
