"""`xim-router`: serve, join-key create/list/revoke, agents (list, set), revoke.

The router's only argv parser and the only place it prints: the modules
below take values, return results and raise.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from xim_proto import __version__, eventloop
from xim_proto.addresses import parse_host_port
from xim_proto.cliout import FORMATS, format_name, local_text, quiet_on_closed_stdout, rfc3339
from xim_proto.joinkey import fingerprint
from xim_proto.modelid import is_model_id
from xim_proto.privileges import become, owner_to_become
from xim_router import config, dataplane, exposure, keys, notify, openai_api, server, workers
from xim_router import store as store_mod
from xim_router.groups import GroupSpec
from xim_router.http import quiet_malformed_requests
from xim_router.mesh import RouterSettings
from xim_router.policy import MAX_CONCURRENT_LIMIT, NodePolicy, check_max_concurrent, check_model_name
from xim_router.server import Bound, ServeOptions, StartupError

DEFAULT_STATE_DIR = "/var/lib/xim-router"
EXIT_USAGE = 2          # what argparse returns for a bad command line: an unsafe one is refused alike
EXIT_PIPE = 141         # stdout's reader went away (`| head`): what a shell reports for coreutils killed by SIGPIPE
# The moments a row holds as seconds since the epoch: JSON shows them in RFC 3339 UTC.
TIME_FIELDS = ("created_at", "expires_at", "enrolled_at", "state_since", "last_seen_at")

log = logging.getLogger("xim_router")


def _duration(text: str) -> float:
    try:
        return keys.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration_or_zero(text: str) -> float:
    """A duration, or 0 (which parse_duration refuses: a zero TTL is a mistake, a zero wait is not)."""
    if re.fullmatch(r"\s*0+(\.0*)?\s*[smhd]?\s*", text):
        return 0.0
    return _duration(text)


def _host_port(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, ephemeral_ok=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080): {exc}") from None


def _mesh_endpoint(text: str) -> str:
    if not text.startswith("tcp://") or ":" not in text[6:]:
        raise argparse.ArgumentTypeError(f"{text!r} is not tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555)")
    return text


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _workers(text: str) -> int:
    try:
        return workers.parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_name(text: str) -> str:
    try:
        return check_model_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _max_concurrent(text: str) -> int:
    try:
        return check_max_concurrent(int(text) if text.isdigit() else 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def add_policy_arguments(parser: argparse.ArgumentParser, *, replacing: bool) -> None:
    """What nodes may serve: on a join key (for the nodes it enrolls) or on one agent."""
    group = parser.add_argument_group("what the node may serve")
    models = group.add_mutually_exclusive_group()
    models.add_argument("--allow-model", action="append", type=_model_name, metavar="NAME",
                        help="a model it may serve (repeatable" + ("; replaces the list)" if replacing else ")"))
    models.add_argument("--allow-any-model", action="store_true",
                        help="it may serve any model it declares: only for nodes you trust with every "
                             "model's traffic")
    ceiling = group.add_mutually_exclusive_group()
    ceiling.add_argument("--max-concurrent", type=_max_concurrent, metavar="N",
                         help="give it at most N requests at once, whatever it declares "
                              f"(1 to {MAX_CONCURRENT_LIMIT}; default: what it declares, at most "
                              f"{MAX_CONCURRENT_LIMIT})")
    if replacing:
        ceiling.add_argument("--no-max-concurrent", action="store_true",
                             help="remove the ceiling: what it declares counts again")


def _group_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a group name (1-64 letters, digits, '.', '_', '-')")
    return text


def _model_id(text: str) -> str:
    if not is_model_id(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hugging Face model id (org/name: "
                                         "letters, digits, '-', '_', '.'; no path, no leading '-')")
    return text


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    """The serving flags of ``xim-router serve``."""
    group = parser.add_argument_group("OpenAI API")
    group.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="accept this API key (repeatable; prefer --api-key-file: argv is "
                            "visible to other users)")
    group.add_argument("--api-key-file", metavar="PATH",
                       help="accept the API keys in PATH, one per line ('#' comments)")
    group.add_argument("--request-timeout", type=float, default=dataplane.Settings.request_timeout_s,
                       metavar="SECONDS", help="deadline of one request (default %(default)g)")
    group.add_argument("--hold-for-node", type=_duration_or_zero, default=dataplane.Settings.hold_s,
                       metavar="DURATION",
                       help="how long a request for a model whose nodes are away for now (re-executing "
                            "for an upgrade, reconnecting, draining, loading) waits for one before its "
                            "retryable 503 (default %(default)gs; 0 = answer at once)")
    group.add_argument("--hold-max-requests", type=_positive_int, default=dataplane.Settings.hold_max,
                       metavar="N", help="requests that may wait for a node at once; more get the 503 "
                                         "at once (default %(default)d)")



def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The flags of ``xim-router serve``: also the keys of router.toml (xim_router.config)."""
    serve.add_argument("--config", metavar="PATH",
                       help=f"read these options from PATH first; a flag wins over the file (default: "
                            f"${config.PATH_ENV}, or {config.DEFAULT_PATH} when it exists)")
    listen = serve.add_argument_group("listening")
    listen.add_argument("--http", type=_host_port, default=("127.0.0.1", 8080), metavar="HOST:PORT",
                        help="OpenAI API address, and enrollment's unless --enroll-http "
                             "(default 127.0.0.1:8080; port 0 = any free)")
    listen.add_argument("--enroll-http", type=_host_port, metavar="HOST:PORT",
                        help="serve the enrollment API on this address instead (e.g. a private "
                             "network), apart from the OpenAI API")
    listen.add_argument(exposure.ALLOW_FLAG, action="store_true",
                        help="serve plain HTTP without API keys on a non-loopback --http address "
                             "(refused otherwise: anyone who reaches it uses the API, and keys "
                             "cross the network in clear)")
    listen.add_argument("--mesh", type=_mesh_endpoint, default="tcp://127.0.0.1:5555",
                        metavar="tcp://HOST:PORT", help="mesh address (default %(default)s; port 0 = any)")
    listen.add_argument("--advertise", action="append", type=_mesh_endpoint, default=[],
                        metavar="tcp://HOST:PORT",
                        help="mesh endpoint to give agents (repeatable; default: the bound one)")
    listen.add_argument("--tls-cert", help="PEM certificate (chain) for HTTPS")
    listen.add_argument("--tls-key", help="PEM private key for --tls-cert")
    timing = serve.add_argument_group("lease timing")
    timing.add_argument("--lease-interval", type=_duration, default=5.0, metavar="DURATION",
                        help="how often agents send a lease (default 5s)")
    timing.add_argument("--lease-timeout", type=_duration, default=15.0, metavar="DURATION",
                        help="no lease for this long: disconnected (default 15s)")
    timing.add_argument("--dead-after", type=_duration, default=300.0, metavar="DURATION",
                        help="disconnected for this long: dead (default 5m)")
    timing.add_argument("--token-ttl", type=_duration, default=86400.0, metavar="DURATION",
                        help="lifetime of an agent's bearer token (default 24h)")
    timing.add_argument("--refresh-grace", type=_duration, default=RouterSettings.token_grace_s,
                        metavar="DURATION",
                        help="how long after its expiry a token may still be refreshed, and how long "
                             "a node may be off the mesh before a token alone no longer renews or "
                             "unenrolls it (default 7d)")
    serve.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                       help="HTTP worker processes that serve the OpenAI API on --http together, "
                            "beside the core that runs the mesh (auto: one per core, at most "
                            f"{workers.AUTO_LIMIT}; default 1: one process does everything)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    serve.add_argument("--event-loop", default=eventloop.AUTO, choices=eventloop.CHOICES,
                       help="asyncio's event loop: auto = uvloop when installed (python3-uvloop), else "
                            "asyncio's own; uvloop = uvloop or do not start (default %(default)s)")
    add_api_arguments(serve)


