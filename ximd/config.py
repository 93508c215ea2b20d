"""Configuration: schema, defaults, layered loading, validation and provenance.

The schema is the dataclasses below: each field carries its default, its type
(a `Kind`), its environment variable and its documentation, so that defaults,
parsing, `config show --origin` and the shipped agent.toml cannot drift apart.

Layers, lowest first: built-in default < systemd's directories
(STATE_DIRECTORY & co.) < agent.toml < agent.toml.d/*.toml (name order) <
environment < command-line flags. Every error names its source and key; the
daemon turns them into exit 78 (EX_CONFIG, owned by ximd.exitcodes).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from xim_proto import eventloop
from xim_proto.addresses import parse_host_port
from xim_proto.joinkey import JOIN_KEY_PREFIX

DEFAULT_CONFIG_PATH = Path("/etc/xerotier/agent.toml")
CONFIG_PATH_ENV = "XEROTIER_AGENT_CONFIG"
ENV_PREFIX = "XEROTIER_AGENT_"
AUTO = "auto"
# The seed's defaults that other modules also need (the model to serve when
# nothing chose one; admission when the plan cannot tell the KV-cache size).
SEED_DEFAULT_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
FALLBACK_MAX_CONCURRENT = 8

LOG_LEVELS = ("trace", "debug", "info", "notice", "warn", "warning", "error", "critical")


# ---------------------------------------------------------------- value kinds


class Kind:
    """How one setting's value is parsed and checked.

    `parse` accepts the typed value TOML gives, or the string an environment
    variable or flag gives (`from_text=True`), and returns the canonical value
    or raises ValueError with what was expected.
    """

    expected = "a value"

    def parse(self, value: Any, from_text: bool) -> Any:
        raise NotImplementedError


class Text(Kind):
    expected = "a string"

    def parse(self, value, from_text):
        if not isinstance(value, str):
            raise ValueError(self.expected)
        return value


class Choice(Kind):
    def __init__(self, *choices: str):
        self.choices = choices
        self.expected = "one of " + ", ".join(choices)

    def parse(self, value, from_text):
        if isinstance(value, bool) and from_text is False:
            value = "true" if value else "false"  # lmcache.enabled = true in TOML
        if not isinstance(value, str) or value.strip().lower() not in self.choices:
            raise ValueError(self.expected)
        return value.strip().lower()


class Flag(Kind):
    expected = "true or false"
    _TEXT = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}

    def parse(self, value, from_text):
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.strip().lower() in self._TEXT:
            return self._TEXT[value.strip().lower()]
        raise ValueError(self.expected)


class Number(Kind):
    """An int or float within bounds; optionally the word "auto"."""

    def __init__(self, *, integer: bool, low: float | None = None, high: float | None = None,
                 low_open: bool = False, allow_auto: bool = False):
        self.integer, self.low, self.high = integer, low, high
        self.low_open, self.allow_auto = low_open, allow_auto
        what = "an integer" if integer else "a number"
        if low is not None and high is not None:
            what += f" in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            what += f" {'>' if low_open else '≥'} {low:g}"
        self.expected = what + (' or "auto"' if allow_auto else "")

    def parse(self, value, from_text):
        if self.allow_auto and isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        if from_text and isinstance(value, str):
            value = self._from_text(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(self.expected)
        if self.integer and not float(value).is_integer():
            raise ValueError(self.expected)
        if not math.isfinite(value) or not self._in_range(value):
            raise ValueError(self.expected)
        return int(value) if self.integer else float(value)

    def _from_text(self, text: str):
        try:
            return int(text) if self.integer else float(text)
        except ValueError:
            raise ValueError(self.expected) from None

    def _in_range(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


class Words(Kind):
    expected = "a list of strings"

    def parse(self, value, from_text):
        if from_text and isinstance(value, str):
            return tuple(shlex.split(value))
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(self.expected)


class Url(Kind):
    def __init__(self, *schemes: str):
        self.schemes = schemes
        self.expected = "empty or a URL starting with " + " or ".join(f"{s}://" for s in schemes)

    def parse(self, value, from_text):
        if not isinstance(value, str):
            raise ValueError(self.expected)
        if value and (urlsplit(value).scheme not in self.schemes or not urlsplit(value).hostname):
            raise ValueError(self.expected)
        return value


class DeviceMask(Kind):
    expected = 'empty (all GPUs) or comma-separated GPU indices such as "0,1"'

    def parse(self, value, from_text):
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not re.fullmatch(r"\s*(\d+\s*(,\s*\d+\s*)*)?", value):
            raise ValueError(self.expected)
        return ",".join(part.strip() for part in value.split(",") if part.strip())


class Listen(Kind):
    expected = 'HOST:PORT, such as "127.0.0.1:7394"'

    def parse(self, value, from_text):
        try:
            parse_host_port(value)
        except ValueError:
            raise ValueError(self.expected) from None
        return value


class PortRange(Kind):
    expected = 'a port range "LOW-HIGH" of at least two ports within 1024-65535, such as "29500-29599"'

    def parse(self, value, from_text):
        match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", value) if isinstance(value, str) else None
        if not match:
            raise ValueError(self.expected)
        low, high = int(match.group(1)), int(match.group(2))
        if not 1024 <= low < high <= 65535:
            raise ValueError(self.expected)
        return f"{low}-{high}"


class JoinKey(Kind):
    expected = f'empty or a join key starting with "{JOIN_KEY_PREFIX}"'

    def parse(self, value, from_text):
        if not isinstance(value, str) or (value.strip() and not value.strip().startswith(JOIN_KEY_PREFIX)):
            raise ValueError(self.expected)
        return value.strip()


# ---------------------------------------------------------------- the schema


def setting(default: Any, kind: Kind, doc: str, *, env: str | None = None,
            flag: str | None = None, secret: bool = False):
    """A schema field: its metadata drives parsing, env/flag mapping and docs."""
    meta = {"kind": kind, "doc": doc, "env": env, "flag": flag, "secret": secret}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class AgentSection:
    log_level: str = setting("info", Choice(*LOG_LEVELS), "Log level (trace is below debug).",
                             env="XEROTIER_AGENT_LOG_LEVEL", flag="--log-level")
    max_concurrent: Any = setting(AUTO, Number(integer=True, low=1, allow_auto=True),
                                  "Requests the node accepts from the router at once; auto = from the plan (8 when it cannot tell).",
                                  env="XEROTIER_AGENT_MAX_CONCURRENT", flag="--max-concurrent")
    state_dir: str = setting("/var/lib/xerotier", Text(), "Identity, models, LMCache disk tier.",
                             env="XEROTIER_AGENT_STATE_DIR", flag="--state-dir")
    cache_dir: str = setting("/var/cache/xerotier", Text(), "Engine caches (compile, Triton, XDG).",
                             env="XEROTIER_AGENT_CACHE_DIR")
    runtime_dir: str = setting("/run/ximd", Text(), "Control socket and the engine's unix socket.",
                               env="XEROTIER_AGENT_RUNTIME_DIR")
    drain_grace_s: float = setting(30.0, Number(integer=False, low=0, low_open=True),
                                   "On stop, how long in-flight streams may finish.",
                                   env="XEROTIER_AGENT_DRAIN_GRACE_S")


@dataclass(frozen=True)
class RouterSection:
    url: str = setting("", Url("http", "https"), "Router enrollment URL.",
                       env="XEROTIER_AGENT_ROUTER_URL", flag="--router-url")
    join_key: str = setting("", JoinKey(), "One-time join key (xjk_…); not needed once enrolled.",
                            env="XEROTIER_AGENT_JOIN_KEY", secret=True)
    join_key_file: str = setting("", Text(), "File holding the join key instead.",
                                 env="XEROTIER_AGENT_JOIN_KEY_FILE")
    ca_file: str = setting("", Text(), "CA bundle that signs the router's HTTPS certificate.",
                           env="XEROTIER_AGENT_CA_FILE")
    allow_http: bool = setting(False, Flag(), "Allow a plain http:// router.url: the join key and "
                               "tokens then cross the network in clear (testing only).",
                               env="XEROTIER_AGENT_ROUTER_ALLOW_HTTP")
    tls_skip_verify: bool = setting(False, Flag(), "Do not verify the router's HTTPS certificate: "
                                    "anyone on the path can pose as the router (prefer ca_file).",
                                    env="XEROTIER_AGENT_ROUTER_TLS_SKIP_VERIFY")
    insecure: bool = setting(False, Flag(), "Deprecated: true sets both allow_http and "
                             "tls_skip_verify (each may still be set on its own).",
                             env="XEROTIER_AGENT_ALLOW_INSECURE")


@dataclass(frozen=True)
class EngineSection:
    model: str = setting(SEED_DEFAULT_MODEL, Text(),
                         "Hugging Face model id or local path (else the router's assignment).",
                         env="VLLM_MODEL", flag="--model")
    served_model_name: str = setting("", Text(), "Name the model is served under (empty = model).",
                                     env="XEROTIER_AGENT_SERVED_MODEL_NAME")
    python: str = setting("/opt/xerotier/engine/bin/python", Text(),
                          "Interpreter of the engine environment (falls back to ximd's own).",
                          env="XEROTIER_AGENT_ENGINE_PYTHON")
    max_model_len: Any = setting(AUTO, Number(integer=True, low=1, allow_auto=True),
                                 "Maximum sequence length; auto = the model's.",
                                 env="XEROTIER_AGENT_MAX_MODEL_LEN", flag="--max-model-len")
    tensor_parallel_size: Any = setting(AUTO, Number(integer=True, low=1, allow_auto=True),
                                        "GPUs per model; auto = the visible GPUs.",
                                        env="XEROTIER_AGENT_TENSOR_PARALLEL_SIZE",
                                        flag="--tensor-parallel-size")
    gpu_memory_utilization: float = setting(0.90, Number(integer=False, low=0, high=1, low_open=True),
                                            "Fraction of each GPU's memory vLLM may use.",
                                            env="XEROTIER_AGENT_GPU_MEMORY_UTILIZATION",
                                            flag="--gpu-memory-utilization")
    max_num_seqs: Any = setting(AUTO, Number(integer=True, low=1, allow_auto=True),
                                "Engine batch size; auto, never below max_concurrent.",
                                env="XEROTIER_AGENT_MAX_NUM_SEQS")
    cuda_visible_devices: str = setting("", DeviceMask(), "NVIDIA GPUs to use (empty = all).",
                                        env="XEROTIER_AGENT_CUDA_VISIBLE_DEVICES")
    hip_visible_devices: str = setting("", DeviceMask(), "AMD GPUs to use (empty = all).",
                                       env="HIP_VISIBLE_DEVICES")
    stream_interval: int = setting(1, Number(integer=True, low=1, high=64),
                                   "Tokens the engine gathers per streamed chunk (vLLM's --stream-interval; "
                                   "1 = every token at once, more = less CPU per token, burstier streams).",
                                   env="XEROTIER_AGENT_STREAM_INTERVAL")
    extra_args: tuple = setting((), Words(), "Extra vLLM arguments, appended last.",
                                env="XEROTIER_AGENT_VLLM_ARGS")
    startup_timeout_s: float = setting(900.0, Number(integer=False, low=0, low_open=True),
                                       "How long a model load may take before the engine counts as failed.",
                                       env="XEROTIER_AGENT_ENGINE_STARTUP_TIMEOUT_S")
    access_log: bool = setting(False, Flag(), "The engine's own access log: one journal line per request "
                               "under ximd-engine (off: unreadable at production rates).",
                               env="XEROTIER_AGENT_ENGINE_ACCESS_LOG")


@dataclass(frozen=True)
class ModelCacheSection:
    path: str = setting("", Text(), "Model cache (empty = <state_dir>/models).",
                        env="XEROTIER_AGENT_MODEL_CACHE_PATH")
    max_size_gb: float = setting(100.0, Number(integer=False, low=0, low_open=True),
                                 "Cap; least-recently-used models that are not in use are evicted.",
                                 env="XEROTIER_AGENT_MODEL_CACHE_MAX_SIZE_GB")
    hf_token_file: str = setting("", Text(),
                                 "File with a Hugging Face token for gated models (empty = the unit's "
                                 "hf-token credential from /etc/xerotier/hf-token, else HF_TOKEN); "
                                 "only the downloader gets it.",
                                 env="XEROTIER_AGENT_HF_TOKEN_FILE")


@dataclass(frozen=True)
class LMCacheSection:
    enabled: str = setting(AUTO, Choice(AUTO, "true", "false"),
                           "KV offload through LMCache; auto = on GPU engines only.",
                           env="XEROTIER_AGENT_LMCACHE_ENABLED")
    redis_url: str = setting("", Url("redis", "rediss", "valkey", "valkeys"),
                             "Shared remote tier (Redis or Valkey).",
                             env="XEROTIER_AGENT_LMCACHE_REDIS_URL", secret=True)
    chunk_size: int = setting(256, Number(integer=True, low=1), "Tokens per KV chunk.")
    cpu_size_gb: Any = setting(AUTO, Number(integer=False, low=0, allow_auto=True),
                               "CPU RAM tier per TP rank; auto = 10% of RAM split across ranks.",
                               env="XEROTIER_AGENT_LMCACHE_CPU_SIZE_GB")
    disk_path: str = setting("", Text(), "Disk tier (empty = <state_dir>/lmcache).")
    disk_size_gb: Any = setting(AUTO, Number(integer=False, low=0, allow_auto=True),
                                "Disk tier size; auto = 10% of its partition.",
                                env="XEROTIER_AGENT_LMCACHE_DISK_SIZE_GB")


@dataclass(frozen=True)
class TuningSection:
    socket_buffer_bytes: int = setting(4194304, Number(integer=True, low=65536),
                                       "ZeroMQ SNDBUF/RCVBUF; net.core.{r,w}mem_max must allow it.")
    # asyncio by default, unlike the router: under uvloop a burst of new connections to the
    # engine's unix socket overflowed its listen backlog (connect: EAGAIN, the request fails)
    # where asyncio's slower connects did not, and the engine client does not retry a connect
    # (docs/performance.md, "uvloop").
    event_loop: str = setting(eventloop.ASYNCIO, Choice(*eventloop.CHOICES),
                              "asyncio's event loop: asyncio's own, uvloop (python3-uvloop; or do not start), "
                              "or auto = uvloop when installed. Under uvloop a burst of new engine connections "
                              "can overflow the engine's listen backlog and fail.",
                              env="XEROTIER_AGENT_EVENT_LOOP")


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = setting(True, Flag(), "Serve Prometheus metrics.",
                            env="XEROTIER_AGENT_METRICS_ENABLED")
    # 7394, not 9094 as in ximd 0.1 (Alertmanager's cluster port): outside Prometheus' default
    # port allocations (9090-9999, all taken) and no default of what runs beside a node
    # (ximd.metrics.DEFAULT_LISTEN says which).
    listen: str = setting("127.0.0.1:7394", Listen(), "Address of the metrics endpoint (answers from "
                          "ximd's start; 9094 in ximd 0.1, which is Alertmanager's cluster port).",
                          env="XEROTIER_AGENT_METRICS_LISTEN")


@dataclass(frozen=True)
class GroupSection:
    """Where this node meets the other members of a group (one model across hosts, docs/groups.md).

    The engines of a group talk to each other directly, unauthenticated and with
    pickles, on every TCP port: the fabric must be a private network.
    """

    enabled: bool = setting(False, Flag(), "Serve as a member of a group the router declares: no model or "
                            "engine of its own; the node connects at once and runs the part the router "
                            "assigns (docs/groups.md).", env="XEROTIER_AGENT_GROUP_ENABLED")
    fabric_interface: str = setting("", Text(), "Network interface the group's engines reach each other on "
                                    "(Gloo's and NCCL's socket interface; empty = the one holding fabric_address).",
                                    env="XEROTIER_AGENT_GROUP_FABRIC_INTERFACE")
    fabric_address: str = setting("", Text(), "This node's address on that network (vLLM's VLLM_HOST_IP; "
                                  "empty = the first address of fabric_interface).",
                                  env="XEROTIER_AGENT_GROUP_FABRIC_ADDRESS")
    port_range: str = setting("29500-29599", PortRange(),
                              "Ports the engine listens on for the group: the first is the leader's "
                              "--master-port, vLLM's own queues start at the second (Gloo and NCCL "
                              "still use ephemeral ports: open all TCP between members).",
                              env="XEROTIER_AGENT_GROUP_PORT_RANGE")
    allow_public_fabric: bool = setting(False, Flag(), "Allow a fabric address that is public: the engines "
                                        "then exchange unauthenticated pickles over it (never on the internet).",
                                        env="XEROTIER_AGENT_GROUP_ALLOW_PUBLIC_FABRIC")


SECTIONS: dict[str, type] = {
    "agent": AgentSection,
    "router": RouterSection,
    "engine": EngineSection,
    "model_cache": ModelCacheSection,
    "lmcache": LMCacheSection,
    "tuning": TuningSection,
    "metrics": MetricsSection,
    "group": GroupSection,
}

# systemd hands the unit's directories to the service; they outrank the
# built-in defaults (ProtectSystem=strict makes only these writable) but an
# explicit setting still wins.
SYSTEMD_DIRECTORIES = {
    "agent.state_dir": "STATE_DIRECTORY",
    "agent.cache_dir": "CACHE_DIRECTORY",
    "agent.runtime_dir": "RUNTIME_DIRECTORY",
}


@dataclass(frozen=True)
class SettingInfo:
    name: str  # "section.key"
    default: Any
    kind: Kind
    doc: str
    env: str | None
    flag: str | None
    secret: bool


def schema() -> dict[str, SettingInfo]:
    """Every setting by its dotted name, in declaration order."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            name = f"{section}.{f.name}"
            out[name] = SettingInfo(name, f.default, **f.metadata)
    return out


