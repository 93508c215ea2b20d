"""Finding 10: the engine installer must not let a public upload replace a package of the
ROCm index (dependency confusion through --extra-index-url).

Two local PEP 503 indexes stand in for the real ones: a "vendor" index (vLLM's ROCm
wheels) with the engine and a kernel package that exists only there, and the default
index (PyPI) with the engine's ordinary dependency and a hostile upload of the kernel
package's name and version (pip breaks the tie for the default index). The pin file is written in the shipped ROCm pins'
style (whatever index option packaging/engine/requirements-rocm.txt uses), pointing at
the vendor index; the real xerotier-engine-install builds the venv. The kernel package
must come from the vendor index, and the engine's public dependency from the default one.
"""

from __future__ import annotations

import os
import re
import subprocess
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "packaging/engine/xerotier-engine-install"
SHIPPED_ROCM_PINS = REPO / "packaging/engine/requirements-rocm.txt"
INSTALL_TIMEOUT_S = 300


def wheel(index: Path, name: str, version: str, modules: dict[str, str], requires: tuple[str, ...] = ()) -> None:
    """A pure-Python wheel of ``name`` in the simple index at ``index``."""
    project = index / name.replace("_", "-")
    project.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}"
    path = project / f"{dist}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + \
        "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        for module, source in modules.items():
            zf.writestr(module, source)
        zf.writestr(f"{dist}.dist-info/METADATA", metadata)
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    (project / "index.html").write_text(
        "".join(f'<a href="{w.name}">{w.name}</a>\n' for w in sorted(project.glob("*.whl"))))


def shipped_index_option() -> str:
    match = re.search(r"^\s*(--(?:extra-)?index-url)\b", SHIPPED_ROCM_PINS.read_text(), re.MULTILINE)
    assert match, f"{SHIPPED_ROCM_PINS} names no index"
    return match.group(1)


def install_from(tmp_path: Path, vendor: Path, public: Path, pins_text: str) -> Path:
    """Run the real installer with ``public`` as the default index; the new engine's prefix."""
    pins = tmp_path / "requirements-rocm.txt"
    pins.write_text(f"{shipped_index_option()} {vendor.as_uri()}\n{pins_text}")
    # Only these two indexes: none of this machine's pip configuration.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=public.as_uri(), PIP_NO_CACHE_DIR="1")
    prefix = tmp_path / "engine"
    done = subprocess.run([str(INSTALLER), "--flavor", "cuda", "--prefix", str(prefix), "--requirements", str(pins)],
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr
    return prefix


def origin_of(prefix: Path, module: str) -> str:
    done = subprocess.run([str(prefix / "bin/python"), "-c", f"import {module}; print({module}.ORIGIN)"],
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or done.stderr


def vendor_engine(vendor: Path) -> None:
    wheel(vendor, "fake_engine", "1.0+rocm700", {
        "vllm/__init__.py": "", "vllm/entrypoints/__init__.py": "",
        "vllm/entrypoints/openai/__init__.py": "", "vllm/entrypoints/openai/api_server.py": ""},
        requires=("rocm_kernels", "plain_dep"))
    wheel(vendor, "rocm_kernels", "1.0+rocm700", {"rocm_kernels.py": "ORIGIN = 'vendor'\n"})


def test_the_vendor_index_supplies_only_the_pinned_packages(tmp_path):
    """The vendor index (an HTTP server outside PyPI) offers a newer build of an ordinary
    dependency: it must not replace PyPI's for anything the pin file does not name."""
    vendor, public = tmp_path / "vendor", tmp_path / "public"
    vendor_engine(vendor)
    wheel(vendor, "plain_dep", "99.0", {"plain_dep.py": "ORIGIN = 'vendor index overreach'\n"})
    wheel(public, "plain_dep", "1.0", {"plain_dep.py": "ORIGIN = 'default index'\n"})
    prefix = install_from(tmp_path, vendor, public, "fake_engine==1.0+rocm700\nrocm_kernels==1.0+rocm700\n")
    assert origin_of(prefix, "plain_dep") == "default index"
    assert origin_of(prefix, "rocm_kernels") == "vendor"


def test_a_pinned_vendor_package_cannot_be_replaced_from_the_default_index(tmp_path):
    """A higher version of a vendor package's name on the default index (a squat) loses
    to the pin: the pinned packages are fetched from the vendor index alone."""
    vendor, public = tmp_path / "vendor", tmp_path / "public"
    vendor_engine(vendor)
    wheel(public, "rocm_kernels", "99.0", {"rocm_kernels.py": "ORIGIN = 'hostile upload'\n"})
    wheel(public, "plain_dep", "1.0", {"plain_dep.py": "ORIGIN = 'default index'\n"})
    prefix = install_from(tmp_path, vendor, public, "fake_engine==1.0+rocm700\nrocm_kernels==1.0+rocm700\n")
    assert origin_of(prefix, "rocm_kernels") == "vendor"


def test_the_shipped_rocm_pins_name_their_index_with_index_url():
    assert shipped_index_option() == "--index-url"
    options = [line for line in SHIPPED_ROCM_PINS.read_text().splitlines() if line.strip().startswith("-")]
    assert not [line for line in options if "extra-index-url" in line], options
