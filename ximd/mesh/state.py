"""The mesh link's states, in a module of their own so that the node, its metrics
and its status can name them without importing the link (and ZeroMQ)."""

from __future__ import annotations

import enum


class LinkState(str, enum.Enum):
    """Where the link stands with its router; the values are what the journal
    (XIM_LINK_STATE), the metrics labels and `ximd status` show."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    REJECTED = "rejected"       # refused for good: the node waits for a new identity

    def __str__(self) -> str:
        return self.value
