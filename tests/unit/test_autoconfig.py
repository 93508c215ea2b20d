"""The plan on topologies given as data: the seed's (1 GPU; 2 GPUs mask 0,1; GPUs 2,3 of 4),
the H100 host's fixture, the AMD sample, and CPU-only hosts shaped like this one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ximd import autoconfig, config, hardware
from ximd.autoconfig import GIB, Knobs, ModelFacts, PlanError
from ximd.commands import plan as plan_cmd
from ximd.hardware import Gpu, Hardware
from ximd.units import MIB

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
H100_FIXTURE = hardware.parse_nvidia_query_csv((FIXTURES / "nvidia-h100-driver580/nvidia-smi-query.csv").read_text())[0]
MI300X_HOST = hardware.parse_amd_smi_static((FIXTURES / "amd-handwritten/amd-smi-static-gpu_data.json").read_text())

# Llama-3.2-1B-Instruct's config.json (the seed's default model), abridged to what the plan reads.
LLAMA_1B_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "head_dim": 64,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16,
                   "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
                   "rope_scaling": {"factor": 32.0, "rope_type": "llama3", "original_max_position_embeddings": 8192}}
LLAMA_1B = autoconfig.model_facts_from_hf_config(LLAMA_1B_CONFIG, 2_471_645_608)
# A 70B-class model (80 layers, 8 KV heads × 128) with 4-bit weights of 40 GB.
BIG = ModelFacts(num_layers=80, num_attention_heads=64, num_kv_heads=8, head_dim=128,
                 max_position_embeddings=131072, dtype_bytes=2, weights_bytes=40 * 10 ** 9)
# The integration tests' tiny model: 2 layers, 2 heads of 64, float32, 2048 tokens.
TINY = ModelFacts(num_layers=2, num_attention_heads=2, num_kv_heads=2, head_dim=64,
                  max_position_embeddings=2048, dtype_bytes=4, weights_bytes=6_300_000)


def nvidia_host(count: int, gpu: Gpu = H100_FIXTURE, **changes) -> Hardware:
    gpus = tuple(dataclasses.replace(gpu, index=i, uuid=f"GPU-{i}", pci_bus_id=f"00000000:{i + 6:02X}:00.0",
                                     **changes) for i in range(count))
    return Hardware(gpus=gpus, ram_bytes=125 * GIB, cpu_count=16, shm_bytes=128 * GIB,
                    device_majors={"nvidia": 195, "nvidiactl": 195, "nvidia-uvm": 238},
                    usable_cpus=tuple(range(16)))


def cpu_host(cpus: tuple[int, ...] = (0, 1), ram: int = 24_684_096 * 1024) -> Hardware:
    """This CI machine's shape by default: 2 CPUs, 23.5 GiB."""
    return Hardware(gpus=(), ram_bytes=ram, cpu_count=len(cpus), shm_bytes=ram, usable_cpus=cpus,
                    probes=(hardware.Probe("nvidia-smi", False), hardware.Probe("amd-smi", False)))


# ---------------------------------------------------------------- the seed's topologies


@pytest.mark.parametrize("count, mask, tp, devices", [
    (1, "", 1, (0,)),                 # Single GPU setup
    (1, "0", 1, (0,)),                # ... as the seed writes it: CUDA_VISIBLE_DEVICES=0
    (2, "0,1", 2, (0, 1)),            # Multi-GPU setup
    (4, "2,3", 2, (2, 3)),            # GPUs 2 and 3 on a 4-GPU system
    (4, "", 4, (0, 1, 2, 3)),
    (8, "", 8, tuple(range(8))),
    (4, "3,1", 2, (3, 1)),            # the engine numbers them in mask order
])
def test_seed_topologies_tensor_parallel_and_mask(count, mask, tp, devices):
    p = autoconfig.build_plan(Knobs(cuda_visible_devices=mask), nvidia_host(count), LLAMA_1B)
    assert p.accelerator == "cuda" and p.tensor_parallel_size == tp and p.visible_devices == devices
    assert p.engine_env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, devices))
    assert p.engine_env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "HIP_VISIBLE_DEVICES" in p.engine_env_remove
    assert f"{len(devices)} visible GPU" in p.reasons["tensor_parallel_size"]
    assert (f"mask {mask}" in p.reasons["visible_devices"]) if mask else ("all GPUs" in p.reasons["visible_devices"])


