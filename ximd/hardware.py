"""What this host has: GPUs (NVIDIA, AMD), RAM, usable CPUs, /dev/shm, device majors.

The parsers are pure functions of the text a tool or a /proc file gives, so
they are tested on real captured outputs (tests/fixtures/). `detect()` is the
only place that runs tools or reads the system; it never raises because a tool
is missing or broken: it records what happened in `Hardware.probes`, which
`ximd doctor` turns into a plain sentence.

GPU indices are the tools' own (nvidia-smi's index, amd-smi's "gpu"), which
are PCI-bus ordered. Neither tool honours CUDA_VISIBLE_DEVICES or
HIP_VISIBLE_DEVICES, so masks are applied here, by `apply_mask`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ximd.units import MIB

# Character devices whose majors the unit's DeviceAllow= must cover for CUDA
# (nvidia*, nvidia-uvm, nvidia-caps for MIG) and ROCm (kfd, drm render nodes).
GPU_DEVICE_NAMES = ("nvidia", "nvidiactl", "nvidia-uvm", "nvidia-caps", "drm", "kfd")

# The columns of our nvidia-smi query, in order. The fixture from the H100 host
# (tests/fixtures/nvidia-h100-driver580/gpu-facts.txt) was captured with exactly
# this list, so parser and command cannot drift apart.
NVIDIA_QUERY_FIELDS = ("index", "uuid", "name", "memory.total", "memory.used", "memory.free",
                       "driver_version", "pci.bus_id", "compute_cap", "mig.mode.current")
NVIDIA_QUERY_COMMAND = ("nvidia-smi", "--query-gpu=" + ",".join(NVIDIA_QUERY_FIELDS),
                        "--format=csv,noheader,nounits")
NVIDIA_XML_COMMAND = ("nvidia-smi", "-q", "-x")
AMD_SMI_COMMAND = ("amd-smi", "static", "--asic", "--bus", "--vram", "--driver", "--json")
ROCM_SMI_COMMAND = ("rocm-smi", "--showproductname", "--showmeminfo", "vram", "--showbus",
                    "--showdriverversion", "--json")

# A wedged driver can make nvidia-smi hang for minutes; doctor and start-up
# must not hang with it.
TOOL_TIMEOUT_S = 15.0


class ParseError(ValueError):
    """A tool's output did not look like what the parser knows."""


@dataclass(frozen=True)
class Gpu:
    index: int
    vendor: str                 # "nvidia" | "amd"
    name: str
    memory_total_mib: int
    uuid: str
    driver_version: str
    pci_bus_id: str
    memory_used_mib: int = 0    # what others already hold; vLLM needs util × total free at start


@dataclass(frozen=True)
class Probe:
    """What happened when detect() asked one tool."""
    tool: str                   # "nvidia-smi", "amd-smi", "rocm-smi"
    found: bool                 # on PATH?
    error: str | None = None    # why it gave no GPUs, when it was found but failed
    gpus: int = 0


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...]
    ram_bytes: int
    cpu_count: int                       # usable by this process (sched_getaffinity)
    shm_bytes: int
    device_majors: dict[str, int] = field(default_factory=dict)
    usable_cpus: tuple[int, ...] = ()    # the CPU ids themselves, for thread binding
    probes: tuple[Probe, ...] = ()

    @property
    def vendor(self) -> str | None:
        """The GPU vendor ximd will drive; NVIDIA wins on a (rare) mixed host."""
        vendors = {g.vendor for g in self.gpus}
        if "nvidia" in vendors:
            return "nvidia"
        return "amd" if "amd" in vendors else None

    def gpus_of(self, vendor: str) -> tuple[Gpu, ...]:
        return tuple(g for g in self.gpus if g.vendor == vendor)


# ---------------------------------------------------------------- NVIDIA


