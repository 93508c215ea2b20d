"""Finding 10: the control socket (`ximd status`) must answer garbage with an error.

A real `ximd run` daemon (not enrolled: it idles and serves its control socket);
a client on the socket sends what a confused or hostile local user may send. The
daemon answers each with an error line, logs no traceback, and still answers
`ximd status` afterwards.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.daemon import Daemon
from ximd.control import MAX_REQUEST, SOCKET_NAME


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    d.notify.wait_for("READY", "1")
    yield d
    d.stop()


def ask_raw(daemon: Daemon, payload: bytes, timeout_s: float = 30.0) -> bytes:
    """Send ``payload`` on the control socket, return everything the daemon answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(daemon.runtime_dir / SOCKET_NAME))
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass                          # the daemon stops reading an over-long line
        else:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass        # closed with our excess unread: the reply before it was read already
    return data


HOSTILE_REQUESTS = {
    "a JSON list": b"[1, 2, 3]\n",
    "a JSON string": b'"status"\n',
    "a JSON number": b"42\n",
    "JSON null": b"null\n",
    "a command that is not a string": b'{"command": ["status"]}\n',
    "an unknown command": b'{"command": "shutdown"}\n',
    "not JSON": b"\xff\xfe garbage\n",
    "deeply nested JSON within the limit": b"[" * 2000 + b"]" * 2000 + b"\n",
    "deeply nested JSON over the limit": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "a line longer than the limit": b'{"command": "' + b"x" * (MAX_REQUEST * 4) + b'"}\n',
    "a megabyte without a newline": b"x" * (1 << 20),
}


@pytest.mark.parametrize("payload", HOSTILE_REQUESTS.values(), ids=HOSTILE_REQUESTS.keys())
def test_hostile_request_gets_an_error_and_the_daemon_keeps_answering(daemon, payload):
    reply = ask_raw(daemon, payload)
    assert reply.endswith(b"\n"), f"no reply line; daemon log:\n{daemon.log()}"
    answer = json.loads(reply)
    assert isinstance(answer, dict) and isinstance(answer.get("error"), str), answer

    status = daemon.cli("status", "--format", "json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pid"] == daemon.proc.pid
    assert daemon.proc.poll() is None
    assert "Traceback" not in daemon.log(), daemon.log()


def test_status_request_still_works(daemon):
    answer = json.loads(ask_raw(daemon, b'{"command": "status"}\n'))
    assert answer["pid"] == daemon.proc.pid and "error" not in answer
