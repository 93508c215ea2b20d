"""Configuration: layers and their order, the seed's variables, every error class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ximd import cli, config, configdoc
from ximd.config import AUTO, ConfigError, load
from ximd.exitcodes import EX_CONFIG

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def main_file(tmp_path) -> Path:
    return write(tmp_path / "agent.toml", "[agent]\nlog_level = \"notice\"\nmax_concurrent = 3\n")


# ---------------------------------------------------------------- precedence


def test_defaults_are_the_seeds():
    cfg = load(None, env={})
    assert cfg.agent.log_level == "info"
    assert cfg.agent.max_concurrent == AUTO
    assert cfg.engine.model == "meta-llama/Llama-3.2-1B-Instruct"
    assert cfg.engine.gpu_memory_utilization == 0.90
    assert cfg.engine.max_model_len == AUTO and cfg.engine.tensor_parallel_size == AUTO
    assert cfg.model_cache.max_size_gb == 100
    assert cfg.model_cache_path == Path("/var/lib/xerotier/models")
    assert cfg.metrics.listen == "127.0.0.1:7394"
    assert set(cfg.origins.values()) == {"default"}


def test_file_overrides_default(main_file):
    cfg = load(main_file, env={})
    assert cfg.agent.log_level == "notice"
    assert cfg.origins["agent.log_level"] == str(main_file)
    assert cfg.origins["engine.model"] == "default"


def test_dropins_override_file_in_name_order(main_file):
    write(main_file.parent / "agent.toml.d/20-later.toml", "[agent]\nlog_level = \"error\"\n")
    write(main_file.parent / "agent.toml.d/10-first.toml",
          "[agent]\nlog_level = \"debug\"\nmax_concurrent = 5\n")
    write(main_file.parent / "agent.toml.d/ignored.conf", "this is not toml")
    cfg = load(main_file, env={})
    assert cfg.agent.log_level == "error"
    assert cfg.origins["agent.log_level"].endswith("20-later.toml")
    assert cfg.agent.max_concurrent == 5
    assert cfg.origins["agent.max_concurrent"].endswith("10-first.toml")
    assert [Path(s).name for s in cfg.sources] == ["agent.toml", "10-first.toml", "20-later.toml"]


def test_env_overrides_dropins(main_file):
    write(main_file.parent / "agent.toml.d/10.toml", "[agent]\nmax_concurrent = 5\n")
    cfg = load(main_file, env={"XEROTIER_AGENT_MAX_CONCURRENT": "7"})
    assert cfg.agent.max_concurrent == 7
    assert cfg.origins["agent.max_concurrent"] == "env:XEROTIER_AGENT_MAX_CONCURRENT"


def test_flag_overrides_env(main_file):
    cfg = load(main_file, env={"XEROTIER_AGENT_MAX_CONCURRENT": "7"},
               flags={"agent.max_concurrent": "9"})
    assert cfg.agent.max_concurrent == 9
    assert cfg.origins["agent.max_concurrent"] == "flag:--max-concurrent"


def test_systemd_directories_sit_between_default_and_file(tmp_path):
    env = {"STATE_DIRECTORY": "/var/lib/xerotier", "RUNTIME_DIRECTORY": "/run/ximd:/run/other"}
    cfg = load(None, env=env)
    assert cfg.origins["agent.state_dir"] == "systemd:STATE_DIRECTORY"
    assert cfg.agent.runtime_dir == "/run/ximd"
    explicit = write(tmp_path / "agent.toml", "[agent]\nstate_dir = \"/srv/x\"\n")
    assert load(explicit, env=env).agent.state_dir == "/srv/x"


def test_config_path_from_env(main_file):
    cfg = load(None, env={"XEROTIER_AGENT_CONFIG": str(main_file)})
    assert cfg.agent.log_level == "notice"


def test_empty_env_value_means_unset(main_file):
    # Compose files pass "${VAR:-}"; an empty variable must not erase the file's value.
    cfg = load(main_file, env={"XEROTIER_AGENT_MAX_CONCURRENT": ""})
    assert cfg.agent.max_concurrent == 3


# ---------------------------------------------------------------- the seed's variables

SEED_VARIABLES = [
    ("XEROTIER_AGENT_JOIN_KEY", "xjk_abc", "router.join_key", "xjk_abc"),
    ("XEROTIER_AGENT_MAX_CONCURRENT", "12", "agent.max_concurrent", 12),
    ("XEROTIER_AGENT_LOG_LEVEL", "warn", "agent.log_level", "warn"),
    ("VLLM_MODEL", "/srv/models/tiny", "engine.model", "/srv/models/tiny"),
    ("XEROTIER_AGENT_MAX_MODEL_LEN", "4096", "engine.max_model_len", 4096),
    ("XEROTIER_AGENT_TENSOR_PARALLEL_SIZE", "2", "engine.tensor_parallel_size", 2),
    ("XEROTIER_AGENT_GPU_MEMORY_UTILIZATION", "0.5", "engine.gpu_memory_utilization", 0.5),
    ("XEROTIER_AGENT_CUDA_VISIBLE_DEVICES", "2, 3", "engine.cuda_visible_devices", "2,3"),
    ("HIP_VISIBLE_DEVICES", "1", "engine.hip_visible_devices", "1"),
    ("XEROTIER_AGENT_MODEL_CACHE_PATH", "/data/models", "model_cache.path", "/data/models"),
    ("XEROTIER_AGENT_MODEL_CACHE_MAX_SIZE_GB", "250", "model_cache.max_size_gb", 250.0),
    ("XEROTIER_AGENT_LMCACHE_ENABLED", "TRUE", "lmcache.enabled", "true"),
    ("XEROTIER_AGENT_LMCACHE_REDIS_URL", "valkey://cache:6379", "lmcache.redis_url", "valkey://cache:6379"),
    ("XEROTIER_AGENT_ROUTER_URL", "https://router.example:8443", "router.url", "https://router.example:8443"),
    ("XEROTIER_AGENT_JOIN_KEY_FILE", "/etc/xerotier/join-key", "router.join_key_file", "/etc/xerotier/join-key"),
    ("XEROTIER_AGENT_STATE_DIR", "/srv/xim", "agent.state_dir", "/srv/xim"),
]


@pytest.mark.parametrize("var,text,name,expected", SEED_VARIABLES, ids=[v[0] for v in SEED_VARIABLES])
def test_seed_variable_maps_to_its_key(var, text, name, expected):
    cfg = load(None, env={var: text})
    assert cfg.get(name) == expected
    assert cfg.origins[name] == f"env:{var}"


@pytest.mark.parametrize("level", config.LOG_LEVELS)
def test_every_seed_log_level_spelling_is_accepted(level):
    assert load(None, env={"XEROTIER_AGENT_LOG_LEVEL": level.upper()}).agent.log_level == level


def test_unknown_prefixed_env_is_a_warning_with_a_suggestion():
    cfg = load(None, env={"XEROTIER_AGENT_MAX_CONCURENT": "4"})
    assert any("XEROTIER_AGENT_MAX_CONCURRENT" in w for w in cfg.warnings)


# ---------------------------------------------------------------- errors


def problems_of(**kwargs) -> list[config.ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return info.value.problems


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path / "agent.toml", "[engine]\nmodel = \"x\"\ngpu_memory_utilisation = 0.5\n")
    [problem] = problems_of(config_file=path, env={})
    assert (problem.source, problem.key, problem.line) == (str(path), "engine.gpu_memory_utilisation", 3)
    assert "did you mean 'gpu_memory_utilization'" in str(problem)


def test_unknown_section(tmp_path):
    path = write(tmp_path / "agent.toml", "[engien]\nmodel = \"x\"\n")
    [problem] = problems_of(config_file=path, env={})
    assert problem.key == "engien" and "did you mean 'engine'" in problem.message and problem.line == 1


def test_a_key_above_its_section_says_where_it_belongs(tmp_path):
    path = write(tmp_path / "agent.toml", "# node\nmax_concurrent = 4\n[agent]\nlog_level = \"info\"\n")
    [problem] = problems_of(config_file=path, env={})
    assert (problem.key, problem.line) == ("max_concurrent", 2)
    assert "unknown section" not in problem.message
    assert "belongs under [agent] (agent.max_concurrent)" in problem.message


def test_a_top_level_key_no_section_has_gets_a_suggestion(tmp_path):
    path = write(tmp_path / "agent.toml", "max_concurent = 4\n")
    [problem] = problems_of(config_file=path, env={})
    assert "outside any section" in problem.message and "did you mean 'max_concurrent'" in problem.message


def test_an_unreadable_file_is_denied_not_invalid(tmp_path, monkeypatch):
    path = write(tmp_path / "agent.toml", "[agent]\n")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_text", refuse)
    [problem] = problems_of(config_file=path, env={})
    assert problem.denied and problem.source == str(path)


def test_wrong_type(tmp_path):
    path = write(tmp_path / "agent.toml", "[agent]\nmax_concurrent = \"lots\"\n")
    [problem] = problems_of(config_file=path, env={})
    assert problem.key == "agent.max_concurrent" and 'integer ≥ 1 or "auto"' in problem.message


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "nan"])
def test_gpu_memory_utilization_range(value):
    [problem] = problems_of(config_file=None, env={"XEROTIER_AGENT_GPU_MEMORY_UTILIZATION": value})
    assert problem.source == "env:XEROTIER_AGENT_GPU_MEMORY_UTILIZATION"
    assert "(0, 1]" in problem.message


def test_toml_syntax_error_has_a_line(tmp_path):
    path = write(tmp_path / "agent.toml", "[agent]\nlog_level = \n")
    [problem] = problems_of(config_file=path, env={})
    assert problem.line == 2 and "TOML syntax error" in problem.message


def test_unreadable_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b"[agent]\nlog_level = \"\xff\"\n")  # not UTF-8: root can read anything else
    [problem] = problems_of(config_file=path, env={})
    assert "cannot read" in problem.message


def test_explicit_missing_file(tmp_path):
    [problem] = problems_of(config_file=tmp_path / "nope.toml", env={})
    assert problem.message == "file not found"


def test_secret_env_value_is_not_echoed():
    [problem] = problems_of(config_file=None, env={"XEROTIER_AGENT_JOIN_KEY": "not-a-key-SECRET"})
    assert "SECRET" not in str(problem)


def test_batch_size_below_admission_is_an_error():
    [problem] = problems_of(config_file=None, env={"XEROTIER_AGENT_MAX_CONCURRENT": "16",
                                                    "XEROTIER_AGENT_MAX_NUM_SEQS": "8"})
    assert problem.key == "engine.max_num_seqs"


def test_all_problems_are_reported_together(tmp_path):
    path = write(tmp_path / "agent.toml", "[agent]\nlog_level = \"loud\"\n[metrics]\nlisten = \"nowhere\"\n")
    assert {p.key for p in problems_of(config_file=path, env={})} == {"agent.log_level", "metrics.listen"}


# ---------------------------------------------------------------- CLI


def test_cli_config_error_exits_78_naming_file_and_key(tmp_path, capsys):
    path = write(tmp_path / "agent.toml", "[agent]\nmax_concurrent = 0\n")
    assert cli.main(["config", "show", "--config", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert f"{path}:2: agent.max_concurrent" in err and "Traceback" not in err


def test_cli_run_exits_78_on_bad_config(tmp_path, capsys):
    path = write(tmp_path / "agent.toml", "[lmcache]\nenabled = \"maybe\"\n")
    assert cli.main(["run", "--config", str(path)]) == EX_CONFIG
    assert "lmcache.enabled" in capsys.readouterr().err


def test_cli_show_origin_and_masking(tmp_path, capsys, monkeypatch):
    path = write(tmp_path / "agent.toml", "[router]\njoin_key = \"xjk_supersecretvalue\"\n"
                                         "[lmcache]\nredis_url = \"redis://:hunter2@cache:6379/0\"\n")
    monkeypatch.setenv("XEROTIER_AGENT_LOG_LEVEL", "debug")
    assert cli.main(["config", "show", "--origin", "--format", "json", "--config", str(path),
                     "--max-concurrent", "4"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["agent.log_level"] == {"value": "debug", "origin": "env:XEROTIER_AGENT_LOG_LEVEL"}
    assert shown["agent.max_concurrent"] == {"value": 4, "origin": "flag:--max-concurrent"}
    assert shown["router.join_key"]["origin"] == str(path)
    dumped = json.dumps(shown)
    assert "supersecret" not in dumped and "hunter2" not in dumped


def test_cli_set_flag_and_text_output(capsys, monkeypatch):
    monkeypatch.delenv("XEROTIER_AGENT_CONFIG", raising=False)
    assert cli.main(["config", "show", "--origin", "--config", "/dev/null",
                     "--set", "lmcache.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert 'enabled = "false"' in out and "# flag:--set lmcache.enabled" in out


def test_cli_validate(tmp_path, capsys):
    good = write(tmp_path / "good.toml", "[agent]\nlog_level = \"trace\"\n")
    assert cli.main(["config", "validate", str(good)]) == 0
    bad = write(tmp_path / "bad.toml", "[agent]\nlog_level = 3\n")
    assert cli.main(["config", "validate", str(bad)]) == EX_CONFIG
    assert "bad.toml:2: agent.log_level" in capsys.readouterr().err


def test_shipped_agent_toml_is_generated_from_the_schema_and_valid():
    shipped = REPO / "etc" / "agent.toml"
    assert shipped.read_text() == configdoc.render(), "regenerate: python -m ximd.commands.configdoc > etc/agent.toml"
    for name in config.SCHEMA:
        assert f"#{name.split('.', 1)[1]} = " in shipped.read_text()
    assert load(shipped, env={}).origins["agent.log_level"] == "default"


def test_cli_refuses_secrets_in_argv(capsys):
    assert cli.main(["config", "show", "--config", "/dev/null",
                     "--set", "router.join_key=xjk_visible_in_ps"]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "cannot be given on the command line" in err and "xjk_visible_in_ps" not in err
