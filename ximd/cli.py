"""`ximd` command line: the front door that parses argv, loads config and dispatches.

What each command prints, and its exit status, is ximd.commands'. Heavy
modules are imported inside the commands that need them so that `ximd --help`
and `ximd status` stay instant, and after the configuration is loaded, so that a
user who may not read it is told so at once (exit 77).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from xim_proto.cliout import FORMATS, format_name, quiet_on_closed_stdout
from ximd import __version__
from ximd import config as configmod
from ximd.commands import config as config_cmd
from ximd.config import ConfigError
from ximd.exitcodes import EX_INTERRUPTED, EX_PIPE
from ximd.logs import setup_logging


def setting_flags() -> argparse.ArgumentParser:
    """Flags shared by the commands that load configuration (highest precedence)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("configuration (flag > env > agent.toml.d/ > agent.toml > default)")
    group.add_argument("--config", metavar="PATH",
                       help=f"main config file (default {configmod.DEFAULT_CONFIG_PATH}, "
                            f"or ${configmod.CONFIG_PATH_ENV}); drop-ins from PATH.d/")
    for name, info in configmod.SCHEMA.items():
        if info.flag:
            group.add_argument(info.flag, dest=f"setting:{name}", metavar="VALUE",
                               help=f"{name}: {info.doc}")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="set any key, e.g. --set lmcache.enabled=false (repeatable)")
    return parent


def flags_from(args: argparse.Namespace) -> dict[str, str]:
    flags = {dest.split(":", 1)[1]: value for dest, value in vars(args).items()
             if dest.startswith("setting:") and value is not None}
    for item in getattr(args, "overrides", []):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError([configmod.ConfigProblem("flag:--set", item, "expected KEY=VALUE")])
        if key in configmod.SCHEMA and configmod.SCHEMA[key].secret:
            # argv is world-readable through ps and /proc: secrets never travel there.
            raise ConfigError([configmod.ConfigProblem(
                "flag:--set", key, "a secret cannot be given on the command line (ps shows it); "
                "use the config file, a file (router.join_key_file, --join-key-file) or the environment")])
        flags[key] = value
    return flags


