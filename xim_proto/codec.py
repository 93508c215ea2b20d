"""The mesh wire format, in one place: message dataclasses, encode(), decode().

A frame is one MessagePack map ``{"v": 1, "type": "<name>", <fields>...}``
(docs/protocol.md §4). Each message type is a dataclass below; its type hints
are the schema, so the codec, its validation and the documented catalogue
cannot disagree (tests/mesh/test_protocol_doc.py walks the document's tables
against ``catalogue()``).

Nothing here does I/O. decode() turns arbitrary bytes into a message or raises
ProtocolError, never anything else: the link and the router log and drop
what fails and keep serving.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

# Protocol versions this implementation speaks, oldest first. ``hello`` is
# always sent in a version-1 envelope so that any router can read it and
# answer with the version it picked (docs/protocol.md §4.3).
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
PROTOCOL_VERSION = PROTOCOL_VERSIONS[-1]
# The revision of docs/protocol.md this implementation follows (§10: same frames,
# additions an older peer never sees). 1.2: the embeddings endpoint and capability.
# 1.3: several frames per ZeroMQ message (``batch``), when both sides offer it.
# 1.4: groups (one model across several agents): the `group` message, lease.group.
PROTOCOL_REVISION = "1.4"
# hello's capability of an agent whose engine serves /v1/embeddings (revision 1.2).
EMBEDDINGS = "embeddings"
# The capability, in hello and in welcome, of a side that reads ``batch`` frames (revision
# 1.3): an agent sends them only when both its hello and the router's welcome list it.
BATCH = "batch"
# hello's capability of an agent that can run its part of a group (revision 1.4).
GROUPS = "groups"
# What a `group` assignment tells an agent to do, and the states of its part (§5.6).
GROUP_RUN, GROUP_WAIT, GROUP_LEAVE = "run", "wait", "leave"
GROUP_ACTIONS = (GROUP_RUN, GROUP_WAIT, GROUP_LEAVE)
GROUP_STATES = ("waiting", "starting", "serving", "failed", "stopped")

# The largest frame either side sends or accepts. The transport enforces the
# same limit (ZMQ_MAXMSGSIZE), so an oversized frame never reaches Python.
MAX_FRAME_BYTES = 1 << 20

# What one frame may hold (docs/protocol.md §4.6), sized from what an honest
# peer sends: a frame that unpacks into a million values, or a lease listing a
# million request ids, is refused while it is being unpacked, before it costs
# the receiver more than a few hundred kilobytes. MAX_VALUES counts array items
# and map entries (keys and values) at every depth.
MAX_VALUES = 20_000
DEFAULT_LIMITS: dict[str, int] = {
    "str": 256,                  # characters
    "bin": MAX_FRAME_BYTES,      # bytes
    "list": 64,                  # items
    "map": 64,                   # entries at its own level (deeper ones count in MAX_VALUES)
}


# The most frames one ``batch`` carries (docs/protocol.md §4.8): what a router reads of one
# ZeroMQ message before it may yield to other work (xim_router.mesh.RECEIVE_BATCH).
MAX_BATCH_FRAMES = 256


def at_most(limit: int) -> dict[str, int]:
    """Field metadata: this field's limit, where the default of its wire type does not fit."""
    return {"limit": limit}

AGENT = "agent"
ROUTER = "router"
BOTH = (AGENT, ROUTER)


class ProtocolError(Exception):
    """A frame that does not follow docs/protocol.md.

    ``code`` is one of PROTOCOL_ERROR_CODES; ``detail`` says what exactly
    (which field, what was expected) and never echoes a secret value.
    """

    def __init__(self, code: str, detail: str):
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


PROTOCOL_ERROR_CODES = ("malformed", "too_large", "unsupported_version", "unknown_type",
                        "unexpected_type")


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Model:
    """One model the agent serves, and how far along it is."""

    name: str
    state: str                       # loading | ready | failed | stopped
    max_model_len: int | None = None


@dataclass(frozen=True)
class Usage:
    """OpenAI token usage of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class GroupStatus:
    """An agent's report of its part in a group (revision 1.4), carried in its leases."""

    group: str
    epoch: int                       # the epoch of the assignment this report is about
    rank: int
    state: str                       # GROUP_STATES
    fabric_address: str | None = None     # where the other members reach this agent's engine
    fabric_port: int | None = None        # the master port its engine listens on when it leads
    engine_version: str | None = None     # the vLLM version of its engine environment
    model_ready: bool | None = None       # the group's model is complete in its cache
    detail: str | None = field(default=None, metadata=at_most(1024))


