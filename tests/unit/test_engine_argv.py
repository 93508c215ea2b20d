"""The engine's argv and environment, built from a real Config and Plan (pure)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.engine import load_config, tiny_cpu_plan
from ximd.autoconfig import Plan
from ximd.config import ConfigError
from ximd.engine import EngineLaunch, EnginePaths, LaunchError, backoff_delay, build_launch, describe, instance_id
from ximd.engine.launch import ENGINE_MODULE, INSTANCE_ENV, choose_python
from ximd.engine.output import OutputForwarder, clean_line, engine_log_level
from ximd.engine.processes import is_ours, parse_compute_apps
from ximd.engine.supervisor import exit_description, failure_reason
from ximd.kvcache import KVCacheSetup
from ximd.models import ResolvedModel

PYTHON = "/opt/xerotier/engine/bin/python"


def gpu_plan(**changes) -> Plan:
    values = dict(accelerator="cuda", visible_devices=(0, 1), tensor_parallel_size=2, gpu_memory_utilization=0.9,
                  max_model_len=None, max_concurrent=64, max_num_seqs=256, cpu_kvcache_space_gb=None,
                  cpu_threads=None, engine_env={"CUDA_VISIBLE_DEVICES": "0,1"}, reasons={})
    values.update(changes)
    return Plan(**values)


def model(ref="meta-llama/Llama-3.2-1B-Instruct", arg="/var/lib/xerotier/models/hub/snap") -> ResolvedModel:
    return ResolvedModel(ref, "config", arg, ref, False, {"HF_HOME": "/var/lib/xerotier/models", "HF_HUB_OFFLINE": "1"})


# Production-like directories: nothing here creates them, and pytest's own
# temporary paths are too long for the engine's unix sockets.
DIRS = {"XEROTIER_AGENT_STATE_DIR": "/var/lib/xerotier", "XEROTIER_AGENT_CACHE_DIR": "/var/cache/xerotier",
        "XEROTIER_AGENT_RUNTIME_DIR": "/run/ximd"}


def config(tmp_path, **env):
    return load_config(tmp_path, **{**DIRS, **env})


@pytest.fixture
def cfg(tmp_path):
    return config(tmp_path)


def paths_for(cfg, python=PYTHON) -> EnginePaths:
    return EnginePaths(python, Path(cfg.state_dir), Path(cfg.cache_dir), Path(cfg.runtime_dir))


def flag(argv, name):
    """The value of ``name`` in argv, given as ``name value`` or ``name=value``."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise ValueError(f"{name} not in {argv}")


def test_cpu_engine_listens_on_the_unix_socket_only_and_starts_eager(cfg):
    launch = build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg))
    argv = list(launch.argv)
    assert argv[:3] == [PYTHON, "-m", ENGINE_MODULE]
    assert flag(argv, "--uds") == str(Path(cfg.runtime_dir) / "engine.sock") == str(launch.socket_path)
    assert "--port" not in argv and "--host" not in argv
    assert flag(argv, "--model") == "/var/lib/xerotier/models/hub/snap"
    assert flag(argv, "--served-model-name") == "meta-llama/Llama-3.2-1B-Instruct" == launch.served_model_name
    assert flag(argv, "--tensor-parallel-size") == "1"
    assert flag(argv, "--max-num-seqs") == "4"
    assert flag(argv, "--max-model-len") == "512"
    assert "--enforce-eager" in argv and flag(argv, "--distributed-executor-backend") == "uni"
    assert "--gpu-memory-utilization" not in argv
    assert "--kv-transfer-config" not in argv
    assert launch.env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_gpu_engine_gets_tp_and_memory_utilization_and_no_cpu_switches(cfg):
    argv = list(build_launch(cfg, gpu_plan(), model(), paths_for(cfg)).argv)
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert flag(argv, "--gpu-memory-utilization") == "0.9"
    assert flag(argv, "--max-num-seqs") == "256"
    assert "--max-model-len" not in argv  # None = the model's own
    assert "--enforce-eager" not in argv and "--distributed-executor-backend" not in argv


def test_cpu_engine_with_several_ranks_keeps_vllms_multiprocess_executor(cfg):
    argv = list(build_launch(cfg, tiny_cpu_plan(tensor_parallel_size=2), model(), paths_for(cfg)).argv)
    assert "--enforce-eager" in argv and "--distributed-executor-backend" not in argv


def test_extra_args_come_last_so_the_operator_wins(tmp_path):
    cfg = config(tmp_path, XEROTIER_AGENT_VLLM_ARGS="--max-num-seqs 9 --dtype bfloat16")
    argv = list(build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg)).argv)
    assert argv[-4:] == ["--max-num-seqs", "9", "--dtype", "bfloat16"]
    assert argv.index("--max-num-seqs") < len(argv) - 4  # ours first, theirs last (argparse keeps the last)