def add_format(parser: argparse.ArgumentParser) -> None:
    """`--format text|json`, spelled as ximd spells it ('table' is still accepted for text)."""
    parser.add_argument("--format", type=format_name, choices=FORMATS, default="text",
                        help="text (a table, the default) or json (timestamps in RFC 3339 UTC)")


def json_rows(rows: list[dict]) -> str:
    """Rows as `--format json` prints them: every moment in RFC 3339 UTC."""
    return json.dumps([{k: rfc3339(v) if k in TIME_FIELDS else v for k, v in row.items()} for row in rows],
                      indent=2)


def build_parser(serve_defaults: dict[str, object] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xim-router",
        description="The open router that ximd nodes join: enrollment, the CurveZMQ mesh, "
                    "and (with serving) an OpenAI-compatible API.")
    parser.add_argument("--version", action="version", version=f"xim-router {__version__}")
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", default=os.environ.get("XIM_ROUTER_STATE_DIR", DEFAULT_STATE_DIR),
                       help="keys and the SQLite store (default: $XIM_ROUTER_STATE_DIR or %(default)s)")
    # For a subcommand under a command that takes --state-dir too: given on either side
    # of the subcommand's name, without the subcommand's default overwriting it.
    state_again = argparse.ArgumentParser(add_help=False)
    state_again.add_argument("--state-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[state], help="run the router")
    add_serve_arguments(serve)
    # router.toml's values, under the flags (`main` reads the file).
    serve.set_defaults(**(serve_defaults or {}))

    join_key = sub.add_parser("join-key", help="manage join keys")
    jk_sub = join_key.add_subparsers(dest="subcommand", required=True)
    create = jk_sub.add_parser(
        "create", parents=[state], help="mint a join key; prints it on stdout",
        description="Mint a join key. Say what the nodes it enrolls may serve: --model, "
                    "--allow-model or --allow-any-model (there is no silent default).")
    create.add_argument("--ttl", type=_duration, default=86400.0, metavar="DURATION",
                        help="valid for (default 24h)")
    create.add_argument("--uses", type=_positive_int, default=1, help="how many agents may use it (default 1)")
    create.add_argument("--model", type=_model_id,
                        help="model assigned to agents that enroll with it (and allowed to them; "
                             "a Hugging Face id, org/name)")
    add_policy_arguments(create, replacing=False)
    listing = jk_sub.add_parser("list", parents=[state],
                                help="list join keys: fingerprint, uses left, expiry, model (never the key)")
    add_format(listing)
    jk_revoke = jk_sub.add_parser("revoke", parents=[state],
                                  help="revoke a join key: no agent can enroll with it any more")
    jk_revoke.add_argument("fingerprint", help="as `join-key list` shows it (sha256:…)")

    agents = sub.add_parser("agents", parents=[state], help="list enrolled agents; set what one may serve")
    add_format(agents)
    agents_sub = agents.add_subparsers(dest="subcommand")
    agent_set = agents_sub.add_parser(
        "set", parents=[state_again], help="change what an agent may serve",
        description="Change what an enrolled agent may serve; a running router applies it "
                    "within a second. Options not given stay as they are.")
    agent_set.add_argument("agent_id")
    add_policy_arguments(agent_set, replacing=True)

    revoke = sub.add_parser("revoke", parents=[state], help="revoke an agent's identity")
    revoke.add_argument("agent_id")

    groups = sub.add_parser("groups", parents=[state],
                            help="list groups (one model on several agents); declare or delete one")
    add_format(groups)
    groups_sub = groups.add_subparsers(dest="subcommand")
    group_create = groups_sub.add_parser(
        "create", parents=[state_again], help="declare a group",
        description="Declare a group: MODEL run by vLLM's multi-node engine over the MEMBERS, TP x PP "
                    "spread over them. The first member leads (rank 0: it serves the API), the others "
                    "follow in the order given. A running router forms it within a second and starts it "
                    "once every member is connected, runs the same engine version and has the model. "
                    "The members' engines talk to each other on their private fabric (docs/groups.md).")
    group_create.add_argument("name", type=_group_name)
    group_create.add_argument("members", nargs="+", metavar="MEMBER",
                              help="an enrolled agent's worker id or agent id, in rank order (at least two)")
    group_create.add_argument("--model", type=_model_id, required=True, help="the model, a Hugging Face id")
    group_create.add_argument("--tensor-parallel-size", "--tp", type=_positive_int, required=True, metavar="N",
                              help="TP over the whole group")
    group_create.add_argument("--pipeline-parallel-size", "--pp", type=_positive_int, default=1, metavar="N",
                              help="PP over the whole group (default 1)")
    group_delete = groups_sub.add_parser("delete", parents=[state_again],
                                         help="delete a group: its members stop their parts")
    group_delete.add_argument("name")

    config_cmd = sub.add_parser("config", help="check router.toml")
    config_sub = config_cmd.add_subparsers(dest="subcommand", required=True)
    validate = config_sub.add_parser("validate", help="check the configuration file without starting anything "
                                                      f"(exit {config.EX_CONFIG} when it is invalid)")
    validate.add_argument("config", nargs="?", metavar="PATH",
                          help=f"default: ${config.PATH_ENV}, or {config.DEFAULT_PATH}")
    return parser


def open_store(state_dir: str) -> store_mod.Store:
    return store_mod.Store(Path(state_dir))


NO_POLICY = ("xim-router: join-key create: say what the nodes it enrolls may serve: --model NAME "
             "(assigns and allows it), --allow-model NAME (repeatable), or --allow-any-model (any model "
             "a node declares: only for nodes you trust with every model's traffic)")


def join_key_policy(args: argparse.Namespace) -> NodePolicy | None:
    """The policy a new key gives its nodes; None when the operator did not say (no guessing:
    "any" would let every key holder claim every model, "none" would enroll nodes that serve nothing)."""
    if args.allow_any_model:
        return NodePolicy(None, args.max_concurrent)
    names = set(args.allow_model or ()) | ({args.model} if args.model else set())
    return NodePolicy(frozenset(names), args.max_concurrent) if names else None


def cmd_join_key_create(args: argparse.Namespace) -> int:
    policy = join_key_policy(args)
    if policy is None:
        print(NO_POLICY, file=sys.stderr)
        return 2
    store = open_store(args.state_dir)
    key = store.create_join_key(ttl_s=args.ttl, uses=args.uses, model=args.model,
                                allowed_models=policy.allowed_models,
                                max_concurrent_ceiling=policy.max_concurrent)
    print(key)
    print(f"join key {fingerprint(key)}: {args.uses} use(s), valid until "
          f"{local_text(time.time() + args.ttl)}; "
          f"its nodes {policy.describe()}", file=sys.stderr)
    return 0


def updated_policy(current: NodePolicy, args: argparse.Namespace) -> NodePolicy:
    """``current`` with what `agents set` was told to change."""
    models = current.allowed_models
    if args.allow_any_model:
        models = None
    elif args.allow_model:
        models = frozenset(args.allow_model)
    ceiling = None if args.no_max_concurrent else (args.max_concurrent or current.max_concurrent)
    return NodePolicy(models, ceiling)


def cmd_agents_set(args: argparse.Namespace) -> int:
    if not (args.allow_model or args.allow_any_model or args.max_concurrent or args.no_max_concurrent):
        print("xim-router: agents set: nothing to change: give --allow-model, --allow-any-model, "
              "--max-concurrent or --no-max-concurrent", file=sys.stderr)
        return 2
    store = open_store(args.state_dir)
    agent = store.agent(args.agent_id)
    if agent is None:
        print(f"xim-router: no agent {args.agent_id!r} (see `xim-router agents`)", file=sys.stderr)
        return 1
    policy = updated_policy(agent.policy, args)
    store.set_policy(agent.agent_id, policy)
    print(f"agent {agent.agent_id} {policy.describe()}; a running router applies it within a second")
    return 0


def join_key_rows(join_keys: list[store_mod.JoinKey], now: float) -> list[dict]:
    """What `join-key list` shows of each key: never the key, which the store does not hold."""
    def state(k: store_mod.JoinKey) -> str:
        if k.expires_at <= now:
            return "expired"
        return "used up" if k.uses_left <= 0 else "valid"
    return [{"fingerprint": k.fingerprint, "state": state(k), "uses_left": max(k.uses_left, 0),
             "created_at": k.created_at, "expires_at": k.expires_at, "model": k.model} for k in join_keys]


def cmd_join_key_list(args: argparse.Namespace) -> int:
    rows = join_key_rows(open_store(args.state_dir).join_keys(), time.time())
    if args.format == "json":
        print(json_rows(rows))
    else:
        print(render_table([{c: cell_text(v) for c, v in r.items()} | {"expires": local_text(r["expires_at"])}
                            for r in rows],
                           ["fingerprint", "state", "uses_left", "expires", "model"])
              if rows else "no join keys")
    return 0


def cmd_join_key_revoke(args: argparse.Namespace) -> int:
    wanted = args.fingerprint if args.fingerprint.startswith("sha256:") else "sha256:" + args.fingerprint
    store = open_store(args.state_dir)
    if not any(k.fingerprint == wanted for k in store.join_keys()):
        print(f"xim-router: no join key {wanted} (see `xim-router join-key list`)", file=sys.stderr)
        return 1
    if not store.revoke_join_key(wanted):
        print(f"xim-router: join key {wanted} is already expired or used up", file=sys.stderr)
        return 1
    print(f"revoked join key {wanted}: no agent can enroll with it any more (agents that already "
          "did keep their identity; `xim-router revoke AGENT_ID` ends one)")
    return 0


def agent_rows(agents: list[store_mod.Agent], now: float) -> list[dict]:
    """What `agents` shows: the node's own declarations (models, declared_max_concurrent,
    from its last lease) beside what the operator allows and what the router uses."""
    rows = []
    for a in agents:
        lease = a.last_lease or {}
        declared = [m["name"] for m in lease.get("models", [])]
        declared_max = lease.get("max_concurrent", a.max_concurrent)
        policy = a.policy
        rows.append({
            "agent_id": a.agent_id, "worker_id": a.worker_id, "hostname": a.hostname,
            "state": a.state, "state_since": a.state_since, "enrolled_at": a.enrolled_at,
            "last_seen_at": a.last_seen_at,
            "last_seen_ago_s": round(now - a.last_seen_at, 1) if a.last_seen_at else None,
            "max_concurrent": a.max_concurrent, "agent_version": a.agent_version,
            "assigned_model": a.assigned_model,
            "running": lease.get("running"), "waiting": lease.get("waiting"),
            "kv_cache_usage": lease.get("kv_cache_usage"),
            "models": [m["name"] + ":" + m["state"] for m in lease.get("models", [])],
            "allowed_models": None if policy.allowed_models is None else sorted(policy.allowed_models),
            "refused_models": sorted({name for name in declared if not policy.allows(name)}),
            "declared_max_concurrent": declared_max,
            "max_concurrent_ceiling": policy.max_concurrent,
            "effective_max_concurrent": policy.capacity(declared_max),
        })
    return rows


def printable(text: str) -> str:
    """A node-chosen string made safe for a terminal: control characters escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


def cell_text(value: object) -> str:
    """One value as a table cell: lists joined, None as '-', control characters escaped."""
    if isinstance(value, list):
        return printable(", ".join(value)) if value else "-"
    return "-" if value is None else printable(str(value))


AGENT_COLUMNS = ["agent_id", "worker_id", "hostname", "state", "last_seen_ago_s", "running",
                 "waiting", "models", "allowed", "refused", "max_concurrent"]


def table_cells(row: dict) -> dict[str, str]:
    """One agent's row as the table shows it."""
    cells = {c: cell_text(v) for c, v in row.items()}
    cells["allowed"] = "any" if row["allowed_models"] is None else cell_text(row["allowed_models"])
    cells["refused"] = cells.pop("refused_models")
    effective, declared = row["effective_max_concurrent"], row["declared_max_concurrent"]
    cells["max_concurrent"] = f"{effective}" + (f" (declares {declared})" if declared != effective else "")
    return cells


def render_table(rows: list[dict[str, str]], columns: list[str]) -> str:
    """Rows of cell texts in aligned columns, headed by the column names."""
    cells = [[r[c] for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def cmd_agents(args: argparse.Namespace) -> int:
    rows = agent_rows(open_store(args.state_dir).agents(), time.time())
    if args.format == "json":
        print(json_rows(rows))
    else:
        print(render_table([table_cells(r) for r in rows], AGENT_COLUMNS) if rows else "no agents enrolled")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    store = open_store(args.state_dir)
    if store.agent(args.agent_id) is None:
        print(f"xim-router: no agent {args.agent_id!r} (see `xim-router agents`)", file=sys.stderr)
        return 1
    if not store.final_state(args.agent_id, store_mod.REVOKED):
        print(f"xim-router: agent {args.agent_id} is already revoked or unenrolled", file=sys.stderr)
        return 1
    print(f"revoked agent {args.agent_id}; a running router ends its session within a second")
    return 0


def cmd_groups_create(args: argparse.Namespace) -> int:
    store = open_store(args.state_dir)
    by_agent_id = {a.agent_id: a.worker_id for a in store.agents()}
    members = tuple(by_agent_id.get(m, m) for m in args.members)
    spec = GroupSpec(args.name, args.model, args.tensor_parallel_size, args.pipeline_parallel_size, members)
    problem = spec.problem()
    if problem:
        print(f"xim-router: groups create: {problem}", file=sys.stderr)
        return 2
    try:
        store.create_group(spec)
    except store_mod.StoreError as exc:
        print(f"xim-router: groups create: {exc.message} (see `xim-router agents`)", file=sys.stderr)
        return 1
    print(f"group {spec.name}: {spec.model}, TP {spec.tensor_parallel_size} x PP {spec.pipeline_parallel_size} "
          f"over {len(members)} members, led by {members[0]}; a running router forms it within a second")
    return 0


def cmd_groups_delete(args: argparse.Namespace) -> int:
    if not open_store(args.state_dir).delete_group(args.name):
        print(f"xim-router: no group {args.name!r} (see `xim-router groups`)", file=sys.stderr)
        return 1
    print(f"deleted group {args.name}; a running router tells its members to stop their parts")
    return 0


def group_rows(groups: list[store_mod.StoredGroup], agents: list[store_mod.Agent]) -> list[dict]:
    """What `groups` shows: each group and each member's part as its last lease reported it."""
    by_worker = {a.worker_id: a for a in agents}
    rows = []
    for g in groups:
        spec = g.spec
        parts = []
        for rank, worker in enumerate(spec.members):
            agent = by_worker.get(worker)
            report = ((agent.last_lease or {}).get("group") if agent else None) or {}
            mine = report.get("group") == spec.name
            parts.append({"rank": rank, "worker_id": worker, "agent_state": agent.state if agent else "unknown",
                          "part": report.get("state") if mine else None,
                          "epoch": report.get("epoch") if mine else None,
                          "fabric_address": report.get("fabric_address") if mine else None,
                          "engine_version": report.get("engine_version") if mine else None,
                          "detail": report.get("detail") if mine else None})
        rows.append({"name": spec.name, "model": spec.model, "tensor_parallel_size": spec.tensor_parallel_size,
                     "pipeline_parallel_size": spec.pipeline_parallel_size, "epoch": g.epoch,
                     "created_at": g.created_at, "members": parts})
    return rows


def member_cell(part: dict) -> str:
    where = part["part"] or part["agent_state"]
    epoch = f"@{part['epoch']}" if part["epoch"] is not None else ""
    return printable(f"{part['rank']}:{part['worker_id']} {where}{epoch}")


def cmd_groups(args: argparse.Namespace) -> int:
    store = open_store(args.state_dir)
    rows = group_rows(store.groups(), store.agents())
    if args.format == "json":
        print(json_rows(rows))
    elif not rows:
        print("no groups (declare one with `xim-router groups create`)")
    else:
        print(render_table([{"name": printable(r["name"]), "model": printable(r["model"]),
                             "tp_x_pp": f"{r['tensor_parallel_size']}x{r['pipeline_parallel_size']}",
                             "epoch": str(r["epoch"]), "members": ", ".join(member_cell(p) for p in r["members"])}
                            for r in rows], ["name", "model", "tp_x_pp", "epoch", "members"]))
    return 0


def api_settings_from(args: argparse.Namespace) -> openai_api.ApiSettings:
    """The OpenAI API's settings from the serving flags; ValueError with a message for the operator."""
    return openai_api.api_settings(args.api_key, args.api_key_file, args.request_timeout,
                                   args.hold_for_node, args.hold_max_requests)


def router_settings_from(args: argparse.Namespace) -> RouterSettings:
    """The mesh's lease timing from the flags; config.ConfigError when they contradict each other."""
    if args.lease_timeout <= args.lease_interval:
        raise config.ConfigError("--lease-timeout must be longer than --lease-interval")
    return RouterSettings(lease_interval_s=args.lease_interval, lease_timeout_s=args.lease_timeout,
                          dead_after_s=args.dead_after, token_ttl_s=args.token_ttl,
                          token_grace_s=args.refresh_grace,
                          sweep_interval_s=min(1.0, args.lease_interval / 2))


def with_credentials(args: argparse.Namespace) -> argparse.Namespace:
    """Under xim-router.service: the TLS files and the API key file that systemd handed over
    as credentials, where neither a flag nor router.toml names one."""
    if args.tls_cert is None and args.tls_key is None:
        args.tls_cert = config.credential_path(config.TLS_CERT_CREDENTIAL)
        args.tls_key = config.credential_path(config.TLS_KEY_CREDENTIAL)
    if args.api_key_file is None:
        args.api_key_file = config.credential_path(config.API_KEYS_CREDENTIAL)
    return args


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """What `server.start` needs, checked in the order the operator reads the flags.
    config.ConfigError for what the operator configured wrong (restarting cannot fix it)."""
    settings = router_settings_from(args)
    try:
        ssl_context = server.tls_context(args.tls_cert, args.tls_key)
        api = api_settings_from(args)
    except (StartupError, ValueError) as exc:
        raise config.ConfigError(str(exc)) from None
    return ServeOptions(state_dir=Path(args.state_dir), http=args.http, mesh=args.mesh,
                        advertise=tuple(args.advertise), settings=settings, api=api,
                        ssl_context=ssl_context, enroll_http=args.enroll_http, workers=args.workers,
                        tls_files=(args.tls_cert, args.tls_key), log_level=args.log_level)


class UnsafeExposure(StartupError):
    """The listeners would expose the router without protection and nobody said that is wanted."""


def checked_exposure(args: argparse.Namespace, options: ServeOptions) -> None:
    """Refuse an unprotected public listener; log a warning for every other unsafe one."""
    verdict = exposure.assess(options.http, options.enroll_http, tls=options.ssl_context is not None,
                              api_keys=bool(options.api.api_keys),
                              allow_insecure_http=args.allow_insecure_http)
    if verdict.refusal:
        raise UnsafeExposure(verdict.refusal)
    for warning in verdict.warnings:
        log.warning("%s", warning)


def serving_line(bound: Bound) -> str:
    """The one line on stdout that scripts and tests parse (tests/support/router.py READY_LINE)."""
    return (f"xim-router serving http={bound.http_url} mesh={bound.mesh_endpoint} "
            f"public_key={bound.public_key} state_dir={bound.state_dir} enroll={bound.enroll_url}")


async def serve(options: ServeOptions) -> int:
    running = await server.start(options)
    # The same facts go to the log when serving starts.
    print(serving_line(running.bound), flush=True)
    notify.send("READY=1", f"STATUS=serving {running.bound.http_url}, mesh {running.bound.mesh_endpoint}")
    status = await running.serve_until_signalled()
    sys.stdout.flush()
    return status


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_malformed_requests()
    try:
        options = serve_options(with_credentials(args))
        checked_exposure(args, options)
        try:
            loop = eventloop.choose(args.event_loop)
        except eventloop.EventLoopError as exc:
            raise config.ConfigError(str(exc)) from None
        log.info("event loop: %s", loop.name)
        return loop.run(serve(options))
    except config.ConfigError as exc:
        print(f"xim-router: invalid configuration: {exc}", file=sys.stderr)
        notify.send(f"STATUS=invalid configuration: {exc}")
        return config.EX_CONFIG
    except UnsafeExposure as exc:
        print(f"xim-router: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"xim-router: {exc}", file=sys.stderr)
        return 1


def from_file(action: argparse.Action, value: object) -> object:
    """A router.toml value as the flag of ``action`` would have it; ValueError saying what it
    must be. Flags take text: a number is its text, a switch takes true or false, a repeatable
    flag a list."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise ValueError('must be a list, e.g. ["…"]')
        return [_one_from_file(action, item) for item in value]
    return _one_from_file(action, value)


def _one_from_file(action: argparse.Action, value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"must be a string or a number, not {type(value).__name__}")
    text = str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def serve_config_defaults(given: str | None) -> dict[str, object]:
    """router.toml's values for `serve`: --config, $XIM_ROUTER_CONFIG or the default file."""
    path, required = config.config_path(given)
    parser = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(parser)
    converters = {action.dest: functools.partial(from_file, action) for action in parser._actions
                  if action.option_strings and action.dest not in config.NOT_IN_FILE}
    return config.file_values(path, converters, required=required)


def cmd_config_validate(args: argparse.Namespace) -> int:
    path, required = config.config_path(args.config)
    if not required and not path.exists():
        print(f"{path}: absent; `xim-router serve` uses its defaults")
        return 0
    try:
        settings = serve_config_defaults(str(path))
    except config.ConfigError as exc:
        print(f"xim-router: invalid configuration: {exc}", file=sys.stderr)
        return config.EX_CONFIG
    print(f"{path}: valid ({len(settings)} setting(s))")
    return 0


# Commands that only read and write the store: run by root, they become the state
# directory's owner (the service's account), so that what they create stays its own.
ADMIN_COMMANDS = {"join-key", "agents", "revoke", "groups"}


COMMANDS = {
    ("config", "validate"): cmd_config_validate,
    ("serve", None): cmd_serve,
    ("join-key", "create"): cmd_join_key_create,
    ("join-key", "list"): cmd_join_key_list,
    ("join-key", "revoke"): cmd_join_key_revoke,
    ("agents", None): cmd_agents,
    ("agents", "set"): cmd_agents_set,
    ("revoke", None): cmd_revoke,
    ("groups", None): cmd_groups,
    ("groups", "create"): cmd_groups_create,
    ("groups", "delete"): cmd_groups_delete,
}


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line; for `serve`, over router.toml's values (a flag wins over the file)."""
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        return args
    defaults = serve_config_defaults(args.config)
    # A list from the file is replaced by the flags, not appended to.
    advertise = defaults.pop("advertise", [])
    args = build_parser(defaults).parse_args(argv)
    args.advertise = args.advertise or advertise
    return args


def main(argv: list[str] | None = None) -> int:
    # `xim-router … | head`: the reader leaving ends the command quietly, as it ends coreutils.
    return quiet_on_closed_stdout(lambda: dispatch(argv), EXIT_PIPE)


def dispatch(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
    except config.ConfigError as exc:
        print(f"xim-router: invalid configuration: {exc}", file=sys.stderr)
        notify.send(f"STATUS=invalid configuration: {exc}")
        return config.EX_CONFIG
    handler = COMMANDS[(args.command, getattr(args, "subcommand", None))]
    if args.command in ADMIN_COMMANDS:
        owner = owner_to_become([Path(args.state_dir)])
        if owner is not None:
            become(owner)
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except PermissionError as exc:
        print(f"xim-router: {exc.filename}: permission denied", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