RECORDS: dict[str, type] = {"Model": Model, "Usage": Usage, "GroupStatus": GroupStatus}


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """Base of every message; ``TYPE`` is its wire name, ``SENDERS`` who may send it."""

    TYPE: ClassVar[str] = ""
    SENDERS: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    SENDERS: ClassVar[tuple[str, ...]] = (AGENT,)
    token: str = field(repr=False, metadata=at_most(1024))
    versions: list[int] = field(metadata=at_most(16))
    agent_version: str
    hostname: str = field(metadata=at_most(255))
    capabilities: list[str] = field(metadata=at_most(32))
    hardware: dict
    models: list[Model]
    max_concurrent: int


@dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    SENDERS: ClassVar[tuple[str, ...]] = (ROUTER,)
    version: int
    session: str
    router_version: str
    lease_interval_s: float
    lease_timeout_s: float
    max_frame_bytes: int
    capabilities: list[str] = field(metadata=at_most(32))
    assigned_model: str | None = None


@dataclass(frozen=True)
class Reject(Message):
    TYPE: ClassVar[str] = "reject"
    SENDERS: ClassVar[tuple[str, ...]] = (ROUTER,)
    code: str
    message: str = field(metadata=at_most(1024))
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Lease(Message):
    TYPE: ClassVar[str] = "lease"
    SENDERS: ClassVar[tuple[str, ...]] = (AGENT,)
    seq: int
    running: int
    waiting: int
    kv_cache_usage: float
    engine_state: str
    models: list[Model]
    in_flight: list[str] = field(metadata=at_most(4096))
    max_concurrent: int
    draining: bool
    group: GroupStatus | None = None     # revision 1.4: its part in a group, if it has one


@dataclass(frozen=True)
class LeaseAck(Message):
    TYPE: ClassVar[str] = "lease_ack"
    SENDERS: ClassVar[tuple[str, ...]] = (ROUTER,)
    seq: int
    stale: list[str] | None = field(default=None, metadata=at_most(4096))


@dataclass(frozen=True)
class Group(Message):
    """The router's assignment of an agent to a group (revision 1.4): its part, and what to do now."""

    TYPE: ClassVar[str] = "group"
    SENDERS: ClassVar[tuple[str, ...]] = (ROUTER,)
    group: str
    epoch: int
    action: str                      # GROUP_ACTIONS
    model: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    rank: int
    size: int
    leader_address: str | None = None   # required with action run
    leader_port: int | None = None      # required with action run
    reason: str | None = field(default=None, metadata=at_most(1024))


@dataclass(frozen=True)
class Infer(Message):
    TYPE: ClassVar[str] = "infer"
    SENDERS: ClassVar[tuple[str, ...]] = (ROUTER,)
    id: str
    model: str
    endpoint: str                    # chat.completions | completions | embeddings (1.2)
    body: bytes
    stream: bool
    deadline_s: float
    credit: int


@dataclass(frozen=True)
class Chunk(Message):
    TYPE: ClassVar[str] = "chunk"
    SENDERS: ClassVar[tuple[str, ...]] = (AGENT,)
    id: str
    seq: int
    data: list[bytes] = field(metadata=at_most(8192))


@dataclass(frozen=True)
class Done(Message):
    TYPE: ClassVar[str] = "done"
    SENDERS: ClassVar[tuple[str, ...]] = (AGENT,)
    id: str
    finish_reason: str | None = None
    usage: Usage | None = None
    body: bytes | None = None


