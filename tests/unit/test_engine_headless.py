"""The follower entry's version pin (ximd/engine/headless.py), without vLLM."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ximd.engine import headless


@pytest.mark.parametrize(("text", "parsed"), [
    ("0.32.0", (0, 32, 0)), ("0.32.1rc1+cpu", (0, 32, 1)), ("0.32", (0, 32)),
    ("0.33.0.dev12+g1234", (0, 33, 0)), ("dev", ()), ("", ())])
def test_version_tuple(text, parsed):
    assert headless.version_tuple(text) == parsed


@pytest.mark.parametrize("version", ["0.32.0", "0.32.4", "0.32.1rc1+cpu"])
def test_tested_versions_run(version):
    assert headless.unsupported(version) is None


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "1.0.0", "dev"])
def test_other_versions_are_refused_with_what_to_do(version):
    reason = headless.unsupported(version)
    assert reason and f"vLLM {version}" in reason and "0.32" in reason and "every member" in reason


def test_the_entry_imports_nothing_but_the_standard_library_at_its_top():
    """It runs in the engine's environment, where ximd is not installed."""
    tree = ast.parse(Path(headless.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "os", "sys"}
