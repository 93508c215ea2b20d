"""What the fuzz tests share: hypothesis settings with recorded seeds, strategies for
mesh frames built from the codec's own catalogue, and a count of the cases run.

Seeds: every fuzz test runs derandomized (the seed is a function of the test's name,
so CI runs the same cases every time and a failure reproduces by running the test
again) with the example database off. To explore new cases, set XIM_FUZZ_SEED to an
integer; the seed is printed with the case counts at the end of each module:

    XIM_FUZZ_SEED=12345 pytest -s tests/security/test_fuzz_codec.py
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import msgpack
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st

from xim_proto import codec

SEED = os.environ.get("XIM_FUZZ_SEED", "")
HOSTILE_MARKER = b"\x00xim-fuzz-splice\x00"

# Cases run, per module and kind, for the report printed at the end of each module.
CASES: Counter[str] = Counter()


def fuzz_settings(max_examples: int):
    """Derandomized unless XIM_FUZZ_SEED is set; no database; no deadline (2 shared cores)."""
    def apply(test):
        configured = settings(max_examples=max_examples, derandomize=not SEED, database=None,
                              deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much])(test)
        return seed(int(SEED))(configured) if SEED else configured
    return apply


def seed_note() -> str:
    return f"seed {SEED} (XIM_FUZZ_SEED)" if SEED else "derandomized (seed from each test's name)"


# ---------------------------------------------------------------- values


HUGE_INTS = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -(2**63), -1, 0, 10**18])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), HUGE_INTS,
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.binary(max_size=40))
# Anything MessagePack can carry, keys included (int and bin keys too: the codec wants str).
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=8), st.integers(-5, 5)),
                      inner, max_size=4),
    max_leaves=20)


# A free-form ``map`` field's contents: anything, with string keys at every level
# (docs/protocol.md §4.3: map keys are strings).
FREE_FORM = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


def valid_value(wire_type: str) -> st.SearchStrategy[Any]:
    """A value of ``wire_type`` (docs/protocol.md §4.4) as it travels."""
    simple: dict[str, st.SearchStrategy[Any]] = {
        "str": st.text(max_size=40),
        "int": st.integers(-(2**63), 2**64 - 1),
        "float": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**53), 2**53)),
        "bool": st.booleans(),
        "bin": st.binary(max_size=64),
        "map": st.dictionaries(st.text(max_size=8), FREE_FORM, max_size=4),
    }
    if wire_type in simple:
        return simple[wire_type]
    if wire_type.startswith("list["):
        return st.lists(valid_value(wire_type[5:-1]), max_size=4)
    return valid_map(wire_type)


def valid_map(name: str) -> st.SearchStrategy[dict]:
    """Every field of record or message ``name``: required ones always, optional ones maybe."""
    required, optional = {}, {}
    for field_name, wire_type, is_required in codec.catalogue()[name]:
        (required if is_required else optional)[field_name] = valid_value(wire_type)
    return st.fixed_dictionaries(required, optional=optional)


HOSTILE_VALUE = st.one_of(ANY_VALUE, HUGE_INTS, st.just(HOSTILE_MARKER))


@st.composite
def hostile_frame(draw, name: str) -> bytes:
    """A frame of message ``name``: each field valid or hostile or missing, unknown fields,
    a tampered envelope now and then, and a deeply nested value spliced in now and then."""
    fields = {}
    for field_name, wire_type, _ in codec.catalogue()[name]:
        fate = draw(st.integers(0, 15))            # of 16: 1 missing, 2 hostile, 13 valid
        if fate == 0:
            continue
        fields[field_name] = draw(HOSTILE_VALUE if fate <= 2 else valid_value(wire_type))
    unknown = draw(st.dictionaries(st.text(max_size=12), ANY_VALUE, max_size=3))
    tamper = draw(st.integers(0, 9))               # the envelope is tampered with 1 time in 5
    envelope = {"v": draw(SCALARS) if tamper == 1 else codec.PROTOCOL_VERSION,
                "type": draw(st.sampled_from(sorted(codec.MESSAGES)) | SCALARS) if tamper == 2 else name}
    frame = msgpack.packb({**unknown, **fields, **envelope}, use_bin_type=True)
    marker = msgpack.packb(HOSTILE_MARKER, use_bin_type=True)
    if marker in frame:
        depth = draw(st.integers(1, 200_000))
        frame = frame.replace(marker, b"\x91" * depth + b"\xc0", 1)   # [[[...[nil]...]]]
    return frame


ANY_MESSAGE_TYPE = st.sampled_from(sorted(codec.MESSAGES))


@st.composite
def hostile_batch(draw) -> bytes:
    """A ``batch`` (revision 1.3) of hostile frames of any type, a hello or another batch among
    them now and then, and arbitrary bytes; its own envelope as valid as a peer's would be."""
    items = draw(st.lists(ANY_MESSAGE_TYPE.flatmap(hostile_frame) | st.binary(max_size=64), max_size=4))
    return msgpack.packb({"v": codec.PROTOCOL_VERSION, "type": codec.Batch.TYPE, "frames": items},
                         use_bin_type=True)