SCHEMA = schema()
ENV_TO_SETTING = {info.env: name for name, info in SCHEMA.items() if info.env}
FLAG_TO_SETTING = {info.flag: name for name, info in SCHEMA.items() if info.flag}
# Each key name to the section that has it (the first, should two sections share one).
KEY_SECTIONS: dict[str, str] = {}
for _name in SCHEMA:
    KEY_SECTIONS.setdefault(_name.split(".", 1)[1], _name.split(".", 1)[0])


# ---------------------------------------------------------------- the result


@dataclass(frozen=True)
class Config:
    agent: AgentSection
    router: RouterSection
    engine: EngineSection
    model_cache: ModelCacheSection
    lmcache: LMCacheSection
    tuning: TuningSection
    metrics: MetricsSection
    group: GroupSection
    origins: Mapping[str, str]
    sources: tuple[str, ...] = ()      # files read, in order
    warnings: tuple[str, ...] = ()     # worth saying, not worth failing over

    def get(self, name: str) -> Any:
        section, key = name.split(".", 1)
        return getattr(getattr(self, section), key)

    def items(self):
        """(name, value, origin) for every setting, in schema order."""
        for name in SCHEMA:
            yield name, self.get(name), self.origins[name]

    @property
    def state_dir(self) -> Path:
        return Path(self.agent.state_dir)

    @property
    def runtime_dir(self) -> Path:
        return Path(self.agent.runtime_dir)

    @property
    def cache_dir(self) -> Path:
        return Path(self.agent.cache_dir)

    @property
    def model_cache_path(self) -> Path:
        return Path(self.model_cache.path) if self.model_cache.path else self.state_dir / "models"

    @property
    def lmcache_disk_path(self) -> Path:
        return Path(self.lmcache.disk_path) if self.lmcache.disk_path else self.state_dir / "lmcache"


