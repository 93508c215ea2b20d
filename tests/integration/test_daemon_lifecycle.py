"""`ximd run` as a real process: notify messages, signals, control socket, exit codes."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.support.daemon import Daemon
from ximd.agent import NOT_ENROLLED_HINT
from ximd.exitcodes import EX_CONFIG


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.stop()


def test_not_enrolled_is_ready_and_says_what_to_do(daemon):
    daemon.start()
    daemon.notify.wait_for("READY", "1")
    status = daemon.notify.wait_for("STATUS", NOT_ENROLLED_HINT)["STATUS"]
    assert "join key" in status and "systemctl reload ximd" in status
    daemon.wait_for_log("not enrolled")
    time.sleep(2)
    assert daemon.log().count("not enrolled: put a join key") == 1, "logged once, not in a loop"


def test_watchdog_is_paced_at_half_the_interval_or_faster(daemon):
    daemon.start()
    daemon.notify.wait_for("READY", "1")
    daemon.notify.poll(3.5)
    pings = daemon.notify.times_of("WATCHDOG")
    assert len(pings) >= 3
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) <= 1.0 + 0.3, gaps  # WATCHDOG_USEC=2 s → at most every 1 s


def test_sigterm_sends_stopping_and_exits_0_within_2s(daemon):
    daemon.start()
    daemon.notify.wait_for("READY", "1")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=2) == 0
    assert time.monotonic() - started < 2
    daemon.notify.wait_for("STOPPING", "1", timeout=1)
    assert not (daemon.runtime_dir / "control.sock").exists()


def test_status_over_the_control_socket(daemon):
    daemon.start()
    daemon.notify.wait_for("READY", "1")
    result = daemon.cli("status", "--format", "json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["phase"] == "not-enrolled" and reply["pid"] == daemon.proc.pid


def test_status_when_not_running_says_so_plainly(daemon):
    result = daemon.cli("status")
    assert result.returncode == 3
    assert "ximd is not running" in result.stderr and "Traceback" not in result.stderr


def test_sighup_applies_log_level_live(daemon):
    daemon.start()
    daemon.notify.wait_for("READY", "1")
    # Not enrolled yet: nothing runs, so every change applies to the coming start.
    daemon.config_path.write_text('[agent]\nlog_level = "debug"\n[engine]\nmax_model_len = 2048\n')
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("log level is now debug")
    daemon.wait_for_log("configuration reloaded (2 change(s))")
    assert "systemctl restart ximd` to take effect" not in daemon.log()
    daemon.notify.wait_for("RELOADING", "1")
    assert daemon.proc.poll() is None


def test_sighup_with_a_broken_config_keeps_running(daemon):
    daemon.start()
    daemon.notify.wait_for("READY", "1")
    daemon.config_path.write_text("[agent]\nlog_level = \n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("reload refused, keeping the running configuration")
    assert daemon.proc.poll() is None


def test_invalid_config_exits_78_with_file_and_key(tmp_path):
    d = Daemon(tmp_path, config="[engine]\ntensor_parallel_size = -1\n")
    try:
        d.start()
        assert d.wait(timeout=10) == EX_CONFIG
        assert f"{d.config_path}:2: engine.tensor_parallel_size" in d.log()
        assert "Traceback" not in d.log()
        d.notify.poll(0.2)
        assert any("invalid configuration" in f.get("STATUS", "") for _, f in d.notify.messages)
        assert not any("READY" in f for _, f in d.notify.messages)
    finally:
        d.stop()


def test_low_socket_buffer_limits_are_reported_not_fatal(daemon):
    # The host's real limits decide which line appears; both are checked.
    daemon.start()
    daemon.notify.wait_for("READY", "1")
    log = daemon.log()
    assert "kernel socket buffers OK" in log or "sudo sysctl -w" in log
