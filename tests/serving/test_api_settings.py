"""The OpenAI API's settings from `xim-router serve` flags (xim_router.cli), and what the operator sees when they are wrong."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from xim_router import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_api_arguments(parser)
    return parser.parse_args(argv)


def test_keys_come_from_flags_and_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsk-from-file\n\n  sk-second  \n")
    settings = cli.api_settings_from(parse("--api-key", "sk-flag", "--api-key-file", str(keys),
                                           "--request-timeout", "30"))
    assert settings.api_keys == {"sk-flag", "sk-from-file", "sk-second"}
    assert settings.dataplane.request_timeout_s == 30


def test_no_keys_means_no_check():
    assert cli.api_settings_from(parse()).api_keys == frozenset()


@pytest.mark.parametrize("content, problem", [(None, "cannot read the API key file"),
                                              ("# only a comment\n", "holds no key")])
def test_a_bad_key_file_is_a_clear_error(tmp_path, content, problem):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=problem):
        cli.api_settings_from(parse("--api-key-file", str(path)))


def test_a_non_positive_timeout_is_refused():
    with pytest.raises(ValueError, match="--request-timeout must be > 0"):
        cli.api_settings_from(parse("--request-timeout", "0"))


def test_xim_router_serve_refuses_a_missing_key_file_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "xim_router.cli", "serve", "--state-dir", str(tmp_path / "s"),
                           "--http", "127.0.0.1:0", "--mesh", "tcp://127.0.0.1:0",
                           "--api-key-file", str(tmp_path / "absent")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "cannot read the API key file" in done.stderr and "Traceback" not in done.stderr