@dataclass(frozen=True)
class ConfigProblem:
    source: str          # a file path, "env:NAME", "flag:--name"
    key: str             # "section.key", "section", or "" for the whole file
    message: str
    line: int | None = None
    denied: bool = False  # the file exists but this user may not read it (EACCES/EPERM)

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """One or more problems; the daemon exits 78 (EX_CONFIG) on it."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ---------------------------------------------------------------- loading


def config_path(flag_path: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The main file and whether someone named it explicitly (then it must exist)."""
    if flag_path:
        return Path(flag_path), True
    if env.get(CONFIG_PATH_ENV):
        return Path(env[CONFIG_PATH_ENV]), True
    return DEFAULT_CONFIG_PATH, False


def dropin_paths(main: Path) -> list[Path]:
    directory = main.with_name(main.name + ".d")
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == ".toml" and not p.name.startswith("."))


def load(config_file: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
         flags: Mapping[str, str] | None = None, *, use_env: bool = True) -> Config:
    """Build the effective configuration; raise ConfigError naming every problem.

    `flags` maps dotted setting names to the text given on the command line.
    `use_env=False` reads files only (what `ximd config validate` checks).
    """
    env = dict(os.environ if env is None else env)
    main, explicit = config_path(str(config_file) if config_file else None, env)
    values: dict[str, Any] = {name: info.default for name, info in SCHEMA.items()}
    origins: dict[str, str] = {name: "default" for name in SCHEMA}
    problems: list[ConfigProblem] = []
    warnings: list[str] = []
    sources: list[str] = []

    def take(layer: dict[str, tuple[Any, str]]):
        for name, (value, origin) in layer.items():
            values[name], origins[name] = value, origin

    if use_env:
        take(systemd_directory_layer(env))
    try:
        dropins = dropin_paths(main)
    except PermissionError as exc:
        dropins = []
        problems.append(ConfigProblem(str(main.with_name(main.name + ".d")), "",
                                      f"cannot list: {exc.strerror or exc}", denied=True))
    for path in [main, *dropins]:
        if path == main and not explicit and not _present(path):
            continue
        layer, found = file_layer(path)
        problems += found
        sources.append(str(path))
        take(layer)
    if use_env:
        layer, found, unknown = env_layer(env)
        problems += found
        warnings += unknown
        take(layer)
    layer, found = flag_layer(flags or {})
    problems += found
    take(layer)
    problems += cross_checks(values, origins)
    warnings += expand_deprecated_insecure(values, origins)
    if problems:
        raise ConfigError(problems)
    sections = {
        section: cls(**{f.name: values[f"{section}.{f.name}"] for f in dataclasses.fields(cls)})
        for section, cls in SECTIONS.items()
    }
    return Config(**sections, origins=origins, sources=tuple(sources), warnings=tuple(warnings))


