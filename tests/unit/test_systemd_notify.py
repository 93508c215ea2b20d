"""sd_notify through both client libraries on a real AF_UNIX datagram socket, the
choice between them, and journal entries through libsystemd's own client."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.notify import NotifyReceiver
from xim_proto import codec
from ximd import group, logs, sdbackend
from ximd.systemd import Notifier, watchdog_usec_for_us

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=sdbackend.BACKENDS)
def backend(request):
    if not sdbackend.installed(request.param):
        pytest.skip(f"{request.param} is not installed")
    return request.param


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    rx = NotifyReceiver(tmp_path)
    for key, value in rx.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    yield rx
    rx.close()


def test_each_message_reaches_the_socket(receiver, backend):
    n = Notifier.from_env(backend)
    assert n.backend == backend
    n.ready("serving")
    n.status("loading tiny: 37 s")
    n.watchdog()
    n.extend_timeout(90)
    n.reloading()
    n.stopping("draining")
    n.status("re-executing ximd 0.1 → 0.2 … 😀")
    receiver.poll(0.3)
    got = [fields for _, fields in receiver.messages]
    assert got[0] == {"READY": "1", "STATUS": "serving", "MAINPID": str(os.getpid())}
    assert got[1] == {"STATUS": "loading tiny: 37 s"}
    assert got[2] == {"WATCHDOG": "1"}
    assert got[3] == {"EXTEND_TIMEOUT_USEC": "90000000"}
    assert got[4] == {"RELOADING": "1"}
    assert got[5] == {"STOPPING": "1", "STATUS": "draining"}
    assert got[6] == {"STATUS": "re-executing ximd 0.1 → 0.2 … 😀"}, "sent as UTF-8 by both libraries"


def test_a_status_line_from_a_peer_cannot_add_assignments(receiver, backend):
    """A hostile router's wait reason reaches STATUS= through the group part's line: a newline
    in it would be read by systemd as assignments of ximd's own (WATCHDOG=1 feeds a wedged
    daemon's watchdog, STOPPING=1, MAINPID=…)."""
    hostile = codec.decode(codec.encode(codec.Group(
        group="g", epoch=1, action=codec.GROUP_WAIT, model="m", tensor_parallel_size=2,
        pipeline_parallel_size=1, rank=1, size=2, reason="busy\nWATCHDOG=1\r\nSTOPPING=1")), sender=codec.ROUTER)
    part, _ = group.assign(None, hostile)
    assert part is not None
    n = Notifier.from_env(backend)
    n.status(group.status_line(part))
    n.ready(hostile.reason)
    n.stopping(hostile.reason)
    receiver.poll(0.3)
    got = [fields for _, fields in receiver.messages]
    assert [sorted(fields) for fields in got] == [["STATUS"], ["MAINPID", "READY", "STATUS"],
                                                 ["STATUS", "STOPPING"]], got
    assert got[0]["STATUS"] == "group g: rank 1 of 2, waiting: busy\\x0aWATCHDOG=1\\x0d\\x0aSTOPPING=1"


def test_abstract_socket_address(backend, monkeypatch):
    name = f"ximd-test-{os.getpid()}-{backend}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
    try:
        assert Notifier.from_env(backend).send("READY=1")
        server.settimeout(2)
        assert server.recv(100) == b"READY=1"
    finally:
        server.close()


def test_without_notify_socket_everything_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = Notifier.from_env()
    assert not n.enabled and n.send("READY=1") is False and n.watchdog_interval() is None


