"""The mesh: the wire protocol (codec) and the agent's ZeroMQ link to a router.

docs/protocol.md is the specification; codec.py is the only module that knows
the wire format, link.py the only one that owns the agent's socket.
"""
