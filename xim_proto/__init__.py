"""xim_proto — the vocabulary ximd and xim-router share, and neither owns.

What crosses the wire between a node and a router lives here and only here
(as tailscale's ``tailcfg`` is shared by its client and server):

- ``codec``     the mesh messages and their MessagePack framing (docs/protocol.md §4–6)
- ``transport`` the ZeroMQ socket options both ends apply, and the send/receive helpers
- ``joinkey``   the join-key format and the fingerprint both sides log
- ``enroll``    the enrollment HTTP API's paths and refusal codes (docs/protocol.md §3)
- ``ratelimit`` log lines about what a peer sent, rate-limited on both sides

Nothing here imports ``ximd`` or ``xim_router`` (tests/unit/test_import_rules.py).
"""

__version__ = "0.1.0"   # one distribution, one version: ximd and xim_router re-export it
