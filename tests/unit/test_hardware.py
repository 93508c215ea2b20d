"""hardware.py: parsers on captured (NVIDIA) and hand-written (AMD) outputs, masks, and
detect() running stand-in tools as real subprocesses."""

from __future__ import annotations

import fnmatch
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from ximd import hardware
from ximd.hardware import Gpu, ParseError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
H100 = FIXTURES / "nvidia-h100-driver580"
H200 = FIXTURES / "nvidia-h200-driver580"
AMD = FIXTURES / "amd-handwritten"

H100_GPU = Gpu(index=0, vendor="nvidia", name="NVIDIA H100 80GB HBM3", memory_total_mib=81559,
               uuid="GPU-cce76fe6-b3f4-6039-8cd1-109be253c3c9", driver_version="580.159.04",
               pci_bus_id="00000000:00:06.0", memory_used_mib=0)
H200_GPU = Gpu(index=0, vendor="nvidia", name="NVIDIA H200", memory_total_mib=143771,
               uuid="GPU-18241314-304a-7926-0533-46b260e17737", driver_version="580.159.04",
               pci_bus_id="00000000:00:06.0", memory_used_mib=0)


# ---------------------------------------------------------------- NVIDIA


CAPTURED_HOSTS = [(H100, H100_GPU), (H200, H200_GPU)]


@pytest.mark.parametrize("host, gpu", CAPTURED_HOSTS, ids=["h100", "h200"])
def test_query_csv_noheader_from_a_real_host(host, gpu):
    assert hardware.parse_nvidia_query_csv((host / "nvidia-smi-query-noheader.csv").read_text()) == (gpu,)


def test_query_csv_with_header_and_units_reads_its_own_columns():
    # This capture has 9 columns (no mig.mode.current) and "81559 MiB" values.
    assert hardware.parse_nvidia_query_csv((H100 / "nvidia-smi-query.csv").read_text()) == (H100_GPU,)


@pytest.mark.parametrize("host, gpu", CAPTURED_HOSTS, ids=["h100", "h200"])
def test_xml_agrees_with_the_query_on_the_same_host(host, gpu):
    assert hardware.parse_nvidia_smi_xml((host / "nvidia-smi-q.xml").read_text()) == (gpu,)


def test_query_csv_several_gpus_and_a_comma_in_the_name():
    text = ("0, GPU-a, NVIDIA H100 80GB HBM3, 81559, 10, 81000, 550.54.15, 00000000:18:00.0, 9.0, Disabled\n"
            "1, GPU-b, Weird, Inc. Accelerator, 24576, 0, 24000, 550.54.15, 00000000:3B:00.0, 8.6, [N/A]\n")
    gpus = hardware.parse_nvidia_query_csv(text)
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[1].name == "Weird, Inc. Accelerator"
    assert gpus[1].memory_total_mib == 24576 and gpus[1].pci_bus_id == "00000000:3B:00.0"
    assert gpus[0].memory_used_mib == 10


def test_query_csv_not_available_memory_is_zero_not_a_crash():
    text = "0, GPU-a, GRID vGPU, [N/A], [N/A], [N/A], 535.1, 00000000:00:05.0, 8.0, Disabled\n"
    assert hardware.parse_nvidia_query_csv(text)[0].memory_total_mib == 0