@dataclass(frozen=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    SENDERS: ClassVar[tuple[str, ...]] = BOTH
    code: str
    message: str = field(metadata=at_most(65536))    # an engine's own error text
    retryable: bool
    http_status: int
    id: str | None = None


@dataclass(frozen=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    SENDERS: ClassVar[tuple[str, ...]] = (ROUTER,)
    id: str
    reason: str | None = None


@dataclass(frozen=True)
class Credit(Message):
    TYPE: ClassVar[str] = "credit"
    SENDERS: ClassVar[tuple[str, ...]] = (ROUTER,)
    id: str
    n: int


@dataclass(frozen=True)
class Drain(Message):
    TYPE: ClassVar[str] = "drain"
    SENDERS: ClassVar[tuple[str, ...]] = (AGENT,)
    reason: str


@dataclass(frozen=True)
class DrainAck(Message):
    TYPE: ClassVar[str] = "drain_ack"
    SENDERS: ClassVar[tuple[str, ...]] = (ROUTER,)
    in_flight: int


@dataclass(frozen=True)
class Bye(Message):
    TYPE: ClassVar[str] = "bye"
    SENDERS: ClassVar[tuple[str, ...]] = BOTH
    reason: str


@dataclass(frozen=True)
class Batch(Message):
    """Several frames in one ZeroMQ message (revision 1.3, docs/protocol.md §4.8): each item
    is a whole frame, encoded as it would travel alone, and is decoded like one."""

    TYPE: ClassVar[str] = "batch"
    SENDERS: ClassVar[tuple[str, ...]] = (AGENT,)
    frames: list[bytes] = field(metadata=at_most(MAX_BATCH_FRAMES))


MESSAGES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Reject, Lease, LeaseAck, Group, Infer, Chunk, Done,
                              Error, Cancel, Credit, Drain, DrainAck, Bye, Batch)
}
# What a batch may not carry: a hello opens a session on its own connection, and a batch
# inside a batch would multiply what one message may cost.
NOT_BATCHED = frozenset({Hello.TYPE, Batch.TYPE})


# ---------------------------------------------------------------- error codes


@dataclass(frozen=True)
class ErrorCode:
    code: str
    retryable: bool
    http_status: int
    meaning: str


# The codes an ``error`` or ``reject`` carries (docs/protocol.md §6).
ERROR_CODES: dict[str, ErrorCode] = {e.code: e for e in (
    ErrorCode("bad_request", False, 400, "the OpenAI body is not acceptable to the engine"),
    ErrorCode("model_not_found", False, 404, "the agent does not serve that model"),
    ErrorCode("at_capacity", True, 429, "max_concurrent requests already running"),
    ErrorCode("draining", True, 503, "the agent is draining and takes no new work"),
    ErrorCode("engine_unavailable", True, 503, "the engine is not running or not healthy"),
    ErrorCode("agent_unavailable", True, 503, "the agent's link went away mid-request (router side)"),
    ErrorCode("timeout", True, 504, "the deadline passed before the request finished"),
    ErrorCode("cancelled", False, 499, "the request was cancelled"),
    ErrorCode("internal", False, 500, "an unexpected failure on the sender"),
    ErrorCode("malformed", False, 400, "a frame that does not follow this document"),
    ErrorCode("too_large", False, 413, "a frame over max_frame_bytes or a limit of §4.6"),
    ErrorCode("rate_limited", True, 429, "more unsolicited frames than the receiver takes: the excess is dropped"),
    ErrorCode("unsupported_version", False, 400, "no protocol version in common"),
    ErrorCode("unknown_type", False, 400, "a message type this side does not know"),
    ErrorCode("unexpected_type", False, 400, "a message the sender's role may not send"),
    ErrorCode("unauthorized", False, 401, "hello's token is not valid for this CURVE key"),
    ErrorCode("token_expired", True, 401, "hello's token has expired: refresh it, then hello again"),
    ErrorCode("revoked", False, 401, "the agent's identity was revoked: enroll again"),
    ErrorCode("no_session", True, 409, "a message before hello/welcome: send hello"),
)}


def error_for(code: str, message: str, *, request_id: str | None = None) -> Error:
    """An ``error`` message with the retryable flag and HTTP hint of ``code``."""
    spec = ERROR_CODES[code]
    return Error(code=code, message=message, retryable=spec.retryable,
                 http_status=spec.http_status, id=request_id)


# ---------------------------------------------------------------- schema


@dataclass(frozen=True)
class FieldSpec:
    name: str
    wire_type: str          # str int float bool bin map list[T] or a record name
    required: bool
    limit: int | None = None     # set where DEFAULT_LIMITS of its wire type does not apply


_SCALARS = {str: "str", int: "int", float: "float", bool: "bool", bytes: "bin", dict: "map"}