def test_per_request_access_log_lines_are_off_by_default(cfg):
    argv = list(build_launch(cfg, gpu_plan(), model(), paths_for(cfg)).argv)
    assert "--disable-uvicorn-access-log" in argv
    # vLLM's request logging (parameters, prompts at debug) is never turned on.
    assert "--enable-log-requests" not in argv


@pytest.mark.parametrize("setting", ["true", "1", "on"])
def test_engine_access_log_setting_turns_them_on(tmp_path, setting):
    cfg = config(tmp_path, XEROTIER_AGENT_ENGINE_ACCESS_LOG=setting)
    assert cfg.engine.access_log is True
    argv = list(build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg)).argv)
    assert "--disable-uvicorn-access-log" not in argv and "--enable-log-requests" not in argv


def test_served_model_name_from_config_wins(tmp_path):
    cfg = config(tmp_path, XEROTIER_AGENT_SERVED_MODEL_NAME="tiny")
    launch = build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg))
    assert flag(list(launch.argv), "--served-model-name") == "tiny" == launch.served_model_name


def test_lmcache_on_adds_the_connector_and_its_config_file_and_can_be_taken_out(cfg, tmp_path):
    kv = KVCacheSetup(True, ("on",), tmp_path / "lmcache_config.yaml", {"chunk_size": 256})
    launch = build_launch(cfg, gpu_plan(), model(), paths_for(cfg), kv=kv)
    assert json.loads(flag(list(launch.argv), "--kv-transfer-config")) == {
        "kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    assert launch.env["LMCACHE_CONFIG_FILE"] == str(tmp_path / "lmcache_config.yaml")
    assert launch.lmcache
    plain = launch.without_lmcache()
    assert "--kv-transfer-config" not in plain.argv and "LMCACHE_CONFIG_FILE" not in plain.env
    assert not plain.lmcache
    assert [a for a in launch.argv if "LMCache" not in a and a != "--kv-transfer-config"] == list(plain.argv)


def test_lmcache_off_adds_nothing(cfg):
    launch = build_launch(cfg, gpu_plan(), model(), paths_for(cfg), kv=KVCacheSetup(False, ("off",)))
    assert "--kv-transfer-config" not in launch.argv and "LMCACHE_CONFIG_FILE" not in launch.env


def test_environment_is_built_from_nothing_and_holds_no_secret(cfg, monkeypatch):
    # The engine runs offline and parses untrusted prompts: not even the hub token reaches it.
    for name, value in {"XEROTIER_AGENT_JOIN_KEY": "xjk_secret", "PATH": "/home/dev/bin", "HF_TOKEN": "hf_abc",
                        "HUGGING_FACE_HUB_TOKEN": "hf_abc", "HTTPS_PROXY": "http://u:p@proxy:3128",
                        "LD_PRELOAD": "/evil.so", "NOTIFY_SOCKET": "/run/x",
                        "CREDENTIALS_DIRECTORY": "/run/credentials/ximd.service"}.items():
        monkeypatch.setenv(name, value)
    env = build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg)).env
    for leaked in ("XEROTIER_AGENT_JOIN_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HTTPS_PROXY", "LD_PRELOAD",
                   "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY"):
        assert leaked not in env
    assert not any("hf_abc" in value or "xjk_" in value for value in env.values())
    assert env["PATH"].startswith("/opt/xerotier/engine/bin:") and "/home/dev/bin" not in env["PATH"]
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["PYTHONUNBUFFERED"] == "1"


def test_the_sandbox_hides_what_it_is_told_and_lets_the_engine_write_in_ximds_directories(cfg):
    secrets = (Path("/var/lib/xerotier/enrollment"), Path("/etc/xerotier"))
    policy = build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg), hidden=secrets).sandbox
    assert policy is not None
    assert policy.hidden == ("/var/lib/xerotier/enrollment", "/etc/xerotier")
    assert set(policy.writable) == {"/var/lib/xerotier", "/var/cache/xerotier", "/run/ximd",
                                    "/var/lib/xerotier/models", "/var/lib/xerotier/lmcache"}


def test_everything_the_engine_writes_goes_into_ximds_directories(cfg):
    env = build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg)).env
    roots = (str(cfg.state_dir), str(cfg.cache_dir), str(cfg.runtime_dir), "/var/lib/xerotier/models")
    for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR",
                 "TORCHINDUCTOR_CACHE_DIR", "VLLM_RPC_BASE_PATH", "HF_HOME"):
        assert env[name].startswith(roots), (name, env[name])
    assert env["HF_HOME"] == "/var/lib/xerotier/models" and env["HF_HUB_OFFLINE"] == "1"


