"""The event loop choice (xim_proto.eventloop), ximd's tuning.event_loop and the router's --event-loop."""

from __future__ import annotations

import asyncio
import sys

import pytest

from xim_proto import eventloop
from xim_router import cli as router_cli
from xim_router import config as router_config
from ximd.config import ConfigError, load


def loop_type_under(chosen: eventloop.EventLoop) -> str:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__
    return chosen.run(which())


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (" UVLoop ", "uvloop"), ("asyncio", "asyncio")])
def test_the_three_values_in_any_case(value, expected):
    assert eventloop.check(value) == expected


def test_a_bad_value_says_what_is_expected():
    with pytest.raises(ValueError, match=r"'tokio' is not one of auto, asyncio, uvloop"):
        eventloop.choose("tokio")


def test_asyncio_is_asyncio_even_with_uvloops_policy_set():
    uvloop = pytest.importorskip("uvloop")
    before = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())     # what uvloop.install() does
    try:
        chosen = eventloop.choose("asyncio")
        assert chosen.name == "asyncio"
        assert loop_type_under(chosen).startswith("asyncio")
    finally:
        asyncio.set_event_loop_policy(before)


def test_asyncio_without_uvloop_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert loop_type_under(eventloop.choose("asyncio")).startswith("asyncio")


def test_uvloop_and_auto_run_uvloop_when_it_is_installed():
    uvloop = pytest.importorskip("uvloop")
    for value in ("uvloop", "auto"):
        chosen = eventloop.choose(value)
        assert chosen.name == f"uvloop {uvloop.__version__}"
        assert loop_type_under(chosen).startswith("uvloop")


@pytest.mark.parametrize("value", ["asyncio", "uvloop"])
def test_a_child_is_told_the_loop_its_parent_runs(value):
    # xim-router's HTTP workers start with eventloop.running_choice(): the core's own loop.
    if value == "uvloop":
        pytest.importorskip("uvloop")

    async def told() -> str:
        return eventloop.running_choice()

    assert eventloop.choose(value).run(told()) == value


def test_without_uvloop_auto_falls_back_and_uvloop_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)          # import uvloop → ImportError
    assert eventloop.choose("auto").name == "asyncio"
    with pytest.raises(eventloop.EventLoopError, match=r"'uvloop' asked for, but it cannot be imported.*python3-uvloop"):
        eventloop.choose("uvloop")


def test_ximd_setting_from_file_and_environment(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[tuning]\nevent_loop = "asyncio"\n')
    assert load(path, env={}).tuning.event_loop == "asyncio"
    cfg = load(path, env={"XEROTIER_AGENT_EVENT_LOOP": "UVLOOP"})
    assert (cfg.tuning.event_loop, cfg.origins["tuning.event_loop"]) == ("uvloop", "env:XEROTIER_AGENT_EVENT_LOOP")
    path.write_text("")
    assert load(path, env={}).tuning.event_loop == "asyncio"      # ximd's default (the router's: auto)


def test_ximd_bad_value_names_the_source_and_the_choices(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load(path, env={"XEROTIER_AGENT_EVENT_LOOP": "fast"})
    [problem] = info.value.problems
    assert problem.key == "tuning.event_loop"
    assert "one of auto, asyncio, uvloop" in str(problem) and "XEROTIER_AGENT_EVENT_LOOP" in str(problem)


def test_router_flag_and_file(tmp_path, monkeypatch):
    monkeypatch.setattr(router_config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    monkeypatch.delenv(router_config.PATH_ENV, raising=False)
    assert router_cli.parse(["serve"]).event_loop == "auto"
    path = tmp_path / "router.toml"
    path.write_text('event_loop = "asyncio"\n')
    assert router_cli.parse(["serve", "--config", str(path)]).event_loop == "asyncio"
    assert router_cli.parse(["serve", "--config", str(path), "--event-loop", "uvloop"]).event_loop == "uvloop"
    path.write_text('event_loop = "fast"\n')
    with pytest.raises(router_config.ConfigError, match=r"router\.toml:1: event_loop: 'fast' is not one of auto, asyncio, uvloop"):
        router_cli.parse(["serve", "--config", str(path)])


def test_router_bad_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        router_cli.parse(["serve", "--event-loop", "fast"])
    assert info.value.code == 2
    assert "--event-loop: invalid choice: 'fast'" in capsys.readouterr().err


def test_router_without_uvloop_asked_for_it_exits_78(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvloop", None)
    monkeypatch.setattr(router_config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    monkeypatch.delenv(router_config.PATH_ENV, raising=False)
    monkeypatch.setattr(router_cli.logging, "basicConfig", lambda **kwargs: None)
    status = router_cli.main(["serve", "--state-dir", str(tmp_path / "state"), "--http", "127.0.0.1:0",
                              "--mesh", "tcp://127.0.0.1:0", "--event-loop", "uvloop"])
    assert status == router_config.EX_CONFIG
    assert "invalid configuration: event loop 'uvloop' asked for, but it cannot be imported" in capsys.readouterr().err