def _wire_type(hint: Any) -> tuple[str, bool]:
    """Map a type hint to (wire type name, required)."""
    args = typing.get_args(hint)
    if type(None) in args:                               # X | None: optional
        inner = [a for a in args if a is not type(None)]
        return _wire_type(inner[0])[0], False
    if typing.get_origin(hint) is list:
        return f"list[{_wire_type(args[0])[0]}]", True
    if hint in _SCALARS:
        return _SCALARS[hint], True
    if isinstance(hint, type) and hint.__name__ in RECORDS:
        return hint.__name__, True
    raise TypeError(f"no wire type for {hint!r}")


def _schema(cls: type) -> tuple[FieldSpec, ...]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        wire, required = _wire_type(hints[f.name])
        specs.append(FieldSpec(f.name, wire, required, f.metadata.get("limit")))
    return tuple(specs)


SCHEMAS: dict[str, tuple[FieldSpec, ...]] = {
    **{name: _schema(cls) for name, cls in MESSAGES.items()},
    **{name: _schema(cls) for name, cls in RECORDS.items()},
}


def catalogue() -> dict[str, list[tuple[str, str, bool]]]:
    """Every message and record as ``{name: [(field, wire type, required)]}``."""
    return {name: [(s.name, s.wire_type, s.required) for s in specs]
            for name, specs in SCHEMAS.items()}


def field_limits() -> dict[str, int]:
    """The fields whose limit is not their wire type's default, as ``{"message.field": limit}``."""
    return {f"{name}.{s.name}": s.limit for name, specs in SCHEMAS.items()
            for s in specs if s.limit is not None}


# ---------------------------------------------------------------- validation
#
# Each wire type compiles once into a checker: value -> Python value, raising
# ProtocolError. Encoding uses the same checkers in the other direction
# (records become maps), so both sides enforce one schema at the cost of a
# few isinstance() calls per field.

_PY_TYPES = {"str": str, "bin": bytes, "map": dict}


def _describe(value: Any) -> str:
    return type(value).__name__


def _wrong(where: str, name: str, wire_type: str, value: Any) -> ProtocolError:
    return ProtocolError("malformed", f"{where}.{name}: expected {wire_type}, got {_describe(value)}")


def _too_long(where: str, name: str, size: int, limit: int, unit: str) -> ProtocolError:
    return ProtocolError("too_large", f"{where}.{name}: {size} {unit}, at most {limit}")


def _checker(wire_type: str, encoding: bool, limit: int | None = None):
    """A function (value, where, name) -> converted value for ``wire_type``.

    ``where`` and ``name`` place the field in the message for an error ("chunk" and
    "data"); they are joined only then, since a frame's fields almost always pass.

    Decoding also holds sized values to ``limit`` (or their type's default):
    our own output is trusted to stay within them, a peer's is not.
    """
    if wire_type == "int":
        def check(value, where, name):
            if type(value) is int or (isinstance(value, int) and not isinstance(value, bool)):
                return value
            raise _wrong(where, name, wire_type, value)
    elif wire_type == "float":
        def check(value, where, name):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise _wrong(where, name, wire_type, value)
    elif wire_type == "bool":
        def check(value, where, name):
            if isinstance(value, bool):
                return value
            raise _wrong(where, name, wire_type, value)
    elif wire_type == "map":
        most = _limit("map", limit, encoding)

        def check(value, where, name):
            if not isinstance(value, dict):
                raise _wrong(where, name, wire_type, value)
            if len(value) > most:
                raise _too_long(where, name, len(value), most, "entries")
            if not all(isinstance(k, str) for k in value):
                raise ProtocolError("malformed", f"{where}.{name}: map keys must be strings")
            return value
    elif wire_type in _PY_TYPES:
        py_type = _PY_TYPES[wire_type]
        most = _limit(wire_type, limit, encoding)
        unit = "characters" if wire_type == "str" else "bytes"

        def check(value, where, name):
            if not isinstance(value, py_type):
                raise _wrong(where, name, wire_type, value)
            if len(value) > most:
                raise _too_long(where, name, len(value), most, unit)
            return value
    elif wire_type.startswith("list["):
        inner = _checker(wire_type[5:-1], encoding)
        most = _limit("list", limit, encoding)

        def check(value, where, name):
            if not isinstance(value, list):
                raise _wrong(where, name, wire_type, value)
            if len(value) > most:
                raise _too_long(where, name, len(value), most, "items")
            return [inner(item, where, name) for item in value]
    elif wire_type in RECORDS:
        record = RECORDS[wire_type]

        def check(value, where, name):
            if encoding and isinstance(value, record):
                return _to_map(record, value, f"{where}.{name}")
            if not encoding and isinstance(value, dict):
                return _from_map(record, value, f"{where}.{name}")
            raise _wrong(where, name, wire_type, value)
    else:
        raise TypeError(f"unknown wire type {wire_type}")
    return check