def test_directories_to_create_cover_every_writer(cfg):
    launch = build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg))
    for name in ("HOME", "TMPDIR", "VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH"):
        assert Path(launch.env[name]) in launch.dirs


def test_plan_engine_env_wins_and_its_removals_are_honoured(cfg):
    plan = tiny_cpu_plan(engine_env={"VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_CPU_OMP_THREADS_BIND": "0-6"},
                         engine_env_remove=("HF_HUB_OFFLINE",))
    env = build_launch(cfg, plan, model(), paths_for(cfg)).env
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-6"
    assert "HF_HUB_OFFLINE" not in env


def test_cpu_kv_space_is_a_whole_number_of_gib_of_at_least_one(cfg):
    env = build_launch(cfg, tiny_cpu_plan(engine_env={}, cpu_kvcache_space_gb=0), model(), paths_for(cfg)).env
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_instance_marker_is_stable_per_state_directory(cfg, tmp_path):
    launch = build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg))
    assert launch.env[INSTANCE_ENV] == launch.instance_id == instance_id(Path(cfg.state_dir))
    assert instance_id(Path("/var/lib/other")) != launch.instance_id


def test_runtime_directory_too_long_for_unix_sockets_is_refused_with_the_reason(tmp_path):
    cfg = config(tmp_path, XEROTIER_AGENT_RUNTIME_DIR="/run/" + "x" * 80)
    with pytest.raises(LaunchError, match="too long for unix sockets.*agent.runtime_dir"):
        build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg))


def test_missing_engine_interpreter_falls_back_to_ximds_own_with_a_note(tmp_path):
    python, note = choose_python(str(tmp_path / "nope" / "python"), "/usr/bin/python3")
    assert python == "/usr/bin/python3" and "not found" in note and "vLLM" in note
    assert choose_python("/usr/bin/python3", "/x") == ("/usr/bin/python3", "")
    cfg = config(tmp_path, XEROTIER_AGENT_ENGINE_PYTHON=str(tmp_path / "nope"))
    assert EnginePaths.from_config(cfg, own_python="/usr/bin/python3").python == "/usr/bin/python3"


def test_describe_masks_the_api_key(cfg, tmp_path):
    cfg = config(tmp_path, XEROTIER_AGENT_VLLM_ARGS="--api-key sk-123 --api-key=sk-456")
    line = describe(build_launch(cfg, tiny_cpu_plan(), model(), paths_for(cfg)))
    assert "sk-123" not in line and "sk-456" not in line and "--api-key ****" in line
    assert '"VLLM_CPU_KVCACHE_SPACE": "1"' in line


# ---------------------------------------------------------------- supervisor's pure parts