def test_three_gpus_round_down_to_a_power_of_two_and_say_so():
    p = autoconfig.build_plan(Knobs(), nvidia_host(3), LLAMA_1B)
    assert p.tensor_parallel_size == 2 and p.visible_devices == (0, 1)
    assert "rounded down to 2" in p.reasons["tensor_parallel_size"]
    assert "power of two" in p.reasons["tensor_parallel_size"]
    assert "GPU 2 unused" in p.reasons["visible_devices"]


def test_auto_tp_also_divides_the_attention_heads():
    qwen_like = dataclasses.replace(LLAMA_1B, num_attention_heads=28, num_kv_heads=4)
    p = autoconfig.build_plan(Knobs(), nvidia_host(8), qwen_like)
    assert p.tensor_parallel_size == 4
    assert "dividing the model's 28 attention heads" in p.reasons["tensor_parallel_size"]


def test_h100_fixture_with_the_seed_model():
    p = autoconfig.build_plan(Knobs(), nvidia_host(1), LLAMA_1B)
    # KV per token: 2 (K,V) × 16 layers × 8 heads × 64 × 2 bytes = 32768.
    # Budget: 0.90 × 81559 MiB − 2 471 645 608 weight bytes − 2 GiB runtime.
    budget = 0.90 * 81559 * MIB - 2_471_645_608 - 2 * GIB
    assert p.kv_capacity_tokens == int(budget // 32768) == 2_207_934
    assert p.gpu_memory_utilization == 0.90
    assert p.max_model_len is None and "131072" in p.reasons["max_model_len"]  # llama3 rope keeps the length
    assert p.max_concurrent == 256 and "capped at 256" in p.reasons["max_concurrent"]
    assert p.max_num_seqs == 1024 and "≥ 70 GiB" in p.reasons["max_num_seqs"]  # vLLM's own default there
    assert p.cpu_kvcache_space_gb is None and p.cpu_threads is None and p.warnings == ()


H200_FIXTURE = hardware.parse_nvidia_query_csv(
    (FIXTURES / "nvidia-h200-driver580/nvidia-smi-query-noheader.csv").read_text())[0]
# tools/gpu-host-check.sh's two model directories (Llama-3.1-8B / -70B shapes, bf16).
LLAMA_8B = autoconfig.model_facts_from_hf_config(
    {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
     "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}, 16_060_522_496)
LLAMA_70B = autoconfig.model_facts_from_hf_config(
    {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
     "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}, 141_107_412_992)


def test_h200_capture_plans_what_the_real_host_printed():
    # `ximd plan` on the H200 itself (2026-11-27) printed these figures.
    p = autoconfig.build_plan(Knobs(), nvidia_host(1, H200_FIXTURE), LLAMA_8B)
    assert (p.tensor_parallel_size, p.kv_capacity_tokens, p.max_concurrent, p.max_num_seqs) == (1, 896_235, 256, 1024)
    with pytest.raises(PlanError, match="131.4 GiB per GPU at tensor_parallel_size 1, more than 0.90 × 140.4 GiB"):
        autoconfig.build_plan(Knobs(), nvidia_host(1, H200_FIXTURE), LLAMA_70B)
    assert autoconfig.build_plan(Knobs(), nvidia_host(2, H200_FIXTURE), LLAMA_70B).tensor_parallel_size == 2


def test_a_model_whose_context_does_not_fit_gets_the_largest_power_of_two():
    p = autoconfig.build_plan(Knobs(), nvidia_host(1), BIG)
    cap = p.kv_capacity_tokens
    assert 0 < cap < 131072
    # 0.90 × 79.6 GiB − 37.3 GiB weights − 2 GiB = 32.4 GiB at 327680 bytes/token: ~106k tokens.
    assert p.max_model_len == 65536 and p.max_model_len <= cap < 2 * p.max_model_len
    assert "largest power of two" in p.reasons["max_model_len"]
    assert p.max_concurrent == cap // 2048


def test_more_gpus_give_the_same_model_its_full_context():
    p = autoconfig.build_plan(Knobs(), nvidia_host(2), BIG)
    assert p.tensor_parallel_size == 2 and p.max_model_len is None


def test_max_concurrent_without_model_facts_is_eight():
    p = autoconfig.build_plan(Knobs(), nvidia_host(1), None, "org/model: not a local directory")
    assert p.max_concurrent == 8 and "cannot tell" in p.reasons["max_concurrent"]
    assert p.kv_capacity_tokens is None and p.max_model_len is None
    assert p.max_num_seqs == 1024
    assert p.reasons["model"] == "org/model: not a local directory"


def test_smaller_gpu_keeps_vllm_256_and_a100_is_excluded_like_vllm_does():
    p24 = autoconfig.build_plan(Knobs(), nvidia_host(1, memory_total_mib=24576, name="NVIDIA L4"), LLAMA_1B)
    a100 = autoconfig.build_plan(Knobs(), nvidia_host(1, name="NVIDIA A100-SXM4-80GB"), LLAMA_1B)
    assert p24.max_num_seqs == 256 and a100.max_num_seqs == 256


# ---------------------------------------------------------------- explicit values


def test_explicit_tp_wins_and_leaves_gpus_idle():
    p = autoconfig.build_plan(Knobs(tensor_parallel_size=1, cuda_visible_devices="0,1"), nvidia_host(2), LLAMA_1B)
    assert p.tensor_parallel_size == 1 and p.visible_devices == (0,)
    assert p.engine_env["CUDA_VISIBLE_DEVICES"] == "0"
    assert "set explicitly" in p.reasons["tensor_parallel_size"]


def test_explicit_tp_above_the_visible_gpus_is_a_config_error():
    with pytest.raises(PlanError) as info:
        autoconfig.build_plan(Knobs(tensor_parallel_size=4, cuda_visible_devices="2,3"), nvidia_host(4), LLAMA_1B)
    assert info.value.key == "engine.tensor_parallel_size"
    assert "only 2 are visible (mask 2,3)" in str(info.value)


def test_explicit_tp_not_dividing_the_heads_is_a_config_error():
    with pytest.raises(PlanError, match="3 does not divide the model's 32 attention heads"):
        autoconfig.build_plan(Knobs(tensor_parallel_size=3), nvidia_host(4), LLAMA_1B)


def test_explicit_tp_without_model_facts_is_taken_on_trust():
    assert autoconfig.build_plan(Knobs(tensor_parallel_size=3), nvidia_host(4), None).tensor_parallel_size == 3


def test_mask_naming_a_missing_gpu_is_a_config_error_on_that_key():
    with pytest.raises(PlanError) as info:
        autoconfig.build_plan(Knobs(cuda_visible_devices="4"), nvidia_host(4), None)
    assert info.value.key == "engine.cuda_visible_devices" and "has GPUs 0,1,2,3" in str(info.value)


def test_garbage_mask_is_a_config_error():
    with pytest.raises(PlanError, match="engine.cuda_visible_devices: invalid GPU mask 'x'"):
        autoconfig.build_plan(Knobs(cuda_visible_devices="x"), nvidia_host(1), None)


def test_weights_that_cannot_fit_are_a_config_error():
    huge = dataclasses.replace(BIG, weights_bytes=140 * 10 ** 9)
    with pytest.raises(PlanError) as info:
        autoconfig.build_plan(Knobs(), nvidia_host(1), huge)
    assert info.value.key == "engine.model" and "more than 0.90 × 79.6 GiB" in str(info.value)
    with pytest.raises(PlanError) as info:
        autoconfig.build_plan(Knobs(tensor_parallel_size=1), nvidia_host(2), huge)
    assert info.value.key == "engine.tensor_parallel_size"
    assert autoconfig.build_plan(Knobs(), nvidia_host(2), huge).tensor_parallel_size == 2


def test_explicit_max_concurrent_above_the_kv_cache_is_kept_with_a_warning():
    p = autoconfig.build_plan(Knobs(max_concurrent=200), nvidia_host(1), BIG)
    assert p.max_concurrent == 200
    assert any("agent.max_concurrent 200 is above what the KV cache holds" in w for w in p.warnings)
    assert p.max_num_seqs == 1024


def test_explicit_max_concurrent_within_the_kv_cache_has_no_warning():
    p = autoconfig.build_plan(Knobs(max_concurrent=4), nvidia_host(1), BIG)
    assert p.max_concurrent == 4 and p.warnings == ()


def test_max_num_seqs_follows_a_large_max_concurrent():
    p = autoconfig.build_plan(Knobs(max_concurrent=2000), nvidia_host(1), None)
    assert p.max_num_seqs == 2000 and "raised to max_concurrent" in p.reasons["max_num_seqs"]


def test_explicit_max_num_seqs_lowers_auto_max_concurrent():
    p = autoconfig.build_plan(Knobs(max_num_seqs=16), nvidia_host(1), LLAMA_1B)
    assert (p.max_concurrent, p.max_num_seqs) == (16, 16)
    assert "lowered to 16" in p.reasons["max_concurrent"]


def test_explicit_max_num_seqs_below_explicit_max_concurrent_is_a_config_error():
    with pytest.raises(PlanError) as info:
        autoconfig.build_plan(Knobs(max_num_seqs=4, max_concurrent=8), nvidia_host(1), None)
    assert info.value.key == "engine.max_num_seqs"


def test_explicit_max_model_len_wins_with_warnings_when_it_cannot_work():
    p = autoconfig.build_plan(Knobs(max_model_len=262144), nvidia_host(1), BIG)
    assert p.max_model_len == 262144
    assert any("above the model's 131072" in w for w in p.warnings)
    assert any("more than the KV cache holds" in w for w in p.warnings)


def test_explicit_gpu_memory_utilization_changes_the_budget():
    low = autoconfig.build_plan(Knobs(gpu_memory_utilization=0.5), nvidia_host(1), LLAMA_1B)
    high = autoconfig.build_plan(Knobs(), nvidia_host(1), LLAMA_1B)
    assert low.gpu_memory_utilization == 0.5 and low.kv_capacity_tokens < high.kv_capacity_tokens


def test_a_gpu_already_in_use_is_warned_about():
    p = autoconfig.build_plan(Knobs(), nvidia_host(1, memory_used_mib=20000), LLAMA_1B)
    assert any("GPU 0 already has 19.5 GiB in use" in w for w in p.warnings)


# ---------------------------------------------------------------- ROCm


def amd_host() -> Hardware:
    return Hardware(gpus=MI300X_HOST, ram_bytes=1536 * GIB, cpu_count=128, shm_bytes=768 * GIB,
                    device_majors={"kfd": 234, "drm": 226}, usable_cpus=tuple(range(128)))


def test_rocm_uses_hip_visible_devices_and_no_cuda_env():
    p = autoconfig.build_plan(Knobs(hip_visible_devices="2,3"), amd_host(), LLAMA_1B)
    assert p.accelerator == "rocm" and p.tensor_parallel_size == 2 and p.visible_devices == (2, 3)
    assert p.engine_env == {"HIP_VISIBLE_DEVICES": "2,3"}
    assert set(p.engine_env_remove) == {"CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"}
    assert "engine.hip_visible_devices" in p.reasons["visible_devices"]
    assert p.max_num_seqs == 1024  # vLLM treats MI300X (≥ 70 GiB) like H100


def test_rocm_all_four_and_a_cuda_mask_is_honoured_when_hip_is_unset():
    assert autoconfig.build_plan(Knobs(), amd_host(), None).tensor_parallel_size == 4
    p = autoconfig.build_plan(Knobs(cuda_visible_devices="1"), amd_host(), None)
    assert p.visible_devices == (1,) and "engine.cuda_visible_devices" in p.reasons["visible_devices"]
    with pytest.raises(PlanError) as info:
        autoconfig.build_plan(Knobs(hip_visible_devices="7"), amd_host(), None)
    assert info.value.key == "engine.hip_visible_devices"


# ---------------------------------------------------------------- CPU-only hosts


def test_cpu_host_like_this_one_without_model_facts():
    p = autoconfig.build_plan(Knobs(), cpu_host(), None)
    assert (p.accelerator, p.tensor_parallel_size, p.visible_devices) == ("cpu", 1, ())
    assert p.gpu_memory_utilization is None and "not used" in p.reasons["gpu_memory_utilization"]
    assert p.max_concurrent == 8 and p.max_num_seqs == 128
    assert p.cpu_kvcache_space_gb == 5  # 25% of 23.5 GiB, floored
    assert p.cpu_threads == 1 and "CPU 1 left for ximd" in p.reasons["cpu_threads"]
    assert p.engine_env == {"VLLM_CPU_KVCACHE_SPACE": "5", "VLLM_CPU_OMP_THREADS_BIND": "0"}


def test_cpu_host_with_the_tiny_model_sizes_kv_to_what_it_can_use():
    p = autoconfig.build_plan(Knobs(), cpu_host(), TINY)
    # 128 sequences × 2048 tokens × 2048 bytes/token = 512 MiB → 1 GiB (the minimum).
    assert p.cpu_kvcache_space_gb == 1 and p.kv_capacity_tokens == GIB // 2048
    assert p.max_model_len is None
    assert p.max_concurrent == 128 and p.max_num_seqs == 128


def test_cpu_kv_space_never_below_one_gib_and_weights_are_subtracted():
    p = autoconfig.build_plan(Knobs(), cpu_host(ram=3 * GIB), dataclasses.replace(LLAMA_1B, weights_bytes=2 * GIB))
    assert p.cpu_kvcache_space_gb == 1 and "raised to the 1 GiB minimum" in p.reasons["cpu_kvcache_space_gb"]
    assert any("may be killed for memory" in w for w in p.warnings)
    # 32 768 bytes/token in 1 GiB is 32768 tokens: less than one 131072-token sequence.
    assert p.max_model_len == 32768


def test_cpu_threads_leave_the_last_usable_cpu_and_use_range_syntax():
    p = autoconfig.build_plan(Knobs(), cpu_host(cpus=(0, 1, 2, 3, 8, 9, 10)), None)
    assert p.cpu_threads == 6 and p.engine_env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3,8-9"


def test_single_cpu_host_binds_its_only_cpu():
    p = autoconfig.build_plan(Knobs(), cpu_host(cpus=(3,)), None)
    assert p.cpu_threads == 1 and p.engine_env["VLLM_CPU_OMP_THREADS_BIND"] == "3"


def test_cpu_host_rejects_tensor_parallel_and_ignores_masks_with_a_warning():
    with pytest.raises(PlanError) as info:
        autoconfig.build_plan(Knobs(tensor_parallel_size=2), cpu_host(), None)
    assert info.value.key == "engine.tensor_parallel_size" and "has none" in str(info.value)
    p = autoconfig.build_plan(Knobs(cuda_visible_devices="0"), cpu_host(), None)
    assert any("engine.cuda_visible_devices = '0' ignored" in w for w in p.warnings)


def test_cpu_plan_says_when_a_gpu_tool_is_broken():
    hw = dataclasses.replace(cpu_host(), probes=(hardware.Probe("nvidia-smi", True, "exited 9: driver"),))
    p = autoconfig.build_plan(Knobs(), hw, None)
    assert "nvidia-smi present but failed" in p.reasons["accelerator"]
    assert any("ximd doctor" in w for w in p.warnings)


@pytest.mark.parametrize("cpus, text", [((0,), "0"), ((0, 1, 2), "0-2"), ((5, 1, 2, 7), "1-2,5,7")])
def test_cpu_list(cpus, text):
    assert autoconfig.cpu_list(cpus) == text


# ---------------------------------------------------------------- model facts


def test_facts_from_the_llama_config():
    f = LLAMA_1B
    assert (f.num_layers, f.num_attention_heads, f.num_kv_heads, f.head_dim) == (16, 32, 8, 64)
    assert f.max_position_embeddings == 131072 and f.dtype_bytes == 2
    assert f.kv_bytes_per_token(1) == 32768 and f.kv_bytes_per_token(2) == 16384
    assert f.kv_bytes_per_token(16) == 4096  # 8 KV heads on 16 ranks: one replicated head each


def test_facts_defaults_head_dim_and_kv_heads_and_reads_float32():
    f = autoconfig.model_facts_from_hf_config({"num_hidden_layers": 2, "num_attention_heads": 4,
                                               "hidden_size": 256, "torch_dtype": "float32"}, None)
    assert (f.head_dim, f.num_kv_heads, f.dtype_bytes, f.weight_bytes) == (64, 4, 4, None)


def test_facts_from_a_multimodal_config_use_text_config():
    f = autoconfig.model_facts_from_hf_config({"model_type": "gemma3", "text_config": {
        "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "max_position_embeddings": 131072}}, None)
    assert (f.num_layers, f.num_kv_heads, f.head_dim) == (34, 4, 256)


def test_facts_yarn_scaling_multiplies_the_original_length():
    f = autoconfig.model_facts_from_hf_config({"max_position_embeddings": 32768, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, None)
    assert f.max_position_embeddings == 131072


def test_facts_mla_latent_is_per_layer_and_not_split_by_tp():
    f = autoconfig.model_facts_from_hf_config({"num_hidden_layers": 61, "num_attention_heads": 128,
                                               "kv_lora_rank": 512, "qk_rope_head_dim": 64}, None)
    assert f.kv_bytes_per_token(1) == f.kv_bytes_per_token(8) == 61 * 576 * 2


def test_facts_not_an_object():
    with pytest.raises(autoconfig.ModelFactsError):
        autoconfig.model_facts_from_hf_config(["not", "a", "dict"], None)


def test_facts_from_a_local_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_1B_CONFIG))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 500)
    facts, note = autoconfig.load_model_facts(str(tmp_path))
    assert facts.weights_bytes == 1500 and facts.num_layers == 16
    assert note.startswith(str(tmp_path)) and "16 layers" in note


def test_facts_of_a_broken_directory_or_a_hub_id_are_none_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    facts, note = autoconfig.load_model_facts(str(tmp_path))
    assert facts is None and "is not valid JSON" in note
    facts, note = autoconfig.load_model_facts(str(tmp_path / "absent"))
    assert facts is None and "not a local directory" in note
    (tmp_path / "config.json").unlink()
    assert "cannot read" in autoconfig.load_model_facts(str(tmp_path))[1]


# ---------------------------------------------------------------- output and the CLI entry


def test_render_plan_has_one_line_per_decision_with_its_reason():
    p = autoconfig.build_plan(Knobs(cuda_visible_devices="2,3"), nvidia_host(4), LLAMA_1B, "model note")
    text = plan_cmd.render_plan(p)
    for name in ("accelerator", "visible_devices", "tensor_parallel_size", "gpu_memory_utilization",
                 "max_model_len", "max_concurrent", "max_num_seqs"):
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert p.reasons[name] in line
    assert p.reasons["engine_env"] + "; unset: HIP_VISIBLE_DEVICES ROCR_VISIBLE_DEVICES" in text
    assert "visible_devices         2,3" in text and "model default" in text
    assert "CUDA_VISIBLE_DEVICES=2,3" in text and text.splitlines()[0].endswith("model note")


def test_render_plan_shows_warnings():
    text = plan_cmd.render_plan(autoconfig.build_plan(Knobs(max_concurrent=500), nvidia_host(1), BIG))
    assert "warning: agent.max_concurrent 500" in text


def test_plan_to_dict_is_json():
    p = autoconfig.build_plan(Knobs(), cpu_host(), TINY)
    data = json.loads(json.dumps(plan_cmd.plan_to_dict(p)))
    assert data["accelerator"] == "cpu" and data["visible_devices"] == [] and data["warnings"] == []
    assert data["engine_env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert set(data["reasons"]) >= {"accelerator", "max_concurrent", "cpu_kvcache_space_gb", "cpu_threads"}


def _cfg(tmp_path, text: str = ""):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return config.load(path, env={})


def test_plan_from_config_reads_the_documented_keys(tmp_path):
    cfg = _cfg(tmp_path, '[engine]\ncuda_visible_devices = "2,3"\nmax_num_seqs = 64\n'
                         '[agent]\nmax_concurrent = 12\n')
    p = autoconfig.plan(cfg, nvidia_host(4), None)
    assert (p.visible_devices, p.max_concurrent, p.max_num_seqs) == ((2, 3), 12, 64)


def test_main_prints_the_plan_as_json(tmp_path, capsys):
    cfg = _cfg(tmp_path, f'[engine]\nmodel = "{tmp_path}"\n')
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_1B_CONFIG))
    assert plan_cmd.main(cfg, "json", hw=nvidia_host(2)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tensor_parallel_size"] == 2 and "16 layers" in data["reasons"]["model"]


def test_main_text_on_this_machine(tmp_path, capsys):
    assert plan_cmd.main(_cfg(tmp_path), "text") == 0
    out = capsys.readouterr().out
    assert "max_concurrent" in out and "engine_env" in out


def test_main_reports_an_impossible_setting_as_exit_78(tmp_path, capsys):
    cfg = _cfg(tmp_path, "[engine]\ntensor_parallel_size = 8\n")
    assert plan_cmd.main(cfg, "text", hw=nvidia_host(2)) == 78
    err = capsys.readouterr().err
    assert "invalid configuration: engine.tensor_parallel_size: 8 needs 8 GPUs, but only 2 are visible" in err
    assert "Traceback" not in err
