"""What both programs' command lines have in common: `--format`, `--version`, JSON timestamps."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from xim_proto import __version__
from xim_proto.cliout import FORMATS, format_name, from_rfc3339, local_text, rfc3339
from xim_router import cli as router_cli
from xim_router import store as store_mod
from ximd import cli as ximd_cli
from ximd.commands.status import render_status

RFC3339_UTC = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"


def format_options(parser: argparse.ArgumentParser, path: str = ""):
    """(command path, the --format action) for every command of a parser, subcommands included."""
    for action in parser._actions:
        if "--format" in action.option_strings:
            yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from format_options(sub, f"{path} {name}".strip())


@pytest.mark.parametrize("parser", [ximd_cli.build_parser(), router_cli.build_parser()], ids=["ximd", "xim-router"])
def test_every_format_option_is_spelled_alike(parser):
    found = list(format_options(parser))
    assert found, "no --format option found"
    for path, action in found:
        assert (tuple(action.choices), action.default) == (FORMATS, "text"), path


@pytest.mark.parametrize(("argv", "expected"), [
    (["agents", "--format", "table"], "text"),        # the router's old spelling
    (["agents", "--format", "json"], "json"),
    (["join-key", "list", "--format", "TABLE"], "text"),
])
def test_router_keeps_the_old_spelling(argv, expected):
    assert router_cli.build_parser().parse_args(argv).format == expected


def test_config_show_keeps_toml_as_a_spelling_of_text():
    assert ximd_cli.build_parser().parse_args(["config", "show", "--format", "toml"]).format == "text"
    assert format_name("Table") == "text"


def test_an_unknown_format_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        router_cli.build_parser().parse_args(["agents", "--format", "yaml"])
    assert info.value.code == 2 and "invalid choice: 'yaml'" in capsys.readouterr().err


@pytest.mark.parametrize(("main", "name"), [(router_cli.main, "xim-router"), (ximd_cli.main, "ximd")])
def test_version(main, name, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"{name} {__version__}"


def test_rfc3339_is_utc_with_a_z():
    assert rfc3339(1_796_032_800) == "2026-11-30T10:00:00Z"
    assert rfc3339(0) is None and rfc3339(None) is None
    assert from_rfc3339("2026-11-30T10:00:00Z") == 1_796_032_800
    assert from_rfc3339("2026-11-30T11:00:00+01:00") == 1_796_032_800


def test_status_text_shows_the_daemons_utc_moments_in_local_time(monkeypatch):
    reply = {"phase": "serving", "enrollment": {"enrolled_at": "2026-11-30T10:00:00Z", "token_expires_at": None},
             "reexec": {"requested_at": "2026-11-30 10:00:00 UTC"}}     # an older daemon's text stays as it is
    text = render_status(reply)
    assert f"enrolled_at: {local_text(1_796_032_800)}" in text
    assert "token_expires_at: -" in text
    assert "requested_at: 2026-11-30 10:00:00 UTC" in text


def test_router_json_moments_are_rfc3339_utc(tmp_path, capsys):
    store = store_mod.Store(tmp_path / "state")
    try:
        store.create_join_key(ttl_s=3600, uses=1, model=None, allowed_models=None, max_concurrent_ceiling=None)
    finally:
        store.close()
    assert router_cli.main(["join-key", "list", "--state-dir", str(tmp_path / "state"), "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert set(row) >= {"created_at", "expires_at"} and "expires" not in row
    for key in ("created_at", "expires_at"):
        assert row[key].endswith("Z") and abs(from_rfc3339(row[key]) - time.time()) < 3700
    assert router_cli.main(["join-key", "list", "--state-dir", str(tmp_path / "state")]) == 0
    assert "EXPIRES" in capsys.readouterr().out


def test_router_agent_rows_json(monkeypatch):
    row = {"agent_id": "a", "enrolled_at": 1_796_032_800.5, "state_since": 1_796_032_800.0, "last_seen_at": None,
           "last_seen_ago_s": 3.0}
    [shown] = json.loads(router_cli.json_rows([row]))
    assert shown == {"agent_id": "a", "enrolled_at": "2026-11-30T10:00:00Z", "state_since": "2026-11-30T10:00:00Z",
                     "last_seen_at": None, "last_seen_ago_s": 3.0}