def _present(path: Path) -> bool:
    """Whether the file exists; one behind a directory this user may not search counts (and is then denied)."""
    try:
        return path.exists()
    except PermissionError:
        return True


def systemd_directory_layer(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    layer = {}
    for name, var in SYSTEMD_DIRECTORIES.items():
        if env.get(var):
            # systemd may pass several colon-separated paths; ours is the first.
            layer[name] = (env[var].split(":")[0], f"systemd:{var}")
    return layer


def file_layer(path: Path) -> tuple[dict[str, tuple[Any, str]], list[ConfigProblem]]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, [ConfigProblem(source, "", "file not found")]
    except PermissionError as exc:
        return {}, [ConfigProblem(source, "", f"cannot read: {exc.strerror or exc}", denied=True)]
    except OSError as exc:
        return {}, [ConfigProblem(source, "", f"cannot read: {exc.strerror or exc}")]
    except UnicodeDecodeError as exc:
        return {}, [ConfigProblem(source, "", f"cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _toml_error_line(str(exc))
        return {}, [ConfigProblem(source, "", f"TOML syntax error: {exc}", line)]
    layer, problems = {}, []
    for section, table in data.items():
        if section not in SECTIONS and not isinstance(table, dict) and section in KEY_SECTIONS:
            # A key above the first [section] header: TOML makes it top-level.
            owner = KEY_SECTIONS[section]
            problems.append(ConfigProblem(
                source, section, f"a key outside any section: it belongs under [{owner}] "
                f"({owner}.{section}); move the line below the [{owner}] header",
                _line_of_key(text, None, section)))
            continue
        if section not in SECTIONS and not isinstance(table, dict):
            problems.append(ConfigProblem(source, section, "a key outside any section, and no section has it"
                                          + _did_you_mean(section, KEY_SECTIONS), _line_of_key(text, None, section)))
            continue
        if section not in SECTIONS:
            problems.append(ConfigProblem(source, section, "unknown section" + _did_you_mean(section, SECTIONS),
                                          _line_of_section(text, section)))
            continue
        if not isinstance(table, dict):
            problems.append(ConfigProblem(source, section, "expected a [table]", _line_of_key(text, None, section)))
            continue
        known = [f.name for f in dataclasses.fields(SECTIONS[section])]
        for key, raw in table.items():
            name = f"{section}.{key}"
            line = _line_of_key(text, section, key)
            if key not in known:
                hint = _did_you_mean(key, known) or _did_you_mean(name, SCHEMA)
                problems.append(ConfigProblem(source, name, "unknown key" + hint, line))
                continue
            try:
                layer[name] = (SCHEMA[name].kind.parse(raw, from_text=False), source)
            except ValueError as exc:
                problems.append(ConfigProblem(source, name, f"expected {exc}, got {shown_bad_value(name, raw)}",
                                              line))
    return layer, problems


def env_layer(env: Mapping[str, str]):
    layer, problems, unknown = {}, [], []
    for var, text in env.items():
        if var in ENV_TO_SETTING:
            name = ENV_TO_SETTING[var]
            if text == "":
                continue  # compose files pass "${VAR:-}": empty means unset
            try:
                layer[name] = (SCHEMA[name].kind.parse(text, from_text=True), f"env:{var}")
            except ValueError as exc:
                problems.append(ConfigProblem(f"env:{var}", name,
                                              f"expected {exc}, got {shown_bad_value(name, text)}"))
        elif var.startswith(ENV_PREFIX) and var != CONFIG_PATH_ENV:
            unknown.append(f"ignoring unknown environment variable {var}"
                           + _did_you_mean(var, ENV_TO_SETTING))
    return layer, problems, unknown


def flag_layer(flags: Mapping[str, str]):
    layer, problems = {}, []
    for name, text in flags.items():
        info = SCHEMA.get(name)
        source = f"flag:{info.flag}" if info and info.flag else f"flag:--set {name}"
        if info is None:
            problems.append(ConfigProblem(source, name, "unknown key" + _did_you_mean(name, SCHEMA)))
            continue
        try:
            layer[name] = (info.kind.parse(text, from_text=True), source)
        except ValueError as exc:
            problems.append(ConfigProblem(source, name, f"expected {exc}, got {shown_bad_value(name, text)}"))
    return layer, problems


def cross_checks(values: Mapping[str, Any], origins: Mapping[str, str]) -> list[ConfigProblem]:
    """Rules that involve more than one setting."""
    problems = []
    concurrent, seqs = values["agent.max_concurrent"], values["engine.max_num_seqs"]
    if concurrent != AUTO and seqs != AUTO and seqs < concurrent:
        problems.append(ConfigProblem(
            origins["engine.max_num_seqs"], "engine.max_num_seqs",
            f"must not be below agent.max_concurrent ({concurrent}): the engine would queue "
            f"requests the node admitted, got {seqs}"))
    if values["router.join_key"] and values["router.join_key_file"]:
        problems.append(ConfigProblem(
            origins["router.join_key_file"], "router.join_key_file",
            "set either router.join_key or router.join_key_file, not both"))
    return problems


INSECURE_MEANS = ("router.allow_http", "router.tls_skip_verify")


def expand_deprecated_insecure(values: dict[str, Any], origins: dict[str, str]) -> list[str]:
    """router.insecure = true stands for both settings it used to mean (each set on
    its own still wins); a warning says so, and that it also turned certificate
    checks off."""
    if not values["router.insecure"]:
        return []
    origin = origins["router.insecure"]
    for name in INSECURE_MEANS:
        if origins[name] == "default":
            values[name], origins[name] = True, f"{origin} (router.insecure)"
    return [f"router.insecure ({origin}) is deprecated: it allows plain http AND turns off the "
            "router's certificate check; set router.allow_http and, only if you must, "
            "router.tls_skip_verify instead"]


def shown_bad_value(name: str, raw: Any) -> str:
    """A rejected value as an error message may show it: a secret setting's masked."""
    if not SCHEMA[name].secret:
        return repr(raw)
    if isinstance(raw, str) and raw:
        return repr(mask_secret(raw))
    return f"a {type(raw).__name__} (secret, not shown)"


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _toml_error_line(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None


def _line_of_section(text: str, section: str) -> int | None:
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*\[\s*{re.escape(section)}\s*\]", line):
            return number
    return None


def _line_of_key(text: str, section: str | None, key: str) -> int | None:
    """Best-effort line of `key` inside `[section]` (tomllib keeps no positions)."""
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[\s*([A-Za-z0-9_.-]+)\s*\]", line)
        if header:
            current = header.group(1)
        elif current == section and re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", line):
            return number
    return None


# ---------------------------------------------------------------- showing


def shown_value(name: str, value: Any) -> Any:
    """The value as `config show` may print it: secrets masked, tuples as lists."""
    if SCHEMA[name].secret and value:
        return mask_secret(value)
    return list(value) if isinstance(value, tuple) else value


def mask_secret(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme and parts.hostname:
        if not parts.password:
            return value
        netloc = parts.netloc.replace(f":{parts.password}@", ":****@")
        return parts._replace(netloc=netloc).geturl()
    return f"{value[:4]}…(set, {len(value)} characters)"
