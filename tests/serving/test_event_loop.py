"""Both programs serve on either event loop: asyncio's own, and uvloop (xim_proto.eventloop).

The scenarios are test_daemon.py's with the stand-in engine: the OpenAI client
through router and ximd (sync and async, streamed and whole), the router
restarted under an open stream, and SIGTERM draining a stream (signals,
sd_notify, the engine child's end). Both logs say which loop ran.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.serving.test_daemon import (
    check_openai_client_sync_and_async,
    check_router_restart_mid_stream,
    check_sigterm_lets_the_stream_finish,
    standin_node,
)
from tests.support.daemon import Daemon
from tests.support.engine import short_tempdir
from ximd.exitcodes import EX_CONFIG

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
# (asked of both, what ximd logs, what the router logs)
LOOPS = [("asyncio", "asyncio", "asyncio"),
         pytest.param("uvloop", "uvloop", "uvloop",
                      marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")),
         # The defaults: ximd asyncio, the router auto (uvloop when installed).
         ("", "asyncio", "uvloop" if HAVE_UVLOOP else "asyncio")]


@pytest.mark.parametrize("asked, ximd_loop, router_loop", LOOPS)
def test_both_programs_serve_on_the_loop_asked_for(asked, ximd_loop, router_loop):
    with short_tempdir("xl-") as root:
        node = standin_node(root, event_loop=asked)
        try:
            node.start()
            assert f"event loop: {ximd_loop}" in node.daemon.log()
            assert f"event loop: {router_loop}" in node.router.log()
            check_openai_client_sync_and_async(node, tokens=6)
            check_router_restart_mid_stream(node, {"max_tokens": 400})
            check_sigterm_lets_the_stream_finish(node, {"max_tokens": 40}, tokens=40)
        finally:
            node.stop()


def test_ximd_asked_for_uvloop_without_it_exits_78(tmp_path):
    # A module named uvloop that cannot be imported, ahead of the installed one.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "uvloop.py").write_text("raise ImportError('no uvloop here')\n")
    d = Daemon(tmp_path, env={"XEROTIER_AGENT_EVENT_LOOP": "uvloop", "PYTHONPATH": str(shadow)})
    try:
        d.start()
        assert d.wait(timeout=20) == EX_CONFIG
        assert "not starting: event loop 'uvloop' asked for, but it cannot be imported (no uvloop here)" in d.log()
        assert "Traceback" not in d.log()
        d.notify.poll(0.2)
        assert any("invalid configuration" in f.get("STATUS", "") for _, f in d.notify.messages)
    finally:
        d.stop()

