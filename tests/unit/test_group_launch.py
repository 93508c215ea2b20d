"""A group member's engine (pure): `[group]`, the fabric, and the leader's and follower's argv and environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.support.engine import load_config, tiny_cpu_plan
from ximd.autoconfig import Plan
from ximd.config import ConfigError, load
from ximd.engine import EnginePaths, LaunchError, build_launch, describe
from ximd.engine.launch import ENGINE_MODULE, HEADLESS_SCRIPT, GroupRole, split_cpu_bind
from ximd.fabric import Fabric, FabricError, fabric_from_config, public_reason, resolve_fabric
from ximd.models import ResolvedModel

PYTHON = "/opt/xerotier/engine/bin/python"
DIRS = {"XEROTIER_AGENT_STATE_DIR": "/var/lib/xerotier", "XEROTIER_AGENT_CACHE_DIR": "/var/cache/xerotier",
        "XEROTIER_AGENT_RUNTIME_DIR": "/run/ximd"}
HOST = {"lo": ["127.0.0.1", "::1"], "eth0": ["80.1.2.3", "2001:db8::7"], "eth1": ["10.0.0.11", "fd00::11"],
        "ts0": ["100.101.1.2"], "dummy0": []}


# ---------------------------------------------------------------- [group]


def test_group_section_defaults():
    group = load(None, env={}).group
    assert (group.fabric_interface, group.fabric_address, group.port_range, group.allow_public_fabric) == (
        "", "", "29500-29599", False)


@pytest.mark.parametrize(("var", "text", "name", "expected"), [
    ("XEROTIER_AGENT_GROUP_FABRIC_INTERFACE", "eth1", "group.fabric_interface", "eth1"),
    ("XEROTIER_AGENT_GROUP_FABRIC_ADDRESS", "10.0.0.11", "group.fabric_address", "10.0.0.11"),
    ("XEROTIER_AGENT_GROUP_PORT_RANGE", " 40000 - 40099 ", "group.port_range", "40000-40099"),
    ("XEROTIER_AGENT_GROUP_ALLOW_PUBLIC_FABRIC", "yes", "group.allow_public_fabric", True),
])
def test_group_settings_from_the_environment(var, text, name, expected):
    cfg = load(None, env={var: text})
    assert cfg.get(name) == expected and cfg.origins[name] == f"env:{var}"


@pytest.mark.parametrize("text", ["29500", "29599-29500", "29500-29500", "80-90", "29500-70000", "a-b", ""])
def test_a_bad_port_range_names_the_key(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(f'[group]\nport_range = "{text}"\n')
    with pytest.raises(ConfigError) as caught:
        load(path, env={})
    assert "group.port_range" in str(caught.value) and "LOW-HIGH" in str(caught.value)


# ---------------------------------------------------------------- the fabric


@pytest.mark.parametrize("address", ["10.1.2.3", "172.16.0.1", "192.168.1.1", "fd00::1", "fe80::1",
                                     "169.254.0.9", "127.0.0.1", "100.64.0.1"])
def test_private_addresses_may_carry_a_group(address):
    assert public_reason(address) is None


@pytest.mark.parametrize(("address", "why"), [("8.8.8.8", "public"), ("2606:4700::1111", "public"),
                                              ("0.0.0.0", "one host"), ("224.0.0.1", "one host"),
                                              ("eth0", "not an IP")])
def test_public_or_meaningless_addresses_cannot(address, why):
    assert why in public_reason(address)


def fabric(interface="", address="", *, allow_public=False, port_range="29500-29599"):
    return resolve_fabric(interface, address, HOST, port_range=port_range, allow_public=allow_public)


def test_the_interface_gives_its_first_address():
    assert fabric("eth1") == Fabric("10.0.0.11", "eth1", 29500, 29599)


def test_the_address_gives_its_interface():
    assert fabric(address="fd00::11").interface == "eth1"
    assert fabric(address="100.101.1.2") == Fabric("100.101.1.2", "ts0", 29500, 29599)


def test_both_must_agree():
    assert fabric("eth1", "10.0.0.11").address == "10.0.0.11"
    with pytest.raises(FabricError, match="is on eth1, not on group.fabric_interface lo"):
        fabric("lo", "10.0.0.11")


@pytest.mark.parametrize(("interface", "address", "match"), [
    ("", "", "set group.fabric_interface"),
    ("eth9", "", "no such interface.*eth0, eth1"),
    ("", "10.9.9.9", "no interface of this host has it"),
    ("dummy0", "", "has no address"),
])
def test_a_fabric_that_cannot_be_found_says_what_to_set(interface, address, match):
    with pytest.raises(FabricError, match=match):
        fabric(interface, address)


def test_a_public_fabric_is_refused_unless_the_operator_allows_it():
    with pytest.raises(FabricError, match="80.1.2.3 is a public address.*allow_public_fabric = true"):
        fabric("eth0")
    assert fabric("eth0", allow_public=True).address == "80.1.2.3"


def test_allowing_public_does_not_allow_nonsense():
    with pytest.raises(FabricError, match="not an IP address"):
        resolve_fabric("", "host.example", {"eth0": ["host.example"]}, port_range="29500-29599", allow_public=True)


def test_ports_come_from_the_range():
    f = fabric("eth1", port_range="40000-40009")
    assert (f.master_port, f.engine_port) == (40000, 40001)


def test_fabric_from_a_loaded_configuration():
    cfg = load(None, env={"XEROTIER_AGENT_GROUP_FABRIC_INTERFACE": "lo"})
    assert fabric_from_config(cfg, HOST) == Fabric("127.0.0.1", "lo", 29500, 29599)
    assert fabric_from_config(cfg).interface == "lo"     # this host's own interfaces


# ---------------------------------------------------------------- the engine's argv and environment


def role(rank=0, size=2, tp=2, pp=1, **changes) -> GroupRole:
    values = dict(name="llama-405b", rank=rank, size=size, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                  master_address="10.0.0.10", master_port=29500, fabric_address="10.0.0.1" + str(rank),
                  fabric_interface="eth1", engine_port=29501)
    values.update(changes)
    return GroupRole(**values)


def gpu_plan(gpus=2) -> Plan:
    return Plan(accelerator="cuda", visible_devices=tuple(range(gpus)), tensor_parallel_size=gpus,
                gpu_memory_utilization=0.9, max_model_len=None, max_concurrent=64, max_num_seqs=256,
                cpu_kvcache_space_gb=None, cpu_threads=None, engine_env={"CUDA_VISIBLE_DEVICES": "0,1"}, reasons={})


def model() -> ResolvedModel:
    return ResolvedModel("meta-llama/Llama-3.1-405B", "router", "/var/lib/xerotier/models/hub/snap",
                         "meta-llama/Llama-3.1-405B", False, {"HF_HUB_OFFLINE": "1"})


def launch_for(tmp_path, group, plan=None, **env):
    cfg = load_config(tmp_path, **{**DIRS, **env})
    paths = EnginePaths(PYTHON, Path(cfg.state_dir), Path(cfg.cache_dir), Path(cfg.runtime_dir))
    return build_launch(cfg, plan or tiny_cpu_plan(), model(), paths, group=group)


def flags(argv, name) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == name]


def test_the_leader_is_todays_engine_with_the_multi_node_flags(tmp_path):
    argv = list(launch_for(tmp_path, role(0, tp=4, pp=2), gpu_plan(4)).argv)
    assert argv[:3] == [PYTHON, "-m", ENGINE_MODULE]
    assert flags(argv, "--uds") == ["/run/ximd/engine.sock"]
    assert flags(argv, "--tensor-parallel-size") == ["4"] and flags(argv, "--pipeline-parallel-size") == ["2"]
    assert flags(argv, "--distributed-executor-backend") == ["mp"]
    assert flags(argv, "--nnodes") == ["2"] and flags(argv, "--node-rank") == ["0"]
    assert flags(argv, "--master-addr") == ["10.0.0.10"] and flags(argv, "--master-port") == ["29500"]


def test_a_follower_runs_the_headless_entry_without_socket(tmp_path):
    argv = list(launch_for(tmp_path, role(1)).argv)
    assert argv[:2] == [PYTHON, str(HEADLESS_SCRIPT)] and HEADLESS_SCRIPT.name == "headless.py"
    assert ENGINE_MODULE not in argv and "--uds" not in argv
    assert flags(argv, "--node-rank") == ["1"] and flags(argv, "--nnodes") == ["2"]
    assert flags(argv, "--model") == [] and "--model=/var/lib/xerotier/models/hub/snap" in argv


def test_only_the_leader_has_a_health_endpoint_to_check(tmp_path):
    assert launch_for(tmp_path, role(0)).health_check and launch_for(tmp_path, None).health_check
    assert not launch_for(tmp_path, role(1)).health_check


def test_the_groups_tp_replaces_the_local_plan_and_cpu_never_gets_the_uni_executor(tmp_path):
    argv = list(launch_for(tmp_path, role(1, tp=2)).argv)      # the CPU plan says TP 1
    assert flags(argv, "--tensor-parallel-size") == ["2"]
    assert flags(argv, "--distributed-executor-backend") == ["mp"] and "--enforce-eager" in argv


def test_the_operators_extra_args_still_come_last(tmp_path):
    argv = list(launch_for(tmp_path, role(1), XEROTIER_AGENT_VLLM_ARGS="--master-port 31000").argv)
    assert argv[-2:] == ["--master-port", "31000"]


def test_every_member_tells_vllm_gloo_and_nccl_its_fabric(tmp_path):
    launch = launch_for(tmp_path, role(1))
    env = launch.env
    assert env["VLLM_HOST_IP"] == "10.0.0.11"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth1"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["VLLM_PORT"]) == ("10.0.0.10", "29500", "29501")
    assert '"VLLM_HOST_IP": "10.0.0.11"' in describe(launch)


def test_without_a_group_nothing_changes(tmp_path):
    launch = launch_for(tmp_path, None)
    assert "--nnodes" not in launch.argv and "VLLM_HOST_IP" not in launch.env
    assert flags(list(launch.argv), "--distributed-executor-backend") == ["uni"]


@pytest.mark.parametrize(("changes", "match"), [
    (dict(size=1), "at least two members"),
    (dict(rank=2), "rank 2 is not in 0..1"),
    (dict(tp=3), "3 workers do not split evenly over 2 members"),
    (dict(pp=0), "must both be at least 1"),
])
def test_a_part_vllm_would_refuse_is_refused_first(tmp_path, changes, match):
    with pytest.raises(LaunchError, match=f"^group llama-405b: .*{match}"):
        launch_for(tmp_path, role(**changes))


def test_a_member_needs_the_gpus_for_its_workers(tmp_path):
    with pytest.raises(LaunchError, match="each member runs 4 engine workers.*has 2 GPUs"):
        launch_for(tmp_path, role(tp=8), gpu_plan(2))


@pytest.mark.parametrize(("bind", "parts", "split"), [
    ("0-3", 2, "0,1|2,3"), ("0-4", 2, "0,1,2|3,4"), ("0,2,5-6", 1, "0,2,5-6"), ("auto", 4, "auto"),
    ("0|1", 2, "0|1")])
def test_cpu_binding_is_split_over_the_local_workers(bind, parts, split):
    assert split_cpu_bind(bind, parts) == split


def test_too_few_cpus_for_the_workers():
    with pytest.raises(LaunchError, match="1 CPUs"):
        split_cpu_bind("3", 2)


def test_cpu_binding_in_a_members_environment(tmp_path):
    plan = tiny_cpu_plan(engine_env={"VLLM_CPU_OMP_THREADS_BIND": "0-3"})
    env = launch_for(tmp_path, role(1, tp=2, pp=2), plan).env
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"


def test_role_properties():
    part = role(1, size=4, tp=8, pp=2)
    assert (part.leader, part.world_size, part.local_world_size, part.problem()) == (False, 16, 4, None)
    assert dataclasses.replace(part, rank=0).leader
