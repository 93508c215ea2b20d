"""Every TOML value ximd writes (tomli-w underneath) reads back equal with tomllib.

Policy on what TOML cannot or need not hold: text is Unicode scalar values (a lone
surrogate has no UTF-8 form, so no TOML file holds one); integers are 64-bit, as TOML
says; inf and nan are written as TOML's own `inf`/`nan` and read back, although a
configuration never holds them (ximd.config refuses non-finite numbers).
"""

from __future__ import annotations

import math
import tomllib

import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from ximd import cli
from ximd.commands.config import render_config
from ximd.config import load
from ximd.configdoc import literal

TEXT = st.text(st.characters(blacklist_categories=("Cs",)))   # astral and control characters included
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SCALARS = TEXT | INT64 | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5), max_leaves=12)


def same(a, b) -> bool:
    """Equality where nan equals nan and an int stays an int."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


@given(VALUES)
def test_every_literal_reads_back_equal(value):
    text = f"v = {literal(value)}\n"
    assert same(tomllib.loads(text)["v"], value), text


def test_astral_and_control_characters():
    """The old writer escaped 😀 as a surrogate pair (JSON's way), which tomllib refuses."""
    assert tomllib.loads(f"v = {literal('😀')}")["v"] == "😀"
    controls = "a\x00b\x1f\x7f\u2028"
    assert tomllib.loads("v = " + literal(controls))["v"] == controls


@settings(max_examples=60, deadline=None)
@given(served=TEXT, extra=st.lists(TEXT, max_size=4),
       grace=st.floats(min_value=1e-9, max_value=1e12, allow_nan=False, allow_infinity=False),
       chunk=st.integers(min_value=1, max_value=2**63 - 1),
       utilisation=st.floats(min_value=1e-6, max_value=1.0), metrics=st.booleans())
def test_config_show_reads_back_equal(tmp_path_factory, served, extra, grace, chunk, utilisation, metrics):
    """config show's TOML (with --origin comments) parses to the effective values."""
    path = tmp_path_factory.mktemp("cfg") / "agent.toml"
    path.write_text(tomli_w.dumps({
        "agent": {"drain_grace_s": grace},
        "engine": {"served_model_name": served, "extra_args": extra, "gpu_memory_utilization": utilisation},
        "lmcache": {"chunk_size": chunk},
        "metrics": {"enabled": metrics},
    }), encoding="utf-8")
    cfg = load(path, env={})
    for origin in (False, True):
        shown = tomllib.loads(render_config(cfg, origin=origin, fmt="toml"))
        assert shown["engine"]["served_model_name"] == served
        assert shown["engine"]["extra_args"] == extra
        assert shown["agent"]["drain_grace_s"] == grace
        assert shown["engine"]["gpu_memory_utilization"] == utilisation
        assert shown["lmcache"]["chunk_size"] == chunk
        assert shown["metrics"]["enabled"] is metrics


def test_config_show_on_the_command_line(tmp_path, capsys, monkeypatch):
    """The issue's case end to end, from a directory whose name a comment cannot hold."""
    monkeypatch.delenv("XEROTIER_AGENT_CONFIG", raising=False)
    odd = tmp_path / "line\nbreak"
    odd.mkdir()
    path = odd / "agent.toml"
    path.write_text(tomli_w.dumps({"engine": {"served_model_name": "😀 \x01 \"quoted\""}}), encoding="utf-8")
    assert cli.main(["config", "show", "--origin", "--config", str(path)]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["engine"]["served_model_name"] == "😀 \x01 \"quoted\""
    assert shown["agent"]["log_level"] == "info"
