"""The control socket: `ximd status` asks the running daemon.

A unix stream socket in the runtime directory (/run/ximd/control.sock), mode
0660, so root and the service's group can ask. One JSON request line, one
JSON reply line. Commands: ``status`` (read only) and ``reexec`` (replace the
daemon's program image in place, keeping the engine: ximd.reexec; it changes no
configuration and serves the same model, so the service's group may ask for it
like `systemctl reload`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
# The longest request line read; a longer one is answered with an error unread.
MAX_REQUEST = 4096
REQUEST_TIMEOUT_S = 5.0
COMMANDS = ("status", "reexec")
Handler = Callable[[], Awaitable[dict]]


def socket_path(runtime_dir: Path) -> Path:
    return runtime_dir / SOCKET_NAME


class ControlServer:
    """``handlers`` answer the commands (each a coroutine function returning the reply)."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]):
        self.path = path
        self.handlers = handlers
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # left by a killed predecessor; we hold the unit now
        # limit: readline() refuses a line longer than this instead of buffering it.
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path),
                                                       limit=MAX_REQUEST)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request line, one reply line. Whatever a client sends, it gets an answer
        and the daemon goes on: the socket is open to the whole service group."""
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=REQUEST_TIMEOUT_S)
            command = parse_request(line)
            if isinstance(command, BadRequest):
                reply = {"error": command.error}
            elif command in self.handlers:
                reply = await self.handlers[command]()
            else:
                reply = {"error": f"{command} is not available now"}
        except (TimeoutError, ConnectionError):
            reply = {"error": "no request"}
        except ValueError:              # readline(): no newline within MAX_REQUEST bytes
            reply = {"error": f"request longer than {MAX_REQUEST} bytes"}
        try:
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@dataclass(frozen=True)
class BadRequest:
    error: str


def parse_request(line: bytes) -> str | BadRequest:
    """The command a request line asks for (an empty line means status), or why not."""
    try:
        request = json.loads(line or b"{}")
    except (ValueError, RecursionError):      # RecursionError: nesting deeper than json allows
        return BadRequest("request is not JSON")
    if not isinstance(request, dict):
        return BadRequest("request is not a JSON object")
    command = request.get("command", "status")
    if command not in COMMANDS:
        shown = command[:40] if isinstance(command, str) else type(command).__name__
        return BadRequest(f"unknown command {shown!r} (known: {', '.join(COMMANDS)})")
    return str(command)


class NotRunning(Exception):
    pass


class NotPermitted(NotRunning):
    """The socket is there but this user may not connect to it (it is root's and the xerotier group's)."""


def query(path: Path, command: str = "status", timeout: float = 5.0) -> dict:
    """Ask the daemon; NotRunning says plainly when nobody answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"ximd is not running (no daemon answers on {path})") from exc
        except PermissionError as exc:
            raise NotPermitted(f"permission denied on {path}") from exc
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
