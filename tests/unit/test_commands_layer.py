"""Only the command layer prints or parses argv; the modules below it return values.

ximd/cli.py and xim_router/cli.py are the argparse front doors, ximd/commands/
shows what `ximd`'s commands did and picks their exit status. Everywhere else a
use of the builtin `print` or an import of `argparse` is a layering mistake, and
so is importing the command layer from below it. Strings that merely contain
"print" (code handed to `python -c`) are not uses: the check reads the syntax
tree, not the text.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.unit.test_import_rules import imported_modules, within

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ximd", "xim_router", "xim_proto")

# Paths relative to the repository root; a trailing "/" takes the whole folder.
COMMAND_LAYER = ("ximd/cli.py", "ximd/commands/", "xim_router/cli.py")

# (module a domain module may not import, why)
FORBIDDEN_IMPORTS = [
    ("argparse", "argv is parsed by the front door (ximd/cli.py, xim_router/cli.py)"),
    ("ximd.commands", "the command layer sits above the domain: it calls down, never the reverse"),
    ("xim_router.cli", "the router's CLI sits above its modules: it calls down, never the reverse"),
]


def in_command_layer(relative: str) -> bool:
    return any(relative.startswith(entry) if entry.endswith("/") else relative == entry
               for entry in COMMAND_LAYER)


def offences(path: Path, root: Path = ROOT) -> list[str]:
    """What `path` does that only the command layer may: use print, import argparse or the layer."""
    relative = path.relative_to(root).as_posix()
    if in_command_layer(relative):
        return []
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = sorted(node.lineno for node in ast.walk(tree)
                   if isinstance(node, ast.Name) and node.id == "print" and isinstance(node.ctx, ast.Load))
    found = [f"{relative}:{line}: uses print (the command layer prints)" for line in lines]
    imported = imported_modules(path, root)
    found += [f"{relative}: imports {forbidden}: {why}"
              for forbidden, why in FORBIDDEN_IMPORTS if any(within(name, forbidden) for name in imported)]
    return found


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_only_the_command_layer_prints_or_parses_argv():
    assert [o for path in sources() for o in offences(path)] == []


def plant(root: Path, module: str, source: str) -> Path:
    """Write `source` as `module` under a throwaway tree `root`."""
    path = root / module
    path.parent.mkdir(parents=True)
    path.write_text(source)
    return path


@pytest.mark.parametrize("module, source, expected", [
    ("ximd/fake.py", "def f():\n    print('hello')\n", "ximd/fake.py:2: uses print"),
    ("xim_router/fake.py", "announce = print\n", "xim_router/fake.py:1: uses print"),
    ("ximd/engine/fake.py", "def f():\n    import argparse\n", "ximd/engine/fake.py: imports argparse"),
    ("xim_router/fake.py", "from argparse import Namespace\n", "xim_router/fake.py: imports argparse"),
    ("ximd/fake.py", "from ximd.commands import plan\n", "ximd/fake.py: imports ximd.commands"),
    ("ximd/fake.py", "from ximd import commands\n", "ximd/fake.py: imports ximd.commands"),
    ("xim_router/fake.py", "from . import cli\n", "xim_router/fake.py: imports xim_router.cli"),
])
def test_a_violation_is_caught(tmp_path, module, source, expected):
    # The checker must be able to fail: plant a violation in a throwaway tree.
    found = offences(plant(tmp_path, module, source), root=tmp_path)
    assert any(o.startswith(expected) for o in found), found


@pytest.mark.parametrize("module, source", [
    ("ximd/fake.py", 'PROBE = "import vllm, sys; print(vllm.__version__)"\n'),   # code for `python -c`
    ("ximd/fake.py", "import sys\nsys.stdin.read()\n"),
    ("ximd/cli.py", "import argparse\nprint(argparse.ArgumentParser())\n"),
    ("ximd/commands/fake.py", "import sys\nprint('x', file=sys.stderr)\n"),
    ("xim_router/cli.py", "from argparse import ArgumentParser\nprint(ArgumentParser)\n"),
])
def test_what_is_allowed_passes(tmp_path, module, source):
    assert offences(plant(tmp_path, module, source), root=tmp_path) == []
