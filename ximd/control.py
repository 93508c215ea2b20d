"""The control socket: `ximd status` asks the running daemon.

A unix stream socket in the runtime directory (/run/ximd/control.sock), mode
0660, so root and the service's group can ask. One JSON request line, one
JSON reply line; nothing here can change the daemon's state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096


def socket_path(runtime_dir: Path) -> Path:
    return runtime_dir / SOCKET_NAME


class ControlServer:
    def __init__(self, path: Path, status: Callable[[], dict]):
        self.path = path
        self.status = status
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # left by a killed predecessor; we hold the unit now
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
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
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            reply = self._answer(line[:MAX_REQUEST])
        except (TimeoutError, ConnectionError):
            reply = {"error": "no request"}
        try:
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _answer(self, line: bytes) -> dict:
        try:
            request = json.loads(line or b"{}")
        except ValueError:
            return {"error": "request is not JSON"}
        if request.get("command", "status") != "status":
            return {"error": f"unknown command {request.get('command')!r}"}
        return self.status()


class NotRunning(Exception):
    pass


def query(path: Path, command: str = "status", timeout: float = 5.0) -> dict:
    """Ask the daemon; NotRunning says plainly when nobody answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"ximd is not running (no daemon answers on {path})") from exc
        except PermissionError as exc:
            raise NotRunning(f"permission denied on {path}: run as root or as a member of "
                             f"the xerotier group") from exc
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
