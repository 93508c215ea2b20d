"""`ximd … | head` and `xim-router … | head`: a reader that goes away ends the command quietly.

Real pipes: the commands run as processes whose standard output is a pipe whose
reader is closed, or `head -1` in a shell. No traceback, and the status a shell
reports for coreutils in the same place (141 = 128 + SIGPIPE), or 0 when the whole
output fit into the pipe before head left.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xim_proto.cliout import quiet_on_closed_stdout, stdout_reader_gone
from ximd.exitcodes import EX_PIPE

REPO = Path(__file__).resolve().parents[2]


def program(name: str) -> list[str]:
    return [sys.executable, "-m", {"ximd": "ximd", "xim-router": "xim_router.cli"}[name]]


@pytest.fixture
def env(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nlog_level = \"info\"\n")
    return {**os.environ, "PYTHONPATH": str(REPO), "XEROTIER_AGENT_CONFIG": str(config),
            "XIM_ROUTER_STATE_DIR": str(tmp_path / "router")}


COMMANDS = [
    ("ximd", ["config", "show", "--origin"]),
    ("ximd", ["config", "show", "--format", "json"]),
    ("ximd", ["--help"]),
    ("ximd", ["--version"]),
    ("xim-router", ["agents"]),
    ("xim-router", ["join-key", "list", "--format", "json"]),
    ("xim-router", ["--help"]),
]


@pytest.mark.parametrize(("name", "argv"), COMMANDS)
def test_a_reader_gone_before_the_first_write(env, name, argv):
    read_end, write_end = os.pipe()
    os.close(read_end)                      # nobody will ever read: the first write fails with EPIPE
    try:
        done = subprocess.run([*program(name), *argv], stdout=write_end, stderr=subprocess.PIPE, env=env,
                              text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.stderr == "", done.stderr
    # argparse ignores a failed write of its own --help and --version text and exits 0.
    assert done.returncode == (0 if argv[0].startswith("--") else EX_PIPE)


@pytest.mark.parametrize(("name", "argv"), COMMANDS)
def test_piped_into_head(env, name, argv):
    command = " ".join([*program(name), *argv]) + " | head -1; echo \"status=${PIPESTATUS[0]}\" >&2"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=60)
    status = done.stderr.strip().splitlines()[-1]
    assert status in ("status=0", f"status={EX_PIPE}"), done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert len(done.stdout.splitlines()) == 1


def test_a_broken_pipe_that_is_not_stdout_is_not_swallowed(capfd):
    def command() -> int:
        raise BrokenPipeError("a socket's peer went away")
    assert not stdout_reader_gone()
    with pytest.raises(BrokenPipeError):
        quiet_on_closed_stdout(command, EX_PIPE)