def parse_nvidia_query_csv(text: str, fields: tuple[str, ...] = NVIDIA_QUERY_FIELDS) -> tuple[Gpu, ...]:
    """Rows of `nvidia-smi --query-gpu=<fields> --format=csv[,noheader][,nounits]`.

    With a header line (the `csv` variant) the columns are read from it, unit
    suffixes (" MiB") included; without one they are `fields`. The name is
    everything between the columns before and after it, so a comma inside a
    product name cannot shift the others.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].split(",")[0].strip() == "index":
        fields = tuple(re.sub(r"\s*\[.*\]$", "", c.strip()) for c in lines.pop(0).split(","))
    needed = ("index", "uuid", "name", "memory.total", "driver_version", "pci.bus_id")
    absent = [f for f in needed if f not in fields]
    if absent:
        raise ParseError(f"nvidia-smi query lacks the column(s) {', '.join(absent)}")
    name_at = fields.index("name")
    after_name = len(fields) - name_at - 1
    gpus = []
    for number, line in enumerate(lines, 1):
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < len(fields):
            raise ParseError(f"nvidia-smi line {number}: expected {len(fields)} columns "
                             f"({', '.join(fields)}), got {len(cells)}: {line!r}")
        joined = [*cells[:name_at], ", ".join(cells[name_at:len(cells) - after_name]),
                  *cells[len(cells) - after_name:]]
        row = dict(zip(fields, joined))
        gpus.append(Gpu(index=_int(row["index"], f"nvidia-smi line {number}: index"), vendor="nvidia",
                        name=row["name"], memory_total_mib=_mib(row["memory.total"]), uuid=row["uuid"],
                        driver_version=row["driver_version"], pci_bus_id=row["pci.bus_id"],
                        memory_used_mib=_mib(row.get("memory.used", ""))))
    return tuple(gpus)


def parse_nvidia_smi_xml(text: str) -> tuple[Gpu, ...]:
    """`nvidia-smi -q -x`: the fallback for drivers whose query lacks a column we ask for."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ParseError(f"nvidia-smi -q -x is not XML: {exc}") from None
    if root.tag != "nvidia_smi_log":
        raise ParseError(f"nvidia-smi -q -x: expected <nvidia_smi_log>, got <{root.tag}>")
    driver = (root.findtext("driver_version") or "").strip()
    gpus = []
    # nvidia-smi lists GPUs in its index order (PCI bus order), which is the
    # index the CSV query reports.
    for index, node in enumerate(root.findall("gpu")):
        gpus.append(Gpu(
            index=index, vendor="nvidia",
            name=(node.findtext("product_name") or "").strip(),
            memory_total_mib=_mib(node.findtext("fb_memory_usage/total") or ""),
            uuid=(node.findtext("uuid") or "").strip(),
            driver_version=driver,
            pci_bus_id=(node.findtext("pci/pci_bus_id") or node.get("id") or "").strip(),
            memory_used_mib=_mib(node.findtext("fb_memory_usage/used") or "")))
    return tuple(gpus)


# ---------------------------------------------------------------- AMD


def parse_amd_smi_static(text: str) -> tuple[Gpu, ...]:
    """`amd-smi static --asic --bus --vram --driver --json`.

    ROCm 6.0–6.3 print a JSON list of GPUs; later releases wrap it as
    {"gpu_data": [...]}. Sizes come as {"value": N, "unit": "MB"} (amd-smi's
    "MB" is MiB: the library divides bytes by 1024²), or as "N MB" text in
    older releases. Warnings printed before the JSON (permissions) are skipped.
    """
    data = _json_after_noise(text, "amd-smi")
    entries = data.get("gpu_data", data) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ParseError("amd-smi static --json: expected a list of GPUs or {\"gpu_data\": [...]}")
    gpus = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ParseError(f"amd-smi static --json: GPU entry {position} is not an object")
        asic, bus = entry.get("asic") or {}, entry.get("bus") or {}
        vram, driver = entry.get("vram") or {}, entry.get("driver") or {}
        gpus.append(Gpu(
            index=_int(entry.get("gpu", position), "amd-smi gpu"), vendor="amd",
            name=str(asic.get("market_name") or "AMD GPU"),
            memory_total_mib=_amd_size_mib(vram.get("size", vram.get("vram_size"))),
            uuid=str(entry.get("uuid") or ""),
            driver_version=str(driver.get("version") or driver.get("driver_version") or ""),
            pci_bus_id=str(bus.get("bdf") or entry.get("bdf") or "")))
    return tuple(gpus)


