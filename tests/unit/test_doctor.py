"""ximd doctor: each check's ok/warn/fail boundaries on given facts, the probes that gather
facts (a real interpreter, a real closed port, a real redis-server), and the output shapes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ximd import autoconfig, config, doctor, hardware, tuning
from ximd.commands import doctor as doctor_cmd
from ximd.doctor import GB, GIB, Check, DirState
from ximd.hardware import Gpu, Hardware, Probe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
H100 = hardware.parse_nvidia_query_csv((FIXTURES / "nvidia-h100-driver580/nvidia-smi-query.csv").read_text())[0]
H100_MAJORS = hardware.parse_proc_devices((FIXTURES / "nvidia-h100-driver580/proc-devices.txt").read_text())
MI210 = hardware.parse_amd_smi_static((FIXTURES / "amd-handwritten/amd-smi-static-list-with-warning.txt").read_text())[0]
NO_TOOLS = (Probe("nvidia-smi", False), Probe("amd-smi", False), Probe("rocm-smi", False))


def h100_host(**changes) -> Hardware:
    base = Hardware(gpus=(H100,), ram_bytes=125 * GIB, cpu_count=16, shm_bytes=128 * GIB,
                    device_majors=H100_MAJORS, usable_cpus=tuple(range(16)),
                    probes=(Probe("nvidia-smi", True, None, 1), Probe("amd-smi", False), Probe("rocm-smi", False)))
    return dataclasses.replace(base, **changes)


def cpu_only_host() -> Hardware:
    return Hardware(gpus=(), ram_bytes=24 * GIB, cpu_count=2, shm_bytes=12 * GIB, usable_cpus=(0, 1), probes=NO_TOOLS)


def gpu(mib: int, driver: str = "580.159.04", index: int = 0, vendor: str = "nvidia") -> Gpu:
    return Gpu(index, vendor, "Test GPU", mib, f"GPU-{index}", driver, f"0000:{index:02x}:00.0")


# ---------------------------------------------------------------- GPUs


def test_gpus_on_the_h100_host():
    c = doctor.check_gpus(h100_host())
    assert (c.status, c.detail) == ("ok", "1 × NVIDIA H100 80GB HBM3 (79.6 GiB) via nvidia-smi")


def test_no_gpu_says_so_plainly_and_is_a_warning():
    c = doctor.check_gpus(cpu_only_host())
    assert c.status == "warn"
    assert c.detail == "no GPU found (nvidia-smi/amd-smi not present): ximd will run the CPU engine"


def test_installed_but_failing_gpu_tool_is_a_failure():
    hw = dataclasses.replace(cpu_only_host(), probes=(
        Probe("nvidia-smi", True, "`nvidia-smi` exited 9: NVIDIA-SMI has failed"), Probe("amd-smi", False)))
    c = doctor.check_gpus(hw)
    assert c.status == "fail" and "NVIDIA-SMI has failed" in c.detail and "driver" in c.fix


# The shipped CUDA engine is a CUDA 13 build: NVIDIA's minimum for CUDA 13.x is 580.
@pytest.mark.parametrize("version, status", [("579.99.99", "fail"), ("580.65.06", "ok"), ("580.159.04", "ok"),
                                             ("575.57.08", "fail"), ("570.172.08", "fail"),
                                             ("535.54.03", "fail"), ("525.60.13", "fail"),
                                             ("470.256.02", "fail"), ("unknown", "warn")])
def test_nvidia_driver_boundary(version, status):
    assert doctor.check_driver((gpu(81559, version),)).status == status


def test_the_driver_minimum_is_the_cuda_13_minimum_and_is_said():
    assert (doctor.ENGINE_CUDA_MAJOR, doctor.MIN_NVIDIA_DRIVER) == (13, 580)
    old = doctor.check_driver((gpu(81559, "570.172.08"),))
    assert old.detail == ("NVIDIA driver 570.172.08 is older than 580, the minimum of the CUDA 13 engine "
                          "(xerotier-engine-install --flavor cuda)")
    assert old.fix == "install driver 580 or later (e.g. `apt install nvidia-driver-580`)"
    odd = doctor.check_driver((gpu(81559, "unknown"),))
    assert odd.fix == "check `nvidia-smi`; the CUDA 13 engine needs 580 or later"
    assert "(580+)" in doctor.check_gpus(cpu_only_host()).fix


@pytest.mark.parametrize("fixture, parse", [
    ("nvidia-h100-driver580/nvidia-smi-query.csv", hardware.parse_nvidia_query_csv),
    ("nvidia-h100-driver580/nvidia-smi-q.xml", hardware.parse_nvidia_smi_xml),
    ("nvidia-h200-driver580/nvidia-smi-query-noheader.csv", hardware.parse_nvidia_query_csv),
])
def test_the_captured_580_hosts_pass_the_driver_check(fixture, parse):
    gpus = parse((FIXTURES / fixture).read_text())
    c = doctor.check_driver(gpus)
    assert (c.status, c.detail) == ("ok", "NVIDIA driver 580.159.04 (≥ 580, CUDA 13 engine)")


def test_driver_amd_and_none():
    assert doctor.check_driver((MI210,)) == Check("gpu driver", "ok", "amdgpu 6.3.6 (the seed sets no minimum for AMD)")
    assert doctor.check_driver(()).status == "skip"


@pytest.mark.parametrize("mib, status", [
    (12288, "fail"),    # 12 GB class
    (15000, "fail"),    # 15.7 × 10^9 bytes: under 16 GB
    (15360, "warn"),    # a T4 ("16 GB") reports 15360 MiB = 16.1 × 10^9 bytes: minimum met
    (22888, "warn"),    # 23.99 × 10^9: still under the 24 GB recommended class
    (24576, "ok"),      # RTX 3090 / A30 class
    (81559, "ok"),
    (0, "warn"),        # size not reported
])
def test_vram_boundaries(mib, status):
    assert doctor.check_vram((gpu(mib),)).status == status


def test_vram_one_small_gpu_fails_and_names_the_way_out():
    c = doctor.check_vram((gpu(81559), gpu(8192, index=1)))
    assert c.status == "fail" and "GPU 1 8.6 GB" in c.detail and "cuda_visible_devices" in c.fix


def test_gpu_device_nodes():
    assert doctor.check_gpu_devices(h100_host()).status == "ok"
    no_uvm = {k: v for k, v in H100_MAJORS.items() if k != "nvidia-uvm"}
    c = doctor.check_gpu_devices(h100_host(device_majors=no_uvm))
    assert c.status == "fail" and "nvidia-uvm" in c.detail and "modprobe nvidia-uvm" in c.fix
    amd = Hardware(gpus=(MI210,), ram_bytes=1, cpu_count=1, shm_bytes=1, device_majors={"drm": 226})
    assert doctor.check_gpu_devices(amd).status == "fail"
    assert doctor.check_gpu_devices(cpu_only_host()).status == "skip"


# ---------------------------------------------------------------- RAM, disk, shm, sysctls


@pytest.mark.parametrize("ram, gpu_host, status", [
    (31 * GB, True, "fail"), (31 * GB, False, "warn"),   # the 32 GB minimum is for GPU nodes
    (32 * GB, True, "warn"), (63 * GB, True, "warn"),
    (64 * GB, True, "ok"), (24_684_096 * 1024, False, "warn"),
])
def test_ram_boundaries(ram, gpu_host, status):
    assert doctor.check_ram(ram, gpu_host).status == status


@pytest.mark.parametrize("free, cap, used, status", [
    (99 * GB, 100, 0, "fail"), (100 * GB, 100, 0, "warn"), (500 * GB, 100, 0, "ok"),
    (30 * GB, 20, 0, "warn"),           # a lowered cache cap is honoured
    (10 * GB, 100, 95 * GB, "warn"),    # a cache already near its cap does not need the space again
    (10 * GB, 100, 50 * GB, "fail"),
])
def test_disk_boundaries(free, cap, used, status):
    c = doctor.check_disk(Path("/var/lib/xerotier/models"), free, cap, used)
    assert c.status == status
    if status == "fail":
        assert "model_cache.max_size_gb" in c.fix


def test_disk_unreadable_is_a_failure():
    assert doctor.check_disk(Path("/x"), None, 100).status == "fail"


def test_free_bytes_at_a_path_that_does_not_exist_yet(tmp_path):
    where, free = doctor.free_bytes_at(tmp_path / "not" / "yet")
    assert where == tmp_path and free == os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize


def test_tree_size_counts_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights").write_bytes(b"x" * 100_000)
    assert 100_000 <= doctor.tree_size(tmp_path) < 200_000
    assert doctor.tree_size(tmp_path / "absent") == 0


@pytest.mark.parametrize("shm, params, status", [
    (8 * GIB, None, "ok"), (4 * GIB, None, "warn"), (8 * GIB, 8_000_000_000, "ok"),
    (8 * GIB, 20_000_000_000, "warn"), (16 * GIB, 20_000_000_000, "ok"),
    (16 * GIB, 70_000_000_000, "warn"), (32 * GIB, 70_000_000_000, "ok"), (0, None, "fail"),
])
def test_shm_follows_the_seed_table(shm, params, status):
    assert doctor.check_shm(shm, params).status == status


def test_shm_names_the_model_size():
    assert "a 20.0B-parameter model" in doctor.check_shm(16 * GIB, 20_000_000_000).detail
    assert "a 1.6M-parameter model" in doctor.check_shm(16 * GIB, 1_570_000).detail
    assert "the model's size is unknown" in doctor.check_shm(16 * GIB, None).detail


def test_sysctls_below_the_required_value_warn_with_the_fix():
    low = [tuning.SysctlReading("net.core.rmem_max", 212992, 4194304),
           tuning.SysctlReading("net.core.wmem_max", 4194304, 4194304)]
    c = doctor.check_sysctls(low)
    assert c.status == "warn" and "net.core.rmem_max=212992" in c.detail
    assert "sysctl -w net.core.rmem_max=4194304" in c.fix
    ok = [tuning.SysctlReading(k, 4194304, 4194304) for k in tuning.SOCKET_BUFFER_KEYS]
    assert doctor.check_sysctls(ok).status == "ok"
    unreadable = [tuning.SysctlReading("net.core.rmem_max", None, 4194304)]
    assert doctor.check_sysctls(unreadable).status == "warn"


# ---------------------------------------------------------------- directories


@pytest.mark.parametrize("state, uid, private, status, words", [
    (DirState(False), None, True, "warn", "does not exist yet"),
    (DirState(True, False), None, True, "fail", "not a directory"),
    (DirState(True, True, 0o777, 0), None, False, "fail", "writable by everyone"),
    (DirState(True, True, 0o755, 0), 999, True, "warn", "ximd runs as xerotier"),
    (DirState(True, True, 0o750, 999), 999, True, "warn", "group/others have access"),
    (DirState(True, True, 0o700, 999), 999, True, "ok", "mode 0700"),
    (DirState(True, True, 0o755, 999), 999, False, "ok", "mode 0755"),
    (DirState(True, True, 0o700, 0), None, True, "ok", "owner not checked"),
])
def test_directory_rules(state, uid, private, status, words):
    c = doctor.check_directory("state", Path("/var/lib/xerotier"), state, uid, private)
    assert c.status == status and words in c.detail


def test_dir_state_of_real_paths(tmp_path):
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "f").write_text("")
    assert DirState.of(tmp_path / "d") == DirState(True, True, 0o700, os.getuid())
    assert DirState.of(tmp_path / "f").is_dir is False
    assert DirState.of(tmp_path / "absent") == DirState(False)


# ---------------------------------------------------------------- engine environment


def stand_in_engine(tmp_path: Path, version: str | None) -> Path:
    """An interpreter that can (or cannot) import a `vllm` package of the given version."""
    site = tmp_path / "site"
    if version:
        (site / "vllm").mkdir(parents=True)
        (site / "vllm" / "__init__.py").write_text(f'print("INFO engine banner")\n__version__ = "{version}"\n')
    python = tmp_path / "bin" / "python"
    python.parent.mkdir(exist_ok=True)
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return python


def test_engine_with_vllm_reports_its_version(tmp_path):
    python = stand_in_engine(tmp_path, "0.32.0")
    c = doctor.check_engine(doctor.probe_engine(str(python)), str(python))
    assert c == Check("engine", "ok", f"vLLM 0.32.0 in {python}")


def test_engine_without_vllm_fails_and_says_why(tmp_path):
    python = stand_in_engine(tmp_path, None)
    c = doctor.check_engine(doctor.probe_engine(str(python)), str(python))
    assert c.status == "fail" and "No module named 'vllm'" in c.detail and "xerotier-engine-install --flavor" in c.fix


def test_absent_engine_falls_back_to_ximd_interpreter_and_says_so(tmp_path):
    configured = str(tmp_path / "opt/engine/bin/python")
    probe = doctor.probe_engine(configured)
    assert probe.python == sys.executable
    c = doctor.check_engine(probe, configured)
    assert f"{configured} not found; using ximd's own interpreter" in c.detail
    assert f"--prefix {tmp_path / 'opt/engine'};" in c.fix


def test_hung_engine_import_is_bounded(tmp_path):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexec sleep 30\n")
    python.chmod(0o755)
    started = time.monotonic()
    probe = doctor.probe_engine(str(python), timeout_s=0.5)
    assert time.monotonic() - started < 5 and "did not finish within 0.5 s" in probe.error


# ---------------------------------------------------------------- Redis / Valkey


def closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_redis_rules():
    assert doctor.check_redis("", "auto", None).status == "skip"
    assert doctor.check_redis("redis://h:6379", "false", None).status == "skip"
    assert doctor.check_redis("redis://h:6379", "true", None) == Check("lmcache remote", "ok",
                                                                        "redis://h:6379 answers PING")
    c = doctor.check_redis("redis://:****@h:6379", "auto", "ConnectionError: refused")
    assert c.status == "warn" and "without the shared tier" in c.detail and "lmcache.redis_url" in c.fix


@pytest.fixture
def redis_server(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (apt install redis-server)")
    port = closed_loopback_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- plan check


def test_plan_check_ok_warn_and_fail():
    ok = doctor.check_plan(lambda: autoconfig.build_plan(autoconfig.Knobs(), h100_host(), None))
    assert ok.status == "ok" and ok.detail.startswith("cuda: GPU 0, TP 1, max_concurrent 8")
    warn = doctor.check_plan(lambda: autoconfig.build_plan(autoconfig.Knobs(cuda_visible_devices="0"),
                                                           cpu_only_host(), None))
    assert warn.status == "warn" and "ignored: no GPUs found" in warn.detail
    bad = doctor.check_plan(lambda: autoconfig.build_plan(autoconfig.Knobs(tensor_parallel_size=2), h100_host(), None))
    assert bad.status == "fail" and "engine.tensor_parallel_size" in bad.detail
    assert bad.fix.startswith("change engine.tensor_parallel_size")


# ---------------------------------------------------------------- output and main


CHECKS = [Check("gpus", "ok", "1 × H100"), Check("ram", "warn", "low", "add memory"),
          Check("disk", "fail", "full", "free space"), Check("lmcache remote", "skip", "not set")]


def test_render_table_shows_each_check_the_fixes_and_the_summary():
    text = doctor_cmd.render_table(CHECKS)
    lines = text.splitlines()
    assert lines[0].startswith("OK    gpus") and "WARN  ram" in text and "FAIL  disk" in text
    assert "fix: add memory" in text and "fix: free space" in text
    assert lines[-1] == "1 ok, 1 warn, 1 fail, 1 skip — FAILED"


def test_to_json_shape():
    data = json.loads(doctor_cmd.to_json(CHECKS))
    assert data["ok"] is False and data["summary"] == {"ok": 1, "warn": 1, "fail": 1, "skip": 1}
    assert data["checks"][1] == {"name": "ram", "status": "warn", "detail": "low", "fix": "add memory"}
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in data["checks"])
    assert json.loads(doctor_cmd.to_json(CHECKS[:2]))["ok"] is True


def _cfg(tmp_path: Path, python: Path, extra: str = ""):
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "cache").mkdir()
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\ncache_dir = "{tmp_path / "cache"}"\n'
                    f'[engine]\npython = "{python}"\n[model_cache]\nmax_size_gb = 1\n' + extra)
    return config.load(path, env={})


def test_main_exit_code_follows_failures(tmp_path, capsys):
    cfg = _cfg(tmp_path, stand_in_engine(tmp_path, "0.32.0"))
    assert doctor_cmd.main(cfg, "json", hw=h100_host()) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True
    names = [c["name"] for c in data["checks"]]
    assert names == ["gpus", "gpu driver", "vram", "gpu device nodes", "ram", "disk", "model", "/dev/shm",
                     "socket buffers", "state directory", "cache directory", "engine", "engine sandbox",
                     "lmcache remote", "group fabric", "plan"]
    gpus = data["checks"][0]
    assert gpus["status"] == "ok" and "NVIDIA H100 80GB HBM3" in gpus["detail"]


def test_main_fails_without_vllm_and_with_an_old_driver(tmp_path, capsys):
    cfg = _cfg(tmp_path, stand_in_engine(tmp_path, None))
    old = h100_host(gpus=(dataclasses.replace(H100, driver_version="525.147.05"),))
    assert doctor_cmd.main(cfg, "text", hw=old) == 1
    out = capsys.readouterr().out
    assert "FAIL  gpu driver" in out and "FAIL  engine" in out and out.rstrip().endswith("FAILED")


def test_main_on_this_machine_reports_everything_even_without_a_gpu(tmp_path, capsys):
    cfg = _cfg(tmp_path, stand_in_engine(tmp_path, "0.32.0"),
               f'[lmcache]\nredis_url = "redis://127.0.0.1:{closed_loopback_port()}"\n')
    rc = doctor_cmd.main(cfg, "text")
    out = capsys.readouterr().out
    assert len(out.splitlines()) >= 13 and "Traceback" not in out
    if not hardware.detect().gpus:
        assert "no GPU found (nvidia-smi/amd-smi not present): ximd will run the CPU engine" in out
    assert "WARN  lmcache remote" in out and "ConnectionError" in out
    assert rc == (1 if "FAIL" in out else 0)


@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_unreachable_redis_on_a_closed_loopback_port_warns_with_the_password_masked(tmp_path, capsys, scheme):
    url = f"{scheme}://:s3cret@127.0.0.1:{closed_loopback_port()}/0"
    cfg = _cfg(tmp_path, stand_in_engine(tmp_path, "0.32.0"), f'[lmcache]\nredis_url = "{url}"\n')
    started = time.monotonic()
    checks = doctor.collect(cfg, h100_host())
    assert time.monotonic() - started < 10
    remote = next(c for c in checks if c.name == "lmcache remote")
    assert remote.status == "warn" and "ConnectionError" in remote.detail
    assert "s3cret" not in remote.detail and "****" in remote.detail


def test_reachable_redis_and_valkey(tmp_path, redis_server):
    python = stand_in_engine(tmp_path, "0.32.0")
    for scheme in ("redis", "valkey"):
        directory = tmp_path / scheme
        directory.mkdir()
        cfg = _cfg(directory, python, f'[lmcache]\nredis_url = "{scheme}://127.0.0.1:{redis_server}/0"\n')
        remote = next(c for c in doctor.collect(cfg, h100_host()) if c.name == "lmcache remote")
        assert remote.status == "ok", remote.detail


def test_engine_sandbox_ok_with_landlock_and_a_warning_without():
    ok = doctor.check_engine_sandbox(2, "")
    assert (ok.status, ok.fix) == ("ok", None) and "ABI 2" in ok.detail
    missing = doctor.check_engine_sandbox(0, "the kernel has no Landlock")
    assert missing.status == "warn" and "the kernel has no Landlock" in missing.detail
    assert "identity" in missing.detail and "lsm=" in missing.fix


# ---------------------------------------------------------------- the group fabric (docs/groups.md)

INTERFACES = {"lo": ["127.0.0.1"], "eth0": ["80.1.2.3"], "eth1": ["10.0.0.11"]}


def group_settings(**settings) -> config.GroupSection:
    return dataclasses.replace(config.load(None, env={}).group, **settings)


def test_no_fabric_is_skipped_with_what_it_means():
    check = doctor.check_group_fabric(group_settings(), INTERFACES, "0.32.0")
    assert check.status == "skip" and "cannot take part in a group" in check.detail


def test_a_private_fabric_is_ok_and_says_what_the_network_must_allow():
    check = doctor.check_group_fabric(group_settings(fabric_interface="eth1"), INTERFACES, "0.32.0")
    assert check.status == "ok" and check.detail.startswith("10.0.0.11 on eth1, ports 29500-29599")
    assert "every TCP port" in check.detail


def test_a_public_fabric_fails_unless_allowed_then_warns():
    refused = doctor.check_group_fabric(group_settings(fabric_interface="eth0"), INTERFACES, "0.32.0")
    assert refused.status == "fail" and "public address" in refused.detail and refused.fix
    allowed = doctor.check_group_fabric(group_settings(fabric_interface="eth0", allow_public_fabric=True),
                                        INTERFACES, "0.32.0")
    assert allowed.status == "warn" and "PUBLIC" in allowed.detail


def test_a_fabric_not_on_this_host_fails():
    check = doctor.check_group_fabric(group_settings(fabric_address="10.9.9.9"), INTERFACES, None)
    assert check.status == "fail" and "no interface of this host has it" in check.detail


def test_an_engine_the_follower_entry_does_not_know_is_a_warning():
    check = doctor.check_group_fabric(group_settings(fabric_interface="eth1"), INTERFACES, "0.33.1")
    assert check.status == "warn" and "vLLM 0.33.1" in check.detail
