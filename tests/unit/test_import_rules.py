"""The import arrows docs/architecture.md draws, enforced.

Each rule names a package (or module) and what it may not import, directly or
through a function-level import. A new module lands where the structure says
or this test says why not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (importer prefix, forbidden prefix, why)
RULES = [
    ("xim_proto", "ximd", "the shared vocabulary is owned by neither program"),
    ("xim_proto", "xim_router", "the shared vocabulary is owned by neither program"),
    ("xim_router", "ximd", "the router is a program of its own: it shares only xim_proto"),
    ("ximd", "xim_router", "the node never needs the router's code"),
    ("ximd.mesh", "ximd.enrollment", "the link renews tokens through ximd.identity.TokenRefresher"),
    ("ximd.engine", "ximd.autoconfig", "the engine runs a launch it is given; planning is above it"),
    ("ximd.engine", "ximd.preparation", "the engine runs a launch it is given; planning is above it"),
    ("ximd.engine", "ximd.node", "the engine knows nothing of the node that owns it"),
    ("ximd.engine", "ximd.mesh", "the engine knows nothing of the router"),
    ("ximd.identity", "ximd.enrollment", "the identity sits below enrollment"),
    ("ximd.identity", "ximd.mesh", "the identity sits below the link"),
    ("ximd.serve", "ximd.mesh", "the bridge speaks codec messages; the link is the node's business"),
    ("ximd.config", "ximd", "configuration is the bottom of the agent: it imports none of it"),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (function-level imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def sources() -> list[Path]:
    return sorted(p for pkg in ("ximd", "xim_router", "xim_proto") for p in (ROOT / pkg).rglob("*.py"))


def violations(files: list[Path], root: Path = ROOT) -> list[str]:
    found = []
    for path in files:
        importer = module_name(path, root)
        for imported in imported_modules(path, root):
            for owner, forbidden, why in RULES:
                if within(importer, owner) and within(imported, forbidden) and not within(imported, owner):
                    found.append(f"{importer} imports {imported}: {why}")
    return sorted(set(found))


def test_the_tree_follows_the_import_rules():
    assert violations(sources()) == []


@pytest.mark.parametrize("importer, source, expected", [
    ("xim_router/fake.py", "from ximd.mesh import link\n", "xim_router.fake imports ximd.mesh"),
    ("ximd/mesh/fake.py", "def f():\n    from ximd.enrollment import refresh\n",
     "ximd.mesh.fake imports ximd.enrollment"),
    ("ximd/engine/fake.py", "from ..autoconfig import Plan\n", "ximd.engine.fake imports ximd.autoconfig"),
    ("xim_proto/fake.py", "import ximd\n", "xim_proto.fake imports ximd"),
])
def test_a_forbidden_import_is_caught(tmp_path, importer, source, expected):
    # The checker must be able to fail: plant a forbidden import in a throwaway tree.
    path = tmp_path / importer
    path.parent.mkdir(parents=True)
    path.write_text(source)
    found = violations([path], root=tmp_path)
    assert any(v.startswith(expected) for v in found), found
