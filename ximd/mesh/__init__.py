"""The agent's end of the mesh: its ZeroMQ link to a router.

docs/protocol.md is the specification; xim_proto.codec is the only module that
knows the wire format, link.py the only one that owns the agent's socket.
report.py (what the node reports in hello and leases) and state.py (the link's
states) import no ZeroMQ, so the node's other parts can name them.
"""