def test_backoff_doubles_from_the_base_up_to_the_cap():
    assert [backoff_delay(n, 1, 60) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(1, 0.5, 4) == 0.5 and backoff_delay(5, 0.5, 4) == 4


def test_failure_reason_is_the_engines_last_exception_line():
    bad_config = ["Traceback (most recent call last):", '  File "x.py", line 886, in _get_config_dict',
                  "OSError: It looks like the config file at '/m/config.json' is not a valid JSON file."]
    assert failure_reason(bad_config) == ("OSError: It looks like the config file at '/m/config.json' "
                                          "is not a valid JSON file.")
    core = ["(EngineCore pid=1) ERROR 11-27 10:40:07 [core.py:1510] RuntimeError: Worker failed",
            "/usr/lib/python3.11/multiprocessing/resource_tracker.py:224: UserWarning: leaked semaphore"]
    assert failure_reason(core) == "RuntimeError: Worker failed"
    assert failure_reason(["/usr/bin/python3: No module named vllm"]) == "/usr/bin/python3: No module named vllm"
    assert failure_reason([]) == "no output"


def test_exit_descriptions():
    assert exit_description(1) == "exited with status 1"
    assert exit_description(-9) == "killed by SIGKILL"


@pytest.mark.parametrize("line, level", [
    ("INFO 11-27 10:38:23 [launcher.py:195] Route: /v1/completions", logging.INFO),
    ("(EngineCore pid=28186) WARNING 11-27 10:38:24 [utils.py:648] force killing", logging.WARNING),
    ("(APIServer pid=1) ERROR 11-27 10:38:24 [core.py:1] EngineCore failed", logging.ERROR),
    ("[2026-11-27 10:32:25,461] LMCache ERROR: Timeout occurred for rank 0", logging.ERROR),
    ("Traceback (most recent call last):", logging.INFO),
    ("x" * 100 + " ERROR far into the text", logging.INFO),
])
def test_engine_output_keeps_the_level_the_engine_gave_it(line, level):
    assert engine_log_level(line) == level


def test_engine_output_lines_lose_colour_codes_and_newlines():
    assert clean_line(b"\x1b[32;20m[2026] LMCache INFO:\x1b[0m hi\r\n") == "[2026] LMCache INFO: hi"
    assert clean_line(b"caf\xc3\xa9 \xff\n") == "café \ufffd"


class RecordingHandler(logging.Handler):
    """Keeps records; `delay` makes it a slow consumer (a journal that lags)."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay, self.records = delay, []

    def emit(self, record):
        time.sleep(self.delay)
        self.records.append(record)


@contextmanager
def forwarding_to(handler: RecordingHandler, **forwarder_args):
    logger = logging.getLogger(f"test.engine.output.{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    forwarder = OutputForwarder(logger, **forwarder_args)
    forwarder.start()
    try:
        yield forwarder
    finally:
        forwarder.close(timeout_s=5)
        logger.removeHandler(handler)


def test_slow_log_consumer_drops_and_counts_lines_instead_of_blocking():
    handler = RecordingHandler(delay=0.05)
    with forwarding_to(handler, capacity=10) as forwarder:
        began = time.monotonic()
        for i in range(500):
            forwarder.offer(f"INFO line {i}")
        assert time.monotonic() - began < 0.5, "offer() must never wait for the consumer"
        assert forwarder.dropped >= 500 - 10 - 2
        assert forwarder.last_lines(3) == ["INFO line 497", "INFO line 498", "INFO line 499"]
    messages = [r.getMessage() for r in handler.records]
    assert any(m.startswith("Dropped ") and "engine output lines" in m for m in messages)
    assert "INFO line 0" in messages


def test_forwarded_lines_keep_order_and_level_under_a_normal_consumer():
    handler = RecordingHandler()
    with forwarding_to(handler) as forwarder:
        for line in ["INFO 11-27 a", "WARNING 11-27 b", "plain c"]:
            forwarder.offer(line)
    assert [(r.getMessage(), r.levelno) for r in handler.records] == [
        ("INFO 11-27 a", logging.INFO), ("WARNING 11-27 b", logging.WARNING), ("plain c", logging.INFO)]
    assert forwarder.dropped == 0
    assert not forwarder.running   # close() ended its thread


def test_compute_apps_parser_reads_nvidia_smis_csv():
    text = "12345, /opt/xerotier/engine/bin/python, 71234\n2222, [Not Found], [N/A]\n\nbad line\n"
    apps = parse_compute_apps(text)
    assert [(a.pid, a.name, a.used_mib) for a in apps] == [
        (12345, "/opt/xerotier/engine/bin/python", 71234), (2222, "[Not Found]", None)]


def test_a_process_is_ours_by_marker_or_by_holding_our_socket(tmp_path):
    sock = tmp_path / "engine.sock"
    assert is_ours({INSTANCE_ENV: "abc"}, [], "abc", sock) == "instance marker"
    assert is_ours({INSTANCE_ENV: "other"}, ["python", "--uds", str(sock)], "abc", sock) == f"holds {sock}"
    assert is_ours({INSTANCE_ENV: "other"}, ["python", "--uds", "/elsewhere"], "abc", sock) is None
    assert is_ours(None, None, "abc", sock) is None


def test_launch_is_immutable():
    launch = EngineLaunch(("a",), {}, Path("/run/x.sock"), "m", "id")
    with pytest.raises(dataclasses.FrozenInstanceError):
        launch.argv = ("b",)


def test_vllms_leftover_dist_files_go_before_a_start_and_the_rest_of_tmp_stays(tmp_path):
    from ximd.engine.supervisor import remove_stale_temporaries
    (tmp_path / "vllm_dist_1234").write_text("x")
    (tmp_path / "torchinductor_root").mkdir()
    remove_stale_temporaries(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torchinductor_root"]
    remove_stale_temporaries(None)


def test_the_engine_streams_every_token_unless_told_otherwise(cfg):
    # vLLM's default of 1 is never passed: an engine older than the flag would refuse it.
    assert "--stream-interval" not in build_launch(cfg, gpu_plan(), model(), paths_for(cfg)).argv


def test_stream_interval_reaches_the_engine(tmp_path):
    cfg = config(tmp_path, XEROTIER_AGENT_STREAM_INTERVAL="4")
    assert flag(list(build_launch(cfg, gpu_plan(), model(), paths_for(cfg)).argv), "--stream-interval") == "4"


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_a_stream_interval_out_of_range_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="stream_interval"):
        config(tmp_path, XEROTIER_AGENT_STREAM_INTERVAL=value)
