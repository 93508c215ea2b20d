"""The man pages and shell completions: current with the parsers, rendered cleanly, completing what ximd accepts.

tools/cli_docs.py writes them under share/ from the argparse parsers and the
config schema; the packages install them (packaging/debian, packaging/rpm).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tools import cli_docs

REPO = Path(__file__).resolve().parents[2]
# Every page under share/man, the generated ones and the hand-written xerotier-engine-install.8.
PAGES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "share" / "man").iterdir())


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: apt-get install {package} (tools/setup-host.sh)", pytrace=False)


def test_shipped_files_are_generated_from_the_parsers_and_the_schema():
    for relative, text in cli_docs.generated().items():
        assert (REPO / relative).read_text() == text, f"{relative}: regenerate with python tools/cli_docs.py"


def test_every_command_and_setting_is_documented():
    ximd_page = (REPO / "share/man/ximd.8").read_text()
    for cmd in cli_docs.walk(cli_docs.ximd_cli.build_parser()):
        if not cmd.subcommands:
            assert cli_docs.flag("ximd " + cmd.name) in ximd_page, cmd.name
    config_page = (REPO / "share/man/agent.toml.5").read_text()
    for name in cli_docs.configmod.SCHEMA:
        assert f"\\fB{cli_docs.roff(name.split('.', 1)[1])}\\fR = " in config_page, name
    assert "\\fB77\\fR" in ximd_page and "EX_NOPERM" in ximd_page


@pytest.mark.parametrize("page", PAGES)
def test_groff_renders_the_page_without_a_warning(page):
    need("groff", "groff-base")
    done = subprocess.run(["groff", "-man", "-ww", "-Tutf8", "-z", str(REPO / page)], capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C.UTF-8"}, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_man_reads_the_page_as_lintian_does(page):
    need("man", "man-db")
    # lintian's groff-message check: man --warnings, output thrown away, stderr must stay empty.
    done = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(REPO / page)],
                          capture_output=True, text=True, env={**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80"},
                          timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


def bash_complete(*words: str) -> list[str]:
    """What bash offers for the last word, with the shipped completion sourced."""
    script = (f"source {REPO}/share/bash-completion/ximd; source {REPO}/share/bash-completion/xim-router\n"
              'COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()\n'
              '_${1//-/_}; printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "--norc", "-c", script, "complete", *words], capture_output=True, text=True,
                          cwd=REPO, timeout=30)
    assert done.stderr == ""
    return done.stdout.split()


@pytest.mark.parametrize(("words", "offered"), [
    (["ximd", "mo"], ["model"]),
    (["ximd", "model", ""], ["pull", "list", "rm", "import"]),
    (["ximd", "model", "list", "--fo"], ["--format"]),
    (["ximd", "status", "--format", ""], ["text", "json"]),
    (["ximd", "config", "show", "--origin", "--format", "j"], ["json"]),
    (["ximd", "--version", "con"], ["config"]),
    (["xim-router", "ag"], ["agents"]),
    (["xim-router", "agents", "--format", ""], ["text", "json"]),
    (["xim-router", "join-key", "list", "--state-dir", "/tmp", "--format", ""], ["text", "json"]),
    (["xim-router", "join-key", "l"], ["list"]),
    (["xim-router", "serve", "--log-level", "w"], ["warning"]),
])
def test_bash_completes_what_the_parsers_accept(words, offered):
    assert bash_complete(*words) == offered


def test_bash_completes_a_path_option_with_files():
    assert "pyproject.toml" in bash_complete("ximd", "config", "show", "--config", "py")


def test_zsh_completion_offers_the_same_words():
    need("zsh", "zsh")
    stubs = ('compadd() { [[ $1 == -- ]] && shift; print -r -- "${(j: :)@}"; }\n'
             '_files() { print -r -- "<files>"; }\n')
    for words, offered in [(["ximd", "model", ""], "pull list rm import"),
                           (["ximd", "status", "--format", ""], "text json"),
                           (["ximd", "config", "show", "--config", ""], "<files>"),
                           (["xim-router", "agents", "--format", ""], "text json")]:
        prog = words[0]
        script = stubs + f"source {REPO}/share/zsh/_{prog} >/dev/null\nwords=(\"$@\"); CURRENT=${{#words}}; _{prog.replace('-', '_')}"
        done = subprocess.run(["zsh", "-f", "-c", script, "complete", *words], capture_output=True, text=True, timeout=30)
        assert (done.stdout.strip(), done.stderr) == (offered, ""), words