@pytest.mark.parametrize("text, message", [
    ("0, GPU-a, H100, 81559\n", "expected 10 columns"),
    ("zero, GPU-a, H100, 81559, 0, 1, 580.1, 0000:00:06.0, 9.0, Disabled\n", "index: expected an integer"),
    ("index, name\n0, H100\n", "lacks the column(s) uuid, memory.total, driver_version, pci.bus_id"),
])
def test_query_csv_garbage_is_a_parse_error_that_says_what(text, message):
    with pytest.raises(ParseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hardware.parse_nvidia_query_csv(text)


def test_query_csv_no_devices_is_empty():
    assert hardware.parse_nvidia_query_csv("\n") == ()


@pytest.mark.parametrize("text, message", [("NVIDIA-SMI has failed", "not XML"),
                                           ("<other/>", "expected <nvidia_smi_log>")])
def test_xml_garbage_is_a_parse_error(text, message):
    with pytest.raises(ParseError, match=message):
        hardware.parse_nvidia_smi_xml(text)


# ---------------------------------------------------------------- AMD (hand-written samples)


def test_amd_smi_gpu_data_shape():
    gpus = hardware.parse_amd_smi_static((AMD / "amd-smi-static-gpu_data.json").read_text())
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert gpus[3] == Gpu(index=3, vendor="amd", name="AMD Instinct MI300X", memory_total_mib=196592,
                          uuid="", driver_version="6.10.5", pci_bus_id="0000:85:00.0")


def test_amd_smi_list_shape_after_a_warning_line():
    gpus = hardware.parse_amd_smi_static((AMD / "amd-smi-static-list-with-warning.txt").read_text())
    assert [(g.name, g.memory_total_mib, g.driver_version) for g in gpus] == [("AMD Instinct MI210", 65520, "6.3.6")]


@pytest.mark.parametrize("size, mib", [({"value": 8, "unit": "GB"}, 8192), ("16368 MB", 16368),
                                       (4096, 4096), ("N/A", 0), ({"value": "N/A", "unit": "MB"}, 0)])
def test_amd_smi_vram_size_forms(size, mib):
    text = json.dumps({"gpu_data": [{"gpu": 0, "vram": {"size": size}}]})
    assert hardware.parse_amd_smi_static(text)[0].memory_total_mib == mib


@pytest.mark.parametrize("text, message", [("amd-smi: command failed", "no JSON"),
                                           ('{"gpu_data": 3}', "expected a list"),
                                           ("[1]", "entry 0 is not an object"),
                                           ('[{"vram": {"size": {"value": 1, "unit": "PB"}}}]', "unknown unit"),
                                           ('{"gpu_data": [', "not valid JSON")])
def test_amd_smi_garbage_is_a_parse_error(text, message):
    with pytest.raises(ParseError, match=message):
        hardware.parse_amd_smi_static(text)


def test_rocm_smi_cards_and_driver():
    gpus = hardware.parse_rocm_smi((AMD / "rocm-smi.json").read_text())
    assert [(g.index, g.name, g.pci_bus_id, g.driver_version) for g in gpus] == [
        (0, "Radeon RX 7900 XTX", "0000:03:00.0", "6.7.0"), (1, "Radeon RX 7900 XTX", "0000:43:00.0", "6.7.0")]
    assert gpus[0].memory_total_mib == 25753026560 // (1024 * 1024)
    assert gpus[0].memory_used_mib == 1003520000 // (1024 * 1024)


def test_rocm_smi_without_meminfo_says_which_flag():
    with pytest.raises(ParseError, match="--showmeminfo vram"):
        hardware.parse_rocm_smi('{"card0": {"Card Series": "X"}}')


# ---------------------------------------------------------------- /proc, cgroups


@pytest.mark.parametrize("host", [H100, H200], ids=["h100", "h200"])
def test_proc_devices_of_the_nvidia_hosts(host):
    majors = hardware.parse_proc_devices((host / "proc-devices.txt").read_text())
    assert majors == {"nvidia": 195, "nvidiactl": 195, "nvidia-uvm": 238, "nvidia-caps": 241}


def unit_device_allow_patterns() -> list[str]:
    unit = Path(__file__).resolve().parents[2] / "systemd" / "ximd.service"
    return [line.split("=", 1)[1].split()[0] for line in unit.read_text().splitlines()
            if line.startswith("DeviceAllow=")]


@pytest.mark.parametrize("host", [H100, H200, AMD], ids=["h100", "h200", "amd"])
def test_the_units_device_allow_covers_every_gpu_device_group(host):
    # systemd matches `char-<group>` against /proc/devices with shell globs; a group
    # left out is a GPU that CUDA or ROCm cannot open inside the unit.
    groups = hardware.parse_proc_devices((host / "proc-devices.txt").read_text())
    patterns = unit_device_allow_patterns()
    assert groups
    for group in groups:
        assert any(fnmatch.fnmatchcase(f"char-{group}", p) for p in patterns), (group, patterns)


def test_proc_devices_of_an_amd_host():
    assert hardware.parse_proc_devices((AMD / "proc-devices.txt").read_text()) == {"drm": 226, "kfd": 234}


def test_proc_devices_ignores_block_devices_with_the_same_name():
    text = "Character devices:\n226 drm\n\nBlock devices:\n  7 kfd\n 99 drm\n"
    assert hardware.parse_proc_devices(text) == {"drm": 226}


def test_meminfo_in_bytes():
    info = hardware.parse_meminfo("MemTotal:       24684096 kB\nHugePages_Total:       0\nbroken line\n")
    assert info == {"MemTotal": 24684096 * 1024, "HugePages_Total": 0}


@pytest.mark.parametrize("text, limit", [("max\n", None), ("9223372036854771712\n", None),
                                         ("8589934592\n", 8 * 1024 ** 3), ("", None)])
def test_cgroup_memory_limit(text, limit):
    assert hardware.parse_cgroup_memory_limit(text) == limit


def test_cgroup_memory_files_v1_and_v2(tmp_path):
    text = "4:memory:/process_api/abc\n3:cpuset:/\n0::/system.slice/ximd.service\n"
    assert hardware.cgroup_memory_files(text, tmp_path) == [
        tmp_path / "memory" / "process_api/abc" / "memory.limit_in_bytes",
        tmp_path / "system.slice/ximd.service" / "memory.max"]


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("mask, parsed", [("", None), ("  ", None), ("0", (0,)), ("0,1", (0, 1)),
                                          (" 2, 3 ", (2, 3)), ("3,1", (3, 1))])
def test_parse_visible_devices(mask, parsed):
    assert hardware.parse_visible_devices(mask) == parsed


@pytest.mark.parametrize("mask, words", [("a", "'a' is not a GPU index"), ("0,,1", "'' is not a GPU index"),
                                         ("-1", "'-1' is not"), ("GPU-cce76fe6", "not a GPU index"),
                                         ("1.5", "'1.5'"), ("٣", "'٣'"), ("0,0", "GPU 0 is listed twice")])
def test_parse_visible_devices_rejects_garbage_naming_the_value(mask, words):
    with pytest.raises(ValueError) as info:
        hardware.parse_visible_devices(mask)
    assert repr(mask) in str(info.value) and words in str(info.value)


def _gpus(n):
    return tuple(Gpu(i, "nvidia", "H100", 81559, f"GPU-{i}", "580.159.04", f"0000:{i:02x}:00.0") for i in range(n))


def test_apply_mask_keeps_mask_order_and_all_when_empty():
    gpus = _gpus(4)
    assert hardware.apply_mask(gpus, "") == gpus
    assert [g.index for g in hardware.apply_mask(gpus, "3,1")] == [3, 1]


def test_apply_mask_naming_a_missing_gpu_says_which_exist():
    with pytest.raises(ValueError, match=r"names GPU 4, but this host has GPUs 0,1,2,3"):
        hardware.apply_mask(_gpus(4), "2,4")


# ---------------------------------------------------------------- detect() with stand-in tools


def _tool(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_proc(tmp_path: Path, cgroup: str = "0::/\n") -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       33554432 kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "devices").write_text((H100 / "proc-devices.txt").read_text())
    return proc


def test_detect_without_any_tool_finds_no_gpu_and_says_so(tmp_path):
    hw = hardware.detect(search_path=str(tmp_path), proc=_fake_proc(tmp_path), sys_fs_cgroup=tmp_path / "cg")
    assert hw.gpus == () and hw.vendor is None
    assert [(p.tool, p.found) for p in hw.probes] == [("nvidia-smi", False), ("amd-smi", False), ("rocm-smi", False)]
    assert hw.ram_bytes == 32 * 1024 ** 3
    assert hw.cpu_count == len(os.sched_getaffinity(0)) == len(hw.usable_cpus)
    assert hw.device_majors["nvidia-uvm"] == 238


def test_detect_on_this_host_never_raises():
    hw = hardware.detect()
    assert hw.ram_bytes > 0 and hw.cpu_count >= 1 and hw.shm_bytes >= 0


def test_detect_lowers_ram_to_the_cgroup_limit(tmp_path):
    proc = _fake_proc(tmp_path, "0::/system.slice/ximd.service\n")
    limit_dir = tmp_path / "cg" / "system.slice" / "ximd.service"
    limit_dir.mkdir(parents=True)
    (limit_dir / "memory.max").write_text("4294967296\n")
    hw = hardware.detect(search_path=str(tmp_path), proc=proc, sys_fs_cgroup=tmp_path / "cg")
    assert hw.ram_bytes == 4 * 1024 ** 3


def test_detect_runs_nvidia_smi_with_our_query(tmp_path):
    csv = H100 / "nvidia-smi-query-noheader.csv"
    expected = " ".join(hardware.NVIDIA_QUERY_COMMAND[1:])
    _tool(tmp_path, "nvidia-smi", f'[ "$*" = "{expected}" ] || {{ echo "unexpected: $*" >&2; exit 2; }}\n'
                                  f'cat "{csv}"\n')
    hw = hardware.detect(search_path=str(tmp_path), proc=_fake_proc(tmp_path))
    assert hw.gpus == (H100_GPU,) and hw.vendor == "nvidia"
    assert hw.probes[0] == hardware.Probe("nvidia-smi", True, None, 1)


def test_detect_falls_back_to_xml_when_an_old_driver_rejects_a_column(tmp_path):
    _tool(tmp_path, "nvidia-smi",
          'if [ "$1" = "-q" ]; then cat "%s"; exit 0; fi\n'
          'echo \'Field "compute_cap" is not a valid field to query.\'; exit 2\n' % (H100 / "nvidia-smi-q.xml"))
    hw = hardware.detect(search_path=str(tmp_path), proc=_fake_proc(tmp_path))
    assert hw.gpus == (H100_GPU,)


def test_detect_reports_a_broken_driver_without_raising(tmp_path):
    _tool(tmp_path, "nvidia-smi", "echo \"NVIDIA-SMI has failed because it couldn't communicate with the "
                                  "NVIDIA driver.\"; exit 9\n")
    hw = hardware.detect(search_path=str(tmp_path), proc=_fake_proc(tmp_path))
    assert hw.gpus == ()
    assert hw.probes[0].found and "couldn't communicate with the NVIDIA driver" in hw.probes[0].error
    assert "exited 9" in hw.probes[0].error


def test_detect_gives_up_on_a_hung_tool_within_its_timeout(tmp_path):
    _tool(tmp_path, "nvidia-smi", "exec sleep 30\n")
    started = time.monotonic()
    hw = hardware.detect(search_path=str(tmp_path), proc=_fake_proc(tmp_path), timeout_s=0.5)
    assert time.monotonic() - started < 5  # one timeout, no fallback attempt on a hung driver
    assert "did not answer within 0.5 s" in hw.probes[0].error


def test_detect_amd_smi_then_no_rocm_smi(tmp_path):
    _tool(tmp_path, "amd-smi", 'cat "%s"\n' % (AMD / "amd-smi-static-gpu_data.json"))
    _tool(tmp_path, "rocm-smi", "echo must not be asked >&2; exit 1\n")
    hw = hardware.detect(search_path=str(tmp_path), proc=_fake_proc(tmp_path))
    assert len(hw.gpus) == 4 and hw.vendor == "amd"
    assert [p.tool for p in hw.probes] == ["nvidia-smi", "amd-smi"]


def test_detect_rocm_smi_when_amd_smi_is_absent(tmp_path):
    _tool(tmp_path, "rocm-smi", 'cat "%s"\n' % (AMD / "rocm-smi.json"))
    hw = hardware.detect(search_path=str(tmp_path), proc=_fake_proc(tmp_path))
    assert [g.name for g in hw.gpus] == ["Radeon RX 7900 XTX"] * 2
    assert hw.probes[-1] == hardware.Probe("rocm-smi", True, None, 2)


def test_detect_unparsable_output_is_recorded(tmp_path):
    _tool(tmp_path, "amd-smi", "echo 'not json at all'\n")
    hw = hardware.detect(search_path=str(tmp_path), proc=_fake_proc(tmp_path))
    assert hw.gpus == () and "no JSON" in hw.probes[1].error


def test_mixed_host_prefers_nvidia():
    hw = hardware.Hardware(gpus=(H100_GPU, Gpu(0, "amd", "MI300X", 196592, "", "6.10.5", "0000:05:00.0")),
                           ram_bytes=1, cpu_count=1, shm_bytes=1)
    assert hw.vendor == "nvidia" and len(hw.gpus_of("amd")) == 1


def test_run_tool_missing_executable_is_an_error_not_an_exception(tmp_path):
    result = hardware.run_tool((str(tmp_path / "absent"),))
    assert result.error and "could not run" in result.error


def test_python_is_3_11_or_later():
    # detect() uses shutil.which(path=...) and str.removeprefix; the .deb targets bookworm's 3.11.
    assert sys.version_info >= (3, 11)
