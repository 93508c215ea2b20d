"""The plan: hardware + configuration + model facts → engine settings, each with its reason.

Everything here except `load_model_facts` is pure; `ximd plan` shows the
result (ximd.commands.plan). The numbers are estimates made before the engine
starts (vLLM measures the real KV-cache size while it loads); they exist so
that admission, batch size and context length are sane from the first request
and so that impossible settings are refused with a message instead of a
crashed engine.

Rules (what an operator sets explicitly always wins, unless it is impossible):
- accelerator: NVIDIA GPUs → cuda, else AMD → rocm, else cpu.
- tensor_parallel_size: auto = the visible GPUs, rounded down to a power of two
  that divides the model's attention heads. Explicit > visible GPUs, or not
  dividing the heads, is a PlanError naming the key.
- max_model_len: auto = the model's default, unless the KV cache cannot hold one
  sequence that long; then the largest power of two that fits.
- max_concurrent: auto = KV capacity / an expected request length
  (EXPECTED_REQUEST_TOKENS), within [1, 256]; 8 when the plan cannot tell.
  An explicit value above what the KV cache holds is kept, with a warning: the
  engine queues or preempts the excess rather than failing, the capacity is an
  estimate, and silently overriding the operator would hide the decision.
- max_num_seqs: auto = max(max_concurrent, vLLM's own default for this device).
- CPU engine: TP 1, KV space from RAM, OpenMP threads on all usable CPUs but one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ximd.config import AUTO, FALLBACK_MAX_CONCURRENT
from ximd.hardware import Gpu, Hardware, apply_mask
from ximd.units import GIB, MIB
from ximd.units import gib_text as _gib

# A chat turn with some history plus its answer. Used to turn KV capacity in
# tokens into a number of requests; capped by max_model_len for short models.
EXPECTED_REQUEST_TOKENS = 2048
MAX_CONCURRENT_CEILING = 256

# What vLLM needs per GPU besides weights and KV cache: CUDA context, activation
# peak of a batch, CUDA graphs, NCCL buffers. Measured values are 1–2 GiB for
# 1–70B models; the high end keeps the admission estimate on the safe side.
GPU_NON_KV_RESERVE_BYTES = 2 * GIB

# vLLM's own --max-num-seqs defaults (vllm/engine/arg_utils.py, API server):
# 1024 on GPUs with ≥ 70 GiB that are not A100s, 256 on other GPUs, 128 per
# rank on CPU. Auto keeps them unless admission needs more.
VLLM_MAX_NUM_SEQS_LARGE_GPU = 1024
VLLM_MAX_NUM_SEQS_GPU = 256
VLLM_MAX_NUM_SEQS_CPU = 128
VLLM_LARGE_GPU_BYTES = 70 * GIB

CPU_KV_RAM_SHARE = 0.25              # of the RAM the weights leave
CPU_KV_MIN_GIB = 1
CPU_RUNTIME_RESERVE_BYTES = 2 * GIB  # torch + three Python processes (measured 2.3–3 GiB with a tiny model)


class PlanError(ValueError):
    """A setting the hardware or model makes impossible; `ximd plan` and the daemon exit 78 naming `key`."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


# ---------------------------------------------------------------- model facts


class ModelFactsError(ValueError):
    """A local model directory whose config.json cannot be used."""