def _limit(kind: str, limit: int | None, encoding: bool) -> float:
    if encoding:
        return math.inf
    return DEFAULT_LIMITS[kind] if limit is None else limit


# Keyed by class: a frame's type is looked up once per field list, never by name.
_DECODERS: dict[type, tuple[tuple[str, Any, bool], ...]] = {}
_ENCODERS: dict[type, tuple[tuple[str, Any, bool], ...]] = {}
for _cls in (*MESSAGES.values(), *RECORDS.values()):
    _specs = SCHEMAS[_cls.TYPE if issubclass(_cls, Message) else _cls.__name__]
    _DECODERS[_cls] = tuple((s.name, _checker(s.wire_type, False, s.limit), s.required) for s in _specs)
    _ENCODERS[_cls] = tuple((s.name, _checker(s.wire_type, True), s.required) for s in _specs)


def _from_map(cls: type, raw: dict, where: str) -> Any:
    kwargs = {}
    for name, check, required in _DECODERS[cls]:
        value = raw.get(name)
        if value is None:                  # absent, or nil: both mean "not given"
            if required:
                raise ProtocolError("malformed", f"{where}.{name}: missing required field")
            continue
        kwargs[name] = check(value, where, name)
    return cls(**kwargs)


def _to_map(cls: type, obj: Any, where: str, out: dict | None = None) -> dict:
    out = {} if out is None else out
    for name, check, required in _ENCODERS[cls]:
        value = getattr(obj, name)
        if value is None:
            if required:
                raise ProtocolError("malformed", f"{where}.{name}: missing required field")
            continue
        out[name] = check(value, where, name)
    return out


# ---------------------------------------------------------------- encode / decode


# One packer for every frame: msgpack.packb builds a new one per call, which costs as
# much as packing a chunk. Sharing it is safe: pack() runs in C without releasing the
# GIL and resets itself after each call.
_PACK = msgpack.Packer(use_bin_type=True).pack


def encode(msg: Message, *, version: int = PROTOCOL_VERSION) -> bytes:
    """One frame for ``msg``. Raises ProtocolError if it breaks the schema or the size limit.

    ``hello`` always travels in a version-1 envelope (see PROTOCOL_VERSIONS).
    Our own output is validated too: a bug here would otherwise be dropped as
    malformed by the peer, far from its cause.
    """
    cls = type(msg)
    if MESSAGES.get(cls.TYPE) is not cls:
        raise ProtocolError("unknown_type", f"{cls.__name__} is not a mesh message")
    envelope = {"v": 1 if cls is Hello else version, "type": cls.TYPE}
    frame = _PACK(_to_map(cls, msg, cls.TYPE, envelope))
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("too_large", f"{cls.TYPE} frame is {len(frame)} bytes, "
                                         f"over the {MAX_FRAME_BYTES}-byte limit")
    return frame


class _OverBudget(Exception):
    pass


class _ValueBudget:
    """Counts the values msgpack builds for one frame and stops it past MAX_VALUES.

    msgpack calls the hooks as each array or map is complete, innermost first,
    so at most MAX_VALUES values and one container's items exist when it stops.
    """

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_VALUES

    def array(self, items: list) -> list:
        self.left -= len(items)
        if self.left < 0:
            raise _OverBudget
        return items

    def map(self, entries: dict) -> dict:
        self.left -= 2 * len(entries)
        if self.left < 0:
            raise _OverBudget
        return entries


def _budget_hooks(frame_bytes: int) -> dict[str, Any]:
    """The counting hooks for a frame that could hold more than MAX_VALUES values.

    Every value counted is encoded in at least one byte of its own, so a frame of at most
    MAX_VALUES bytes cannot overrun the budget: it is unpacked without calling back into
    Python twice per container (most frames, and every chunk of a stream).
    """
    if frame_bytes <= MAX_VALUES:
        return {}
    budget = _ValueBudget()
    return {"list_hook": budget.array, "object_hook": budget.map}


