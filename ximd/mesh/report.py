"""What the node tells its router about itself: the node's half of hello and of each lease.

The node fills these in; the link adds what the session owns (token, protocol
versions, capabilities, the lease's sequence number) and builds the codec
messages. Frozen: a report is a snapshot, taken when the link asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from xim_proto import codec


@dataclass(frozen=True, kw_only=True)
class HelloInfo:
    """The node as hello introduces it."""

    max_concurrent: int
    models: tuple[codec.Model, ...] = ()
    hardware: Mapping[str, object] = field(default_factory=dict)
    hostname: str = ""              # empty: this host's name
    capabilities: tuple[str, ...] = ()   # beyond the link's own: the endpoints the engine serves, e.g. embeddings


@dataclass(frozen=True, kw_only=True)
class LeaseInfo:
    """The node's load and models, as each lease renews them."""

    max_concurrent: int
    models: tuple[codec.Model, ...] = ()
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    engine_state: str = "unknown"
    in_flight: tuple[str, ...] = ()
    draining: bool = False
    group: codec.GroupStatus | None = None   # its part in a group, from the first assignment (revision 1.4)