@dataclass(frozen=True)
class ModelFacts:
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None   # the length vLLM derives by default
    dtype_bytes: int = 2
    weights_bytes: int | None = None             # on disk; quantised models included
    params: int | None = None
    mla_latent_dim: int | None = None            # DeepSeek-style MLA: one latent per token and layer

    @property
    def weight_bytes(self) -> int | None:
        if self.weights_bytes is not None:
            return self.weights_bytes
        return self.params * self.dtype_bytes if self.params is not None else None

    def kv_bytes_per_token(self, tp: int = 1) -> int | None:
        """KV-cache bytes one token takes on each GPU at this tensor-parallel size."""
        if self.num_layers is None:
            return None
        if self.mla_latent_dim:
            return self.num_layers * self.mla_latent_dim * self.dtype_bytes  # replicated per rank
        if self.num_kv_heads is None or self.head_dim is None:
            return None
        heads_per_rank = max(1, math.ceil(self.num_kv_heads / tp))  # fewer heads than ranks: replicated
        return 2 * self.num_layers * heads_per_rank * self.head_dim * self.dtype_bytes

    def describe(self) -> str:
        parts = []
        if self.num_layers is not None:
            parts.append(f"{self.num_layers} layers")
        if self.mla_latent_dim:
            parts.append(f"MLA latent {self.mla_latent_dim}")
        elif self.num_kv_heads is not None and self.head_dim is not None:
            parts.append(f"{self.num_kv_heads} KV heads × {self.head_dim}")
        if self.weight_bytes is not None:
            parts.append(f"{_gib(self.weight_bytes)} weights")
        if self.max_position_embeddings is not None:
            parts.append(f"{self.max_position_embeddings} tokens by default")
        return ", ".join(parts) or "no usable facts"


_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
                "float8_e4m3fn": 1, "float8": 1}
# vLLM takes the smallest of these that the config has.
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "model_max_length", "max_sequence_length", "max_seq_length", "seq_len")
# Rope types whose factor vLLM does not multiply into the default length.
_ROPE_TYPES_KEEPING_LENGTH = {None, "default", "su", "longrope", "llama3", "mrope"}