def parse_rocm_smi(text: str) -> tuple[Gpu, ...]:
    """`rocm-smi --showproductname --showmeminfo vram --showbus --showdriverversion --json`.

    One object per "cardN" (N is rocm-smi's device index) plus a "system"
    object holding the driver version. Values are strings.
    """
    data = _json_after_noise(text, "rocm-smi")
    if not isinstance(data, dict):
        raise ParseError("rocm-smi --json: expected an object keyed by card")
    driver = str((data.get("system") or {}).get("Driver version", ""))
    cards = sorted(((int(k[4:]), v) for k, v in data.items() if re.fullmatch(r"card\d+", k)),
                   key=lambda kv: kv[0])
    gpus = []
    for index, card in cards:
        total = card.get("VRAM Total Memory (B)")
        if total is None:
            raise ParseError(f"rocm-smi card{index}: no 'VRAM Total Memory (B)' (was --showmeminfo vram given?)")
        gpus.append(Gpu(
            index=index, vendor="amd",
            name=str(card.get("Card Series") or card.get("Card series") or card.get("Card model") or "AMD GPU"),
            memory_total_mib=_int(total, f"rocm-smi card{index} VRAM") // MIB,
            uuid=str(card.get("Unique ID") or ""),
            driver_version=driver,
            pci_bus_id=str(card.get("PCI Bus") or ""),
            memory_used_mib=_int(card.get("VRAM Total Used Memory (B)", 0), "rocm-smi used VRAM") // MIB))
    return tuple(gpus)


def _amd_size_mib(size) -> int:
    if isinstance(size, dict):
        value, unit = size.get("value"), str(size.get("unit", "MB"))
    elif isinstance(size, str) and size.strip():
        value, _, unit = size.strip().partition(" ")
    elif isinstance(size, (int, float)) and not isinstance(size, bool):
        value, unit = size, "MB"
    else:
        return 0  # "N/A" on virtual functions: unknown, doctor reports it
    try:
        number = float(value)  # type: ignore[arg-type]  # whatever the JSON held: the except decides
    except (TypeError, ValueError):
        return 0  # "N/A": unknown
    factor = {"B": 1 / MIB, "KB": 1 / 1024, "MB": 1, "GB": 1024}.get(unit.strip().upper() or "MB")
    if factor is None:
        raise ParseError(f"amd-smi VRAM size: unknown unit {unit!r}")
    return int(number * factor)


def _json_after_noise(text: str, tool: str):
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ParseError(f"{tool}: no JSON in its output: {text.strip()[:200]!r}")
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError as exc:
        raise ParseError(f"{tool}: output is not valid JSON: {exc}") from None


# ---------------------------------------------------------------- /proc and cgroups


def parse_proc_devices(text: str, names: tuple[str, ...] = GPU_DEVICE_NAMES) -> dict[str, int]:
    """Character-device majors from /proc/devices, for the names asked (default: the GPU ones)."""
    majors: dict[str, int] = {}
    in_char = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("devices:"):
            in_char = stripped == "Character devices:"
            continue
        if not in_char or not stripped:
            continue
        major, _, name = stripped.partition(" ")
        if name.strip() in names and major.isdigit():
            majors[name.strip()] = int(major)
    return majors


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes ("MemTotal: 24684096 kB" → {"MemTotal": 25276514304})."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def parse_cgroup_memory_limit(text: str) -> int | None:
    """cgroup v2 memory.max or v1 memory.limit_in_bytes: None when unlimited."""
    value = text.strip()
    if not value or value == "max":
        return None
    limit = _int(value, "cgroup memory limit")
    # v1 writes "unlimited" as a page-rounded LONG_MAX.
    return None if limit >= 2 ** 62 else limit


def cgroup_memory_files(proc_self_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """Where this process's memory limit lives, for cgroup v2 and v1 hierarchies."""
    files = []
    for line in proc_self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            files.append(root / relative / "memory.max")
        elif "memory" in controllers.split(","):
            files.append(root / "memory" / relative / "memory.limit_in_bytes")
    return files


# ---------------------------------------------------------------- masks


def parse_visible_devices(mask: str) -> tuple[int, ...] | None:
    """"" (or blanks) = all GPUs → None; "0,1" / " 2, 3 " → (0, 1) / (2, 3).

    Anything else (UUIDs, negative numbers, empty entries, repeats) is a
    ValueError that names the value: a typo here would otherwise silently
    hide GPUs from the engine.
    """
    if not mask.strip():
        return None
    indices = []
    for part in mask.split(","):
        entry = part.strip()
        if not entry.isdigit() or not entry.isascii():
            raise ValueError(f"invalid GPU mask {mask!r}: {entry!r} is not a GPU index "
                             f"(expected comma-separated indices such as \"0,1\", or empty for all GPUs)")
        if int(entry) in indices:
            raise ValueError(f"invalid GPU mask {mask!r}: GPU {int(entry)} is listed twice")
        indices.append(int(entry))
    return tuple(indices)


def apply_mask(gpus: tuple[Gpu, ...], mask: str) -> tuple[Gpu, ...]:
    """The GPUs a mask selects, in mask order (the order the engine numbers them 0..n-1)."""
    wanted = parse_visible_devices(mask)
    if wanted is None:
        return tuple(gpus)
    by_index = {g.index: g for g in gpus}
    missing = [i for i in wanted if i not in by_index]
    if missing:
        present = ",".join(str(i) for i in sorted(by_index)) or "none"
        raise ValueError(f"GPU mask {mask!r} names GPU {','.join(map(str, missing))}, "
                         f"but this host has GPUs {present}")
    return tuple(by_index[i] for i in wanted)


# ---------------------------------------------------------------- detection


@dataclass(frozen=True)
class ToolRun:
    """One tool invocation's outcome; error is None when it exited 0."""
    stdout: str
    error: str | None
    timed_out: bool = False


def run_tool(argv: tuple[str, ...], timeout_s: float = TOOL_TIMEOUT_S) -> ToolRun:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired:
        return ToolRun("", f"`{' '.join(argv)}` did not answer within {timeout_s:g} s", True)
    except OSError as exc:
        return ToolRun("", f"`{argv[0]}` could not run: {exc.strerror or exc}")
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        return ToolRun(proc.stdout, f"`{' '.join(argv)}` exited {proc.returncode}"
                       + (f": {said[0][:300]}" if said else ""))
    return ToolRun(proc.stdout, None)


def _probe(tool: str, attempts, search_path: str | None, timeout_s: float):
    """Run (argv, parser) attempts in order until one yields GPUs; record why not."""
    exe = shutil.which(tool, path=search_path)
    if exe is None:
        return (), Probe(tool, found=False)
    error = None
    for argv, parser in attempts:
        result = run_tool((exe, *argv[1:]), timeout_s)
        if result.error is None:
            try:
                gpus = parser(result.stdout)
                return gpus, Probe(tool, True, None if gpus else "reported no GPUs", len(gpus))
            except ParseError as exc:
                error = str(exc)
        else:
            error = result.error
            if result.timed_out:
                break  # a hung driver hangs the fallback too
    return (), Probe(tool, True, error)


def detect(search_path: str | None = None, proc: Path = Path("/proc"),
           sys_fs_cgroup: Path = Path("/sys/fs/cgroup"), shm: Path = Path("/dev/shm"),
           timeout_s: float = TOOL_TIMEOUT_S) -> Hardware:
    """This host's hardware. Never raises over a missing or failing tool.

    `search_path` overrides PATH for finding nvidia-smi/amd-smi/rocm-smi
    (tests put stand-in tools there); the other paths exist for the same reason.
    """
    nvidia, nvidia_probe = _probe("nvidia-smi", [(NVIDIA_QUERY_COMMAND, parse_nvidia_query_csv),
                                                 (NVIDIA_XML_COMMAND, parse_nvidia_smi_xml)],
                                  search_path, timeout_s)
    amd, amd_probe = _probe("amd-smi", [(AMD_SMI_COMMAND, parse_amd_smi_static)], search_path, timeout_s)
    probes = [nvidia_probe, amd_probe]
    if not amd:
        # rocm-smi is the older tool; ask it only when amd-smi gave nothing.
        amd, rocm_probe = _probe("rocm-smi", [(ROCM_SMI_COMMAND, parse_rocm_smi)], search_path, timeout_s)
        probes.append(rocm_probe)
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    return Hardware(gpus=nvidia + amd, ram_bytes=_usable_ram(proc, sys_fs_cgroup),
                    cpu_count=len(cpus), shm_bytes=_filesystem_size(shm),
                    device_majors=parse_proc_devices(_read(proc / "devices")),
                    usable_cpus=cpus, probes=tuple(probes))


def _usable_ram(proc: Path, sys_fs_cgroup: Path) -> int:
    """MemTotal, lowered to this process's cgroup memory limit when there is one.

    Under MemoryMax= (or in a container) the engine is killed at the cgroup
    limit, not at the machine's RAM, so that is what sizing must use.
    """
    total = parse_meminfo(_read(proc / "meminfo")).get("MemTotal", 0)
    for path in cgroup_memory_files(_read(proc / "self" / "cgroup"), sys_fs_cgroup):
        text = _read(path)
        try:
            limit = parse_cgroup_memory_limit(text) if text else None
        except ValueError:
            limit = None
        if limit is not None and (total == 0 or limit < total):
            total = limit
    return total


def _filesystem_size(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_blocks * st.f_frsize


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _int(value, what: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ParseError(f"{what}: expected an integer, got {value!r}") from None


def _mib(text: str) -> int:
    """"81559" or "81559 MiB" → 81559; "[N/A]" (some vGPU/MIG setups) → 0 = unknown."""
    match = re.match(r"\s*(\d+)", text or "")
    return int(match.group(1)) if match else 0