# msgpack's own limits stop a single oversized array or map before it is
# allocated: none may be longer than the longest one a field allows.
_MAX_ARRAY_LEN = max(s.limit or DEFAULT_LIMITS["list"] for specs in SCHEMAS.values()
                     for s in specs if s.wire_type.startswith("list["))
_MAX_MAP_LEN = DEFAULT_LIMITS["map"]


def decode(frame: bytes, *, sender: str | None = None, batched: bool = False) -> Message:
    """The message in ``frame``; ProtocolError for anything else.

    ``sender`` (AGENT or ROUTER), when given, also rejects a message that role
    may not send, e.g. a ``welcome`` from an agent. ``batched``: ``frame`` is an item
    of a ``batch``, which may not be a hello or a batch (NOT_BATCHED).
    """
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("too_large", f"frame is {len(frame)} bytes, over {MAX_FRAME_BYTES}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True,
                              max_array_len=_MAX_ARRAY_LEN, max_map_len=_MAX_MAP_LEN,
                              max_ext_len=0,      # no extension types in this protocol
                              **_budget_hooks(len(frame)))
    except _OverBudget:
        raise ProtocolError("too_large", f"frame holds more than {MAX_VALUES} values") from None
    except ValueError as exc:
        if "exceeds max_" in str(exc):   # msgpack's "N exceeds max_array_len(M)"
            raise ProtocolError("too_large", f"frame holds more values in one array, map or "
                                             f"string than any field allows: {exc}") from None
        raise ProtocolError("malformed", f"not one MessagePack value ({type(exc).__name__})") from None
    except Exception as exc:   # arbitrary bytes: msgpack raises several unrelated types
        raise ProtocolError("malformed", f"not one MessagePack value ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise ProtocolError("malformed", f"frame is a {_describe(raw)}, not a map")
    version, kind = raw.get("v"), raw.get("type")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("malformed", "envelope field v: missing or not an int")
    if version not in PROTOCOL_VERSIONS:
        raise ProtocolError("unsupported_version",
                            f"frame version {version}, this side speaks {list(PROTOCOL_VERSIONS)}")
    if not isinstance(kind, str):
        raise ProtocolError("malformed", "envelope field type: missing or not a string")
    cls = MESSAGES.get(kind)
    if cls is None:
        raise ProtocolError("unknown_type", f"unknown message type {kind[:40]!r}")
    if sender is not None and sender not in cls.SENDERS:
        raise ProtocolError("unexpected_type", f"{kind} is not sent by the {sender}")
    if batched and kind in NOT_BATCHED:
        raise ProtocolError("unexpected_type", f"a {kind} inside a batch")
    return _from_map(cls, raw, kind)


# What a batch adds to its frames, at most: its envelope (a map of three entries, "v" and
# the version, "type" and "batch", "frames" and an array32 header), and a bin32 header
# before each frame.
_BATCH_ENVELOPE_BYTES = 32
_BATCH_ITEM_BYTES = 5


def batched(frames: list[bytes], *, version: int = PROTOCOL_VERSION) -> Iterator[tuple[bytes, int]]:
    """``frames`` (encoded, in order) as ZeroMQ messages: each run of frames that fits in one
    ``batch`` within MAX_FRAME_BYTES and MAX_BATCH_FRAMES goes as one, a frame that shares
    with none goes alone, as it is. Each message comes with the number of frames it carries.

    Lazily, so that a sender stopped by a full queue packs no more than it sends. One
    msgpack call per batch: the frames are copied in as ``bin``, never unpacked.
    """
    start, count = 0, len(frames)
    while start < count:
        size, end = _BATCH_ENVELOPE_BYTES, start
        while end < count and end - start < MAX_BATCH_FRAMES:
            size += len(frames[end]) + _BATCH_ITEM_BYTES
            if size > MAX_FRAME_BYTES:
                break
            end += 1
        if end - start < 2:
            yield frames[start], 1
            start += 1
        else:
            yield _PACK({"v": version, "type": Batch.TYPE, "frames": frames[start:end]}), end - start
            start = end