def load_config(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(args.config, flags=flags_from(args))


def add_format(parser: argparse.ArgumentParser, text_is: str = "human-readable text") -> None:
    """`--format text|json`, spelled alike on every command of both programs."""
    parser.add_argument("--format", type=format_name, choices=FORMATS, default="text",
                        help=f"text ({text_is}, the default) or json (timestamps in RFC 3339 UTC)")


def build_parser() -> argparse.ArgumentParser:
    shared = setting_flags()
    parser = argparse.ArgumentParser(
        prog="ximd",
        description="ximd — the systemd-native XIM node agent: supervises vLLM and serves "
                    "a router mesh over CurveZMQ.")
    parser.add_argument("--version", action="version", version=f"ximd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("run", parents=[shared], help="run the daemon (what the systemd unit starts)",
                   description="Run the node agent in the foreground; systemd's Type=notify unit runs this.")

    enroll = sub.add_parser("enroll", parents=[shared], help="enroll this node with a join key")
    enroll.add_argument("--join-key-file", metavar="PATH",
                        help="read the join key from PATH ('-' for stdin); never pass it in argv")
    enroll.add_argument("--force", action="store_true",
                        help="enroll again even though an identity exists (replaces it)")
    sub.add_parser("unenroll", parents=[shared], help="tell the router and remove this node's identity")

    status = sub.add_parser("status", parents=[shared], help="ask the running daemon how it is")
    add_format(status)

    re_exec = sub.add_parser("reexec", parents=[shared], help="replace the running daemon in place, keeping the engine",
                             description="Re-execute the running ximd in place (same PID and unit) so that an "
                                         "upgraded package takes effect without reloading the model; the engine "
                                         "is kept when the new version would start it the same way.")
    re_exec.add_argument("--no-wait", action="store_true", help="return once the daemon has started the switch")
    re_exec.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                         help="how long to wait for the new image to settle (default 300)")

    doctor = sub.add_parser("doctor", parents=[shared], help="check this host against what ximd needs")
    add_format(doctor)
    plan = sub.add_parser("plan", parents=[shared], help="show the engine settings ximd would choose, and why")
    add_format(plan)

    model = sub.add_parser("model", help="fetch, list, remove or import models in the cache")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    pull = model_sub.add_parser("pull", parents=[shared], help="download a model completely into the cache",
                                description="Download MODEL (default: the model the daemon would serve) "
                                            "into the model cache, checked against the hub's checksums. "
                                            "Works before enrollment; resumes an interrupted download.")
    pull.add_argument("model", nargs="?", metavar="MODEL", help="a Hugging Face id (org/name)")
    listing = model_sub.add_parser("list", parents=[shared], help="the cached models, sizes, state and use")
    add_format(listing)
    rm = model_sub.add_parser("rm", parents=[shared], help="remove a model from the cache (not the one in use)")
    rm.add_argument("model", metavar="MODEL")
    imp = model_sub.add_parser("import", parents=[shared], help="install a model copied from another machine",
                               description="Check and install a model without the hub: a hub cache entry "
                                           "(models--org--name/, or an id found in this host's Hugging Face "
                                           "cache) or a model directory given an id with --as.")
    imp.add_argument("source", metavar="DIR|MODEL_ID")
    imp.add_argument("--as", dest="as_id", metavar="ORG/NAME", help="the id to serve a model directory under")

    cfg = sub.add_parser("config", help="show or validate configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = cfg_sub.add_parser("show", parents=[shared], help="print the effective configuration")
    show.add_argument("--origin", action="store_true", help="say where each value came from")
    add_format(show, "TOML; 'toml' is accepted too")
    validate = cfg_sub.add_parser("validate", help="check a config file (and its .d/ drop-ins)")
    validate.add_argument("path", nargs="?", help=f"default {configmod.DEFAULT_CONFIG_PATH}")
    return parser


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from ximd.agent import run_daemon
    return run_daemon(lambda: load_config(args))


def cmd_config_show(args: argparse.Namespace) -> int:
    return config_cmd.show(load_config(args), origin=args.origin, fmt=args.format)


def cmd_config_validate(args: argparse.Namespace) -> int:
    return config_cmd.validate(args.path)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from ximd.commands import status
    return status.main(cfg, args.format)


def cmd_reexec(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from ximd.commands import reexec
    return reexec.main(cfg, wait=not args.no_wait, timeout_s=args.timeout)


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from ximd.commands import doctor
    return doctor.main(cfg, args.format)


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from ximd.commands import plan
    return plan.main(cfg, args.format)


def cmd_enroll(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from ximd.commands import enroll
    setup_logging(cfg.agent.log_level)
    return asyncio.run(enroll.main_enroll(cfg, join_key_file=args.join_key_file, force=args.force))


def cmd_unenroll(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from ximd.commands import enroll
    setup_logging(cfg.agent.log_level)
    return asyncio.run(enroll.main_unenroll(cfg))


def cmd_model(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from ximd.commands import model
    setup_logging(cfg.agent.log_level)
    if args.model_command == "pull":
        return model.pull(cfg, args.model)
    if args.model_command == "list":
        return model.list_models(cfg, args.format)
    if args.model_command == "rm":
        return model.remove(cfg, args.model)
    return model.import_model(cfg, args.source, args.as_id)


COMMANDS = {
    ("run", None): cmd_run,
    ("enroll", None): cmd_enroll,
    ("unenroll", None): cmd_unenroll,
    ("status", None): cmd_status,
    ("reexec", None): cmd_reexec,
    ("doctor", None): cmd_doctor,
    ("plan", None): cmd_plan,
    ("model", "pull"): cmd_model,
    ("model", "list"): cmd_model,
    ("model", "rm"): cmd_model,
    ("model", "import"): cmd_model,
    ("config", "show"): cmd_config_show,
    ("config", "validate"): cmd_config_validate,
}


def command_name(args: argparse.Namespace) -> str:
    """The command as typed, for messages: "status", "config show"."""
    sub = getattr(args, "config_command", None) or getattr(args, "model_command", None)
    return f"{args.command} {sub}" if sub else args.command


def dispatch(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    handler = COMMANDS[(args.command, getattr(args, "config_command", None) or getattr(args, "model_command", None))]
    try:
        return handler(args)
    except ConfigError as exc:
        return config_cmd.invalid(exc, command_name(args))
    except KeyboardInterrupt:
        return EX_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    # `ximd … | head`: the reader leaving ends the command quietly, as it ends coreutils.
    return quiet_on_closed_stdout(lambda: dispatch(argv), EX_PIPE)


if __name__ == "__main__":
    sys.exit(main())
