"""sd_notify on a real AF_UNIX datagram socket, and journald's native format."""

from __future__ import annotations

import logging
import os
import socket
import struct

import pytest

from tests.support.notify import NotifyReceiver
from ximd import logs
from ximd.systemd import Notifier, watchdog_usec_for_us


@pytest.fixture
def receiver(tmp_path):
    rx = NotifyReceiver(tmp_path)
    yield rx
    rx.close()


def test_each_message_reaches_the_socket(receiver):
    n = Notifier.from_env(receiver.env())
    n.ready("serving")
    n.status("loading tiny: 37 s")
    n.watchdog()
    n.extend_timeout(90)
    n.reloading()
    n.stopping("draining")
    receiver.poll(0.3)
    got = [fields for _, fields in receiver.messages]
    assert got[0] == {"READY": "1", "STATUS": "serving", "MAINPID": str(os.getpid())}
    assert got[1] == {"STATUS": "loading tiny: 37 s"}
    assert got[2] == {"WATCHDOG": "1"}
    assert got[3] == {"EXTEND_TIMEOUT_USEC": "90000000"}
    assert got[4] == {"RELOADING": "1"}
    assert got[5] == {"STOPPING": "1", "STATUS": "draining"}


def test_abstract_socket_address():
    name = f"ximd-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    try:
        assert Notifier(f"@{name}").send("READY=1")
        server.settimeout(2)
        assert server.recv(100) == b"READY=1"
    finally:
        server.close()


def test_without_notify_socket_everything_is_a_noop():
    n = Notifier.from_env({})
    assert not n.enabled and n.send("READY=1") is False and n.watchdog_interval() is None


def test_vanished_socket_is_survivable(tmp_path, caplog):
    n = Notifier(str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.WARNING):
        assert n.send("READY=1") is False
        assert n.send("READY=1") is False
    assert len([r for r in caplog.records if "cannot notify" in r.message]) == 1


def test_watchdog_pacing_is_half_the_timeout():
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0


def test_watchdog_usec_for_another_pid_is_ignored():
    assert watchdog_usec_for_us({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_usec_for_us({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid())}) == 1000
    assert watchdog_usec_for_us({"WATCHDOG_USEC": "0"}) is None


# ---------------------------------------------------------------- journal


def decode_journal(data: bytes) -> dict[str, str]:
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields[key.decode()] = value.decode()
            i = end + 1
        else:
            size = struct.unpack("<Q", data[end + 1:end + 9])[0]
            fields[line.decode()] = data[end + 9:end + 9 + size].decode()
            i = end + 9 + size + 1
    return fields


def test_journal_handler_sends_fields_to_a_real_socket(tmp_path):
    path = tmp_path / "journal.sock"
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.bind(str(path))
    journald.settimeout(2)
    handler = logs.JournalHandler(str(path))
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("ximd.engine.test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("line one\nline two", extra={"fields": {"XIM_REQUEST_ID": "r-1"}})
        fields = decode_journal(journald.recv(65536))
    finally:
        logger.removeHandler(handler)
        journald.close()
    assert fields["MESSAGE"] == "line one\nline two"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "ximd-engine"
    assert fields["XIM_REQUEST_ID"] == "r-1"


@pytest.mark.parametrize("level,priority", [("trace", 7), ("debug", 7), ("info", 6), ("notice", 5),
                                             ("warn", 4), ("warning", 4), ("error", 3), ("critical", 2)])
def test_seed_levels_map_to_syslog_priorities(level, priority):
    assert logs.syslog_priority(logs.LEVELS[level]) == priority


def test_trace_is_below_debug():
    assert logs.LEVELS["trace"] < logs.LEVELS["debug"]


def test_stderr_line_format():
    record = logging.LogRecord("ximd", logging.INFO, __file__, 1, "engine ready", None, None)
    record.fields = {"XIM_PHASE": "engine"}
    line = logs.LineFormatter(timestamps=False).format(record)
    assert line == "info     ximd: engine ready  XIM_PHASE=engine"