def model_facts_from_hf_config(config_json: dict, weights_bytes: int | None) -> ModelFacts:
    """Facts from a Hugging Face config.json (multimodal ones keep them in text_config)."""
    if not isinstance(config_json, dict):
        raise ModelFactsError("config.json is not a JSON object")
    cfg = config_json
    text = config_json.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in config_json:
        cfg = {**config_json, **text}
    heads = _first_int(cfg, "num_attention_heads", "n_head", "num_heads")
    hidden = _first_int(cfg, "hidden_size", "n_embd", "d_model")
    head_dim = _first_int(cfg, "head_dim")
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    kv_heads = _first_int(cfg, "num_key_value_heads", "multi_query_group_num", "num_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if cfg.get("multi_query") else heads
    mla = None
    if lora_rank := _first_int(cfg, "kv_lora_rank"):
        mla = lora_rank + (_first_int(cfg, "qk_rope_head_dim") or 0)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").removeprefix("torch.")
    return ModelFacts(
        num_layers=_first_int(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        num_attention_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=_derived_max_len(cfg),
        dtype_bytes=_DTYPE_BYTES.get(dtype, 2), weights_bytes=weights_bytes,
        params=_first_int(cfg, "num_parameters"), mla_latent_dim=mla)


def _derived_max_len(cfg: dict) -> int | None:
    lengths = [v for v in (_first_int(cfg, key) for key in _MAX_LEN_KEYS) if v]
    if not lengths:
        return None
    length = min(lengths)
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if isinstance(rope, dict) and isinstance(rope.get("factor"), (int, float)):
        kind = rope.get("rope_type") or rope.get("type")
        if kind not in _ROPE_TYPES_KEEPING_LENGTH:
            if kind == "yarn":
                length = int(rope.get("original_max_position_embeddings", length))
            length = int(length * rope["factor"])
    return length


def _first_int(cfg: dict, *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def model_facts_from_dir(path: Path) -> ModelFacts:
    """Facts of a local model directory: its config.json and the size of its weight files."""
    try:
        config_json = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelFactsError(f"cannot read {path / 'config.json'}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFactsError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    weights = [p for p in path.glob("*.safetensors")] or [p for p in path.glob("*.bin")]
    size = sum(p.stat().st_size for p in weights) if weights else None
    return model_facts_from_hf_config(config_json, size)


def load_model_facts(model: str) -> tuple[ModelFacts | None, str]:
    """(facts, note) for the configured model; facts are None when the plan must do without."""
    path = Path(model)
    if not path.is_dir():
        return None, f"{model}: not a local directory, so its size is unknown until it is downloaded"
    try:
        facts = model_facts_from_dir(path)
    except ModelFactsError as exc:
        return None, str(exc)
    return facts, f"{model}: {facts.describe()}"


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Knobs:
    """The configuration values the plan reads, as plain values ("auto" literal)."""
    tensor_parallel_size: int | str = AUTO
    max_concurrent: int | str = AUTO
    max_num_seqs: int | str = AUTO
    max_model_len: int | str = AUTO
    gpu_memory_utilization: float = 0.90
    cuda_visible_devices: str = ""
    hip_visible_devices: str = ""


@dataclass(frozen=True)
class Plan:
    accelerator: str                          # "cuda" | "rocm" | "cpu"
    visible_devices: tuple[int, ...]          # host GPU indices the engine gets, in its order
    tensor_parallel_size: int
    gpu_memory_utilization: float | None      # None on cpu
    max_model_len: int | None                 # None = the model's default
    max_concurrent: int
    max_num_seqs: int
    cpu_kvcache_space_gb: int | None
    cpu_threads: int | None
    engine_env: dict[str, str]
    reasons: dict[str, str]
    warnings: tuple[str, ...] = ()
    engine_env_remove: tuple[str, ...] = ()   # must not reach the engine (would conflict)
    kv_capacity_tokens: int | None = None     # the estimate the numbers above came from


@dataclass
class _Draft:
    """The plan while it is being decided; frozen into a Plan at the end."""
    reasons: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def build_plan(knobs: Knobs, hw: Hardware, facts: ModelFacts | None, model_note: str = "") -> Plan:
    """Decide every engine setting; raise PlanError for a setting that cannot work."""
    draft = _Draft()
    if model_note:
        draft.reasons["model"] = model_note
    vendor = hw.vendor
    if vendor is None:
        return _cpu_plan(knobs, hw, facts, draft)
    return _gpu_plan(knobs, hw, facts, vendor, draft)


def _gpu_plan(knobs: Knobs, hw: Hardware, facts: ModelFacts | None, vendor: str, draft: _Draft) -> Plan:
    accelerator = "cuda" if vendor == "nvidia" else "rocm"
    mask_key, mask = _mask_setting(knobs, vendor)
    try:
        visible = apply_mask(hw.gpus_of(vendor), mask)
    except ValueError as exc:
        raise PlanError(mask_key, str(exc)) from None
    others = [g for g in hw.gpus if g.vendor != vendor]
    draft.reasons["accelerator"] = (f"{len(hw.gpus_of(vendor))} {vendor.upper() if vendor == 'amd' else 'NVIDIA'} "
                                    f"GPU(s) found" + (f"; {len(others)} {others[0].vendor} GPU(s) ignored" if others else ""))
    tp = _tensor_parallel(knobs.tensor_parallel_size, len(visible), mask, facts, draft)
    used = visible[:tp]
    draft.reasons["visible_devices"] = _describe_devices(used, visible, mask, mask_key)

    util = float(knobs.gpu_memory_utilization)
    per_gpu = min(g.memory_total_mib for g in used) * MIB
    draft.reasons["gpu_memory_utilization"] = (f"{util:.2f} of {_gib(per_gpu)} per GPU "
                                               f"(engine.gpu_memory_utilization)")
    _warn_busy_gpus(used, util, draft)
    capacity = _gpu_kv_capacity(facts, tp, per_gpu, util, knobs, draft)

    max_len = _max_model_len(knobs.max_model_len, facts, capacity, draft)
    concurrent = _max_concurrent(knobs.max_concurrent, capacity, max_len, facts, MAX_CONCURRENT_CEILING, draft)
    large = per_gpu >= VLLM_LARGE_GPU_BYTES and not any("a100" in g.name.lower() for g in used)
    engine_default = VLLM_MAX_NUM_SEQS_LARGE_GPU if large else VLLM_MAX_NUM_SEQS_GPU
    concurrent, seqs = _max_num_seqs(knobs, concurrent, engine_default,
                                     f"vLLM's default on {'≥ 70 GiB GPUs' if large else 'this GPU'}", draft)

    indices = ",".join(str(g.index) for g in used)
    if accelerator == "cuda":
        # nvidia-smi numbers GPUs in PCI bus order; CUDA's default order is
        # "fastest first". Without this the mask could pick other GPUs than asked.
        env = {"CUDA_VISIBLE_DEVICES": indices, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        remove: tuple[str, ...] = ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
        draft.reasons["engine_env"] = "CUDA_VISIBLE_DEVICES in nvidia-smi's (PCI bus) numbering"
    else:
        # vLLM on ROCm copies HIP_VISIBLE_DEVICES into CUDA_VISIBLE_DEVICES and
        # asserts they agree; ROCR_VISIBLE_DEVICES would mask a second time.
        env = {"HIP_VISIBLE_DEVICES": indices}
        remove = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
        draft.reasons["engine_env"] = ("HIP_VISIBLE_DEVICES only (amd-smi ignores masks, so ximd applied it; "
                                       "CUDA_VISIBLE_DEVICES/ROCR_VISIBLE_DEVICES removed to avoid a double mask)")
    return Plan(accelerator=accelerator, visible_devices=tuple(g.index for g in used),
                tensor_parallel_size=tp, gpu_memory_utilization=util, max_model_len=max_len,
                max_concurrent=concurrent, max_num_seqs=seqs, cpu_kvcache_space_gb=None,
                cpu_threads=None, engine_env=env, reasons=draft.reasons,
                warnings=tuple(draft.warnings), engine_env_remove=remove, kv_capacity_tokens=capacity)


def _mask_setting(knobs: Knobs, vendor: str) -> tuple[str, str]:
    if vendor == "amd" and not knobs.hip_visible_devices.strip() and knobs.cuda_visible_devices.strip():
        return "engine.cuda_visible_devices", knobs.cuda_visible_devices  # vLLM treats them alike on ROCm
    if vendor == "amd":
        return "engine.hip_visible_devices", knobs.hip_visible_devices
    return "engine.cuda_visible_devices", knobs.cuda_visible_devices


def _tensor_parallel(setting: int | str, visible: int, mask: str, facts: ModelFacts | None,
                     draft: _Draft) -> int:
    key = "engine.tensor_parallel_size"
    where = f"mask {mask}" if mask.strip() else "no mask"
    heads = facts.num_attention_heads if facts else None
    if setting != AUTO:
        tp = int(setting)
        if tp > visible:
            raise PlanError(key, f"{tp} needs {tp} GPUs, but only {visible} are visible ({where})")
        problem = _tp_model_problem(tp, facts)
        if problem:
            raise PlanError(key, problem)
        draft.reasons["tensor_parallel_size"] = f"{tp}, set explicitly ({visible} visible GPUs, {where})"
        return tp
    tp = 1 << (visible.bit_length() - 1)  # largest power of two ≤ visible
    while tp > 1 and _tp_model_problem(tp, facts):
        tp //= 2
    why = f"{visible} visible GPU{'s' if visible != 1 else ''} ({where})"
    if tp != visible:
        limits = ["a power of two"]
        if heads and (1 << (visible.bit_length() - 1)) != tp:
            limits.append(f"dividing the model's {heads} attention heads")
        why += f", rounded down to {tp}: TP must be {' and '.join(limits)}; the rest stay idle"
    draft.reasons["tensor_parallel_size"] = why
    return tp


def _tp_model_problem(tp: int, facts: ModelFacts | None) -> str | None:
    if facts is None:
        return None
    heads, kv = facts.num_attention_heads, facts.num_kv_heads
    if heads and heads % tp:
        return f"{tp} does not divide the model's {heads} attention heads"
    if kv and not facts.mla_latent_dim and (kv % tp if kv >= tp else tp % kv):
        return f"{tp} and the model's {kv} KV heads do not divide one another"
    return None


def _describe_devices(used: tuple[Gpu, ...], visible: tuple[Gpu, ...], mask: str, mask_key: str) -> str:
    names = ", ".join(f"{g.index}: {g.name} {_gib(g.memory_total_mib * MIB)}" for g in used)
    text = f"GPU {names}" + (f" (mask {mask} from {mask_key})" if mask.strip() else " (no mask: all GPUs)")
    idle = visible[len(used):]
    if idle:
        text += f"; GPU {','.join(str(g.index) for g in idle)} unused by this TP size"
    return text


def _warn_busy_gpus(used: tuple[Gpu, ...], util: float, draft: _Draft) -> None:
    for gpu in used:
        free = (gpu.memory_total_mib - gpu.memory_used_mib) * MIB
        if free < util * gpu.memory_total_mib * MIB:
            draft.warnings.append(
                f"GPU {gpu.index} already has {_gib(gpu.memory_used_mib * MIB)} in use; vLLM needs "
                f"{util:.2f} × {_gib(gpu.memory_total_mib * MIB)} free at start and will refuse: stop "
                f"what holds it (nvidia-smi/amd-smi lists it) or lower engine.gpu_memory_utilization")


def _gpu_kv_capacity(facts: ModelFacts | None, tp: int, per_gpu: int, util: float, knobs: Knobs,
                     draft: _Draft) -> int | None:
    per_token = facts.kv_bytes_per_token(tp) if facts else None
    weights = facts.weight_bytes if facts else None
    if weights is not None and weights / tp > util * per_gpu:
        key = "engine.model" if knobs.tensor_parallel_size == AUTO else "engine.tensor_parallel_size"
        raise PlanError(key, f"the model's weights need {_gib(weights / tp)} per GPU at tensor_parallel_size "
                             f"{tp}, more than {util:.2f} × {_gib(per_gpu)}; use more GPUs, a smaller or "
                             f"quantised model, or a higher engine.gpu_memory_utilization")
    if per_token is None or weights is None:
        draft.reasons["kv_capacity_tokens"] = "unknown: needs the model's layers, KV heads and weight size"
        return None
    budget = util * per_gpu - weights / tp - GPU_NON_KV_RESERVE_BYTES
    if budget <= 0:
        draft.warnings.append(f"after {_gib(weights / tp)} of weights and {_gib(GPU_NON_KV_RESERVE_BYTES)} of "
                              f"runtime per GPU, nothing is left for the KV cache at utilisation {util:.2f}; "
                              f"the engine will probably fail to start")
        budget = 0
    capacity = int(budget // per_token)
    draft.reasons["kv_capacity_tokens"] = (f"about {capacity} tokens: {util:.2f} × {_gib(per_gpu)} − "
                                           f"{_gib(weights / tp)} weights − {_gib(GPU_NON_KV_RESERVE_BYTES)} "
                                           f"runtime per GPU, at {per_token} bytes per token")
    return capacity


def _max_model_len(setting: int | str, facts: ModelFacts | None, capacity: int | None,
                   draft: _Draft) -> int | None:
    default = facts.max_position_embeddings if facts else None
    if setting != AUTO:
        length = int(setting)
        draft.reasons["max_model_len"] = f"{length}, set explicitly"
        if default and length > default:
            draft.warnings.append(f"engine.max_model_len {length} is above the model's {default}; vLLM "
                                  f"refuses that unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1")
        if capacity is not None and length > capacity:
            draft.warnings.append(f"engine.max_model_len {length} is more than the KV cache holds "
                                  f"(about {capacity} tokens); vLLM will refuse to start")
        return length
    if default is None:
        draft.reasons["max_model_len"] = "the model's default (not known before it is loaded)"
        return None
    if capacity is not None and capacity < default:
        fitted = 1 << (capacity.bit_length() - 1) if capacity >= 1 else 1
        draft.reasons["max_model_len"] = (f"{fitted}: the KV cache holds about {capacity} tokens, less than "
                                          f"one sequence of the model's {default}; largest power of two that fits")
        return fitted
    draft.reasons["max_model_len"] = f"the model's default ({default} tokens)"
    return None


def _max_concurrent(setting: int | str, capacity: int | None, max_len: int | None,
                    facts: ModelFacts | None, ceiling: int, draft: _Draft) -> int:
    length = max_len or (facts.max_position_embeddings if facts else None) or EXPECTED_REQUEST_TOKENS
    per_request = min(EXPECTED_REQUEST_TOKENS, length)
    holds = max(1, capacity // per_request) if capacity is not None else None
    if setting != AUTO:
        value = int(setting)
        draft.reasons["max_concurrent"] = f"{value}, set explicitly"
        if holds is not None and value > holds:
            draft.warnings.append(
                f"agent.max_concurrent {value} is above what the KV cache holds (about {holds} requests of "
                f"{per_request} tokens); kept as set: the engine queues or preempts the excess, so "
                f"latency grows instead of requests failing")
        return value
    if holds is None:
        draft.reasons["max_concurrent"] = (f"{FALLBACK_MAX_CONCURRENT}: the plan cannot tell the KV-cache size "
                                           f"without the model's facts (seed default)")
        return FALLBACK_MAX_CONCURRENT
    value = min(holds, ceiling)
    draft.reasons["max_concurrent"] = (f"{value}: KV cache of about {capacity} tokens / {per_request} tokens "
                                       f"per request" + (f", capped at {ceiling}" if holds > ceiling else ""))
    return value


def _max_num_seqs(knobs: Knobs, concurrent: int, engine_default: int, default_why: str,
                  draft: _Draft) -> tuple[int, int]:
    """(max_concurrent, max_num_seqs): the batch never admits less than the node does."""
    if knobs.max_num_seqs != AUTO:
        seqs = int(knobs.max_num_seqs)
        if seqs < concurrent:
            if knobs.max_concurrent != AUTO:
                raise PlanError("engine.max_num_seqs", f"{seqs} is below agent.max_concurrent ({concurrent}): "
                                                       f"the engine would queue requests the node admitted")
            draft.reasons["max_concurrent"] += f"; lowered to {seqs} to stay within engine.max_num_seqs"
            concurrent = seqs
        draft.reasons["max_num_seqs"] = f"{seqs}, set explicitly"
        return concurrent, seqs
    seqs = max(concurrent, engine_default)
    draft.reasons["max_num_seqs"] = (f"{seqs}: {default_why} ({engine_default})" if seqs == engine_default
                                     else f"{seqs}: raised to max_concurrent (above {default_why}, {engine_default})")
    return concurrent, seqs


def _cpu_plan(knobs: Knobs, hw: Hardware, facts: ModelFacts | None, draft: _Draft) -> Plan:
    failed = [p for p in hw.probes if p.found and p.error]
    draft.reasons["accelerator"] = "no GPU found: the CPU engine" + (
        f" ({', '.join(p.tool for p in failed)} present but failed)" if failed else "")
    for probe in failed:
        draft.warnings.append(f"{probe.tool} is installed but gave no GPUs ({probe.error}); planning for the "
                              f"CPU engine: run `ximd doctor`")
    if knobs.tensor_parallel_size not in (AUTO, 1):
        raise PlanError("engine.tensor_parallel_size",
                        f"{knobs.tensor_parallel_size} needs GPUs, but this host has none (the CPU engine runs 1)")
    draft.reasons["tensor_parallel_size"] = "1: the CPU engine"
    for key, mask in (("engine.cuda_visible_devices", knobs.cuda_visible_devices),
                      ("engine.hip_visible_devices", knobs.hip_visible_devices)):
        if mask.strip():
            draft.warnings.append(f"{key} = {mask!r} ignored: no GPUs found")
    draft.reasons["visible_devices"] = "none"
    draft.reasons["gpu_memory_utilization"] = "not used by the CPU engine (VLLM_CPU_KVCACHE_SPACE sizes its KV cache)"

    kv_gib = _cpu_kv_space(knobs, hw, facts, draft)
    per_token = facts.kv_bytes_per_token(1) if facts else None
    capacity = kv_gib * GIB // per_token if per_token else None
    draft.reasons["kv_capacity_tokens"] = (f"about {capacity} tokens: {kv_gib} GiB at {per_token} bytes per token"
                                           if capacity is not None else "unknown: needs the model's layers and KV heads")
    max_len = _max_model_len(knobs.max_model_len, facts, capacity, draft)
    concurrent = _max_concurrent(knobs.max_concurrent, capacity, max_len, facts,
                                 min(MAX_CONCURRENT_CEILING, VLLM_MAX_NUM_SEQS_CPU), draft)
    concurrent, seqs = _max_num_seqs(knobs, concurrent, VLLM_MAX_NUM_SEQS_CPU, "vLLM's CPU default", draft)

    cpus = hw.usable_cpus or tuple(range(hw.cpu_count))
    bound = cpus[:-1] if len(cpus) > 1 else cpus
    draft.reasons["cpu_threads"] = (f"{len(bound)} of {len(cpus)} usable CPUs, CPU {cpus[-1]} left for ximd and "
                                    f"the engine's API process" if len(cpus) > 1
                                    else "1: the only usable CPU (nothing left to reserve)")
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_CPU_OMP_THREADS_BIND": cpu_list(bound)}
    draft.reasons["engine_env"] = "VLLM_CPU_KVCACHE_SPACE (GiB) and VLLM_CPU_OMP_THREADS_BIND (CPU ids)"
    return Plan(accelerator="cpu", visible_devices=(), tensor_parallel_size=1, gpu_memory_utilization=None,
                max_model_len=max_len, max_concurrent=concurrent, max_num_seqs=seqs,
                cpu_kvcache_space_gb=kv_gib, cpu_threads=len(bound), engine_env=env, reasons=draft.reasons,
                warnings=tuple(draft.warnings), kv_capacity_tokens=capacity)


def _cpu_kv_space(knobs: Knobs, hw: Hardware, facts: ModelFacts | None, draft: _Draft) -> int:
    """GiB for VLLM_CPU_KVCACHE_SPACE: a share of the RAM the weights leave, no more than the model can use.

    vLLM allocates all of it at start, so sizing it to what max_model_len ×
    max_num_seqs tokens can fill keeps RAM for the page cache and LMCache.
    """
    weights = (facts.weight_bytes if facts else None) or 0
    share = int((hw.ram_bytes - weights) * CPU_KV_RAM_SHARE // GIB)
    why = f"{CPU_KV_RAM_SHARE:.0%} of {_gib(hw.ram_bytes)} RAM" + (f" minus {_gib(weights)} weights" if weights else "")
    per_token = facts.kv_bytes_per_token(1) if facts else None
    length = knobs.max_model_len if knobs.max_model_len != AUTO else (facts.max_position_embeddings if facts else None)
    seqs = max(int(v) for v in (knobs.max_num_seqs, knobs.max_concurrent, VLLM_MAX_NUM_SEQS_CPU) if v != AUTO)
    size = share
    if per_token and length:
        usable = math.ceil(int(length) * seqs * per_token / GIB)
        if usable < share:
            size = usable
            why = f"what {seqs} sequences of {length} tokens can fill ({usable} GiB; {why} would be {share} GiB)"
    if size < CPU_KV_MIN_GIB:
        why += f", raised to the {CPU_KV_MIN_GIB} GiB minimum"
        size = CPU_KV_MIN_GIB
    draft.reasons["cpu_kvcache_space_gb"] = f"{size}: {why}"
    if hw.ram_bytes and weights + size * GIB + CPU_RUNTIME_RESERVE_BYTES > hw.ram_bytes:
        draft.warnings.append(f"{_gib(weights)} of weights + {size} GiB KV cache + "
                              f"{_gib(CPU_RUNTIME_RESERVE_BYTES)} runtime exceed {_gib(hw.ram_bytes)} RAM; "
                              f"the engine may be killed for memory")
    return size


def cpu_list(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 7, 8) → "0-2,5,7-8": the syntax VLLM_CPU_OMP_THREADS_BIND takes."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


# ---------------------------------------------------------------- adapters


def knobs_from_config(cfg) -> Knobs:
    """The plan's inputs from a ximd.config.Config."""
    return Knobs(tensor_parallel_size=cfg.engine.tensor_parallel_size,
                 max_concurrent=cfg.agent.max_concurrent,
                 max_num_seqs=cfg.engine.max_num_seqs,
                 max_model_len=cfg.engine.max_model_len,
                 gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
                 cuda_visible_devices=cfg.engine.cuda_visible_devices,
                 hip_visible_devices=cfg.engine.hip_visible_devices)


def plan_from_config(cfg, hw: Hardware, facts: ModelFacts | None, model_note: str = "") -> Plan:
    return build_plan(knobs_from_config(cfg), hw, facts, model_note)


plan = plan_from_config  # the name docs/architecture.md gives the contract