def test_vanished_socket_is_survivable(tmp_path, caplog, backend, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    n = Notifier.from_env(backend)
    with caplog.at_level(logging.WARNING):
        assert n.send("READY=1") is False
        assert n.send("READY=1") is False
    assert len([r for r in caplog.records if "cannot notify" in r.message]) == 1


FULL_QUEUE = """
import os, socket, sys
from ximd.systemd import Notifier
path = sys.argv[1]
manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
manager.bind(path)
filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
try:
    while True:
        filler.sendto(b"STATUS=filler", path)
except BlockingIOError:
    pass
os.environ["NOTIFY_SOCKET"] = path
n = Notifier.from_env(sys.argv[2])
full = n.send("WATCHDOG=1")
manager.recv(100)
print(full, n.send("WATCHDOG=1"))
"""


def test_a_full_queue_drops_the_line_and_never_blocks(tmp_path, backend):
    """python-systemd blocks holding the GIL when the manager's queue is full (the whole
    daemon would freeze, watchdog included): run it in a child that a hang cannot take down."""
    done = subprocess.run([sys.executable, "-c", FULL_QUEUE, str(tmp_path / "notify.sock"), backend],
                          capture_output=True, text=True, timeout=20, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"], "dropped while full, sent once there was room"


def test_the_chooser_prefers_libsystemd_and_falls_back_to_sdnotify(monkeypatch):
    if sdbackend.installed(sdbackend.LIBSYSTEMD):
        assert sdbackend.choose() == sdbackend.LIBSYSTEMD
    assert sdbackend.choose(sdbackend.SDNOTIFY) in (sdbackend.SDNOTIFY, None)
    with pytest.raises(ValueError, match="unknown sd_notify back-end"):
        sdbackend.choose("dbus")
    # A pip install without a compiler: no python-systemd at all.
    monkeypatch.setitem(sys.modules, "systemd", None)
    monkeypatch.setitem(sys.modules, "systemd.daemon", None)
    monkeypatch.setitem(sys.modules, "systemd.journal", None)
    assert not sdbackend.installed(sdbackend.LIBSYSTEMD)
    assert sdbackend.journal_sender() is None
    assert sdbackend.choose() == (sdbackend.SDNOTIFY if sdbackend.installed(sdbackend.SDNOTIFY) else None)


def test_without_either_library_the_notifier_says_so_once(monkeypatch, tmp_path, caplog):
    for name in ("systemd", "systemd.daemon", "sdnotify"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    with caplog.at_level(logging.ERROR):
        n = Notifier.from_env()
    assert not n.enabled and n.send("READY=1") is False
    assert "neither python-systemd nor sdnotify is installed" in caplog.text


def test_watchdog_pacing_is_half_the_timeout(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier.from_env().watchdog_interval() == 15.0


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


def journal_record(message: str, **fields: str) -> logging.LogRecord:
    try:
        raise RuntimeError("engine wedged")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("ximd.engine.test", logging.ERROR, __file__, 42, message, None, exc_info, "probe")
    record.fields = fields
    return record


def test_journal_handler_keeps_ximd_fields():
    sent = []
    handler = logs.JournalHandler(lambda message, **fields: sent.append((message, fields)))
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(journal_record("line one\nline two", XIM_REQUEST_ID="r-1", **{"xim-odd key": "v"}))
    (message, fields), = sent
    assert message.startswith("line one\nline two\nTraceback") and "RuntimeError: engine wedged" in message
    assert fields["PRIORITY"] == "3" and fields["SYSLOG_IDENTIFIER"] == "ximd-engine"
    assert fields["XIM_REQUEST_ID"] == "r-1" and fields["XIM_ODD_KEY"] == "v"
    assert fields["CODE_LINE"] == 42 and fields["CODE_FUNC"] == "probe" and fields["LOGGER"] == "ximd.engine.test"


@pytest.mark.parametrize("name,key", [("xim_phase", "XIM_PHASE"), ("_SYSTEMD_UNIT", "SYSTEMD_UNIT"),
                                      ("9lives", "X_9LIVES"), ("a.b-c", "A_B_C")])
def test_journal_keys_are_made_valid(name, key):
    assert logs.journal_key(name) == key


# libsystemd writes to this fixed path; the child gets a private /run/systemd to bind it in.
BIG_RECORD = """
import json, logging, os, socket, subprocess, sys
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run/systemd"], check=True)
os.mkdir("/run/systemd/journal")
journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
journald.bind("/run/systemd/journal/socket")
journald.settimeout(5)
from ximd import logs
handler = logs.JournalHandler()
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("ximd.probe")
log.addHandler(handler)
log.propagate = False
try:
    raise RuntimeError("engine wedged")
except RuntimeError:
    log.error("%s", "x" * int(sys.argv[1]), exc_info=True,
              extra={"fields": {"XIM_PHASE": "engine", "XIM_REQUEST_ID": "r-1"}})
data, ancdata, _, _ = journald.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 8))
fds = [int.from_bytes(d[i:i + 4], sys.byteorder) for level, kind, d in ancdata
       if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS for i in range(0, len(d), 4)]
payload = os.pread(fds[0], os.fstat(fds[0]).st_size, 0) if fds else data
with open(sys.argv[2], "wb") as out:
    out.write(payload)
print(json.dumps({"inline": len(data), "fds": len(fds)}))
"""


@pytest.mark.parametrize("size", [200_000, 9_000_000])
def test_a_big_record_with_a_traceback_arrives_whole(tmp_path, size):
    """200 kB is over a default socket's send buffer (the hand-written protocol lost such
    a record's traceback and fields); libsystemd widens its buffer, and past that (8 MiB)
    hands journald a sealed memfd (SCM_RIGHTS) holding the whole entry."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or not Path("/run/systemd").is_dir():
        pytest.skip("needs root, unshare and /run/systemd for a private journal socket")
    if not sdbackend.installed(sdbackend.LIBSYSTEMD):
        pytest.skip("python-systemd is not installed")
    entry = tmp_path / "entry"
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", BIG_RECORD,
                           str(size), str(entry)], capture_output=True, text=True, timeout=30, cwd=REPO)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no private mount namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    if size > 8 << 20:
        assert got["fds"] == 1 and got["inline"] == 0, "the entry travels in the memfd, not the datagram"
    fields = decode_journal(entry.read_bytes())
    assert fields["MESSAGE"].startswith("x" * size + "\nTraceback (most recent call last):")
    assert fields["MESSAGE"].rstrip().endswith("RuntimeError: engine wedged")
    assert fields["XIM_PHASE"] == "engine" and fields["XIM_REQUEST_ID"] == "r-1"
    assert fields["PRIORITY"] == "3" and fields["SYSLOG_IDENTIFIER"] == "ximd"


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
    # Without python-systemd the journal's stream reader takes the priority from the prefix.
    assert logs.LineFormatter(timestamps=False, priority_prefix=True).format(record) == "<6>" + line
