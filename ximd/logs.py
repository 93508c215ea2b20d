"""Logging: native journal entries under systemd, one readable line otherwise.

Under systemd, records go to journald's native socket with
SYSLOG_IDENTIFIER=ximd (ximd-engine for the engine's own output) and any
structured fields a caller passes as `extra={"fields": {"XIM_PHASE": ...}}`,
so `journalctl -u ximd XIM_PHASE=engine` works. By hand, stderr gets one
line per event.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping

TRACE = 5
NOTICE = 25
logging.addLevelName(TRACE, "TRACE")
logging.addLevelName(NOTICE, "NOTICE")

# The seed's spellings (and swift-log's) mapped onto Python levels.
LEVELS = {
    "trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "notice": NOTICE,
    "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

JOURNAL_SOCKET = "/run/systemd/journal/socket"
ENGINE_LOGGER = "ximd.engine"


def syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= NOTICE:
        return 5
    if levelno >= logging.INFO:
        return 6
    return 7


def identifier_for(logger_name: str) -> str:
    return "ximd-engine" if logger_name.startswith(ENGINE_LOGGER) else "ximd"


def journal_fields(record: logging.LogRecord, message: str) -> dict[str, str]:
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(syslog_priority(record.levelno)),
        "SYSLOG_IDENTIFIER": identifier_for(record.name),
        "CODE_FILE": record.pathname,
        "CODE_LINE": str(record.lineno),
        "CODE_FUNC": record.funcName,
        "LOGGER": record.name,
    }
    for key, value in (getattr(record, "fields", None) or {}).items():
        fields[key.upper()] = str(value)
    return fields


def encode_journal(fields: Mapping[str, str]) -> bytes:
    """journald's native datagram format (systemd.journal-fields(7) / native protocol)."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    def __init__(self, path: str = JOURNAL_SOCKET):
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self.sock.sendto(encode_journal(journal_fields(record, message)), self.path)
        except OSError:
            # Too large for one datagram, or journald restarting: keep the line.
            sys.stderr.write(f"<{syslog_priority(record.levelno)}>{record.getMessage()}\n")
        except Exception:
            self.handleError(record)


class LineFormatter(logging.Formatter):
    """`2026-11-27 10:30:00 info    ximd: message  XIM_PHASE=engine`"""

    def __init__(self, timestamps: bool = True):
        super().__init__("%(asctime)s " if timestamps else "", datefmt="%Y-%m-%d %H:%M:%S")
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        head = self.formatTime(record, self.datefmt) + " " if self.timestamps else ""
        fields = getattr(record, "fields", None) or {}
        tail = "".join(f"  {k}={v}" for k, v in fields.items())
        text = f"{head}{record.levelname.lower():<8} {identifier_for(record.name)}: {record.getMessage()}{tail}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not when set up
    (test runners and embedding programs swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def stderr_is_journal(env: Mapping[str, str]) -> bool:
    """True when stderr is connected to journald (JOURNAL_STREAM names it)."""
    stream = env.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def setup_logging(level: str, env: Mapping[str, str] | None = None) -> logging.Handler:
    env = os.environ if env is None else env
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if stderr_is_journal(env) and os.path.exists(JOURNAL_SOCKET):
        handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = StderrHandler()
        # Under systemd without the native socket the journal stamps lines itself.
        handler.setFormatter(LineFormatter(timestamps="INVOCATION_ID" not in env))
    root.addHandler(handler)
    set_level(level)
    return handler


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS[level])
    # Library chatter (asyncio, aiohttp) stays at warning unless we trace.
    for noisy in ("asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if LEVELS[level] <= TRACE else logging.WARNING)


def phase_fields(phase: str, **more: str) -> dict:
    """`extra=` for a record with journal fields: XIM_PHASE plus any XIM_* given."""
    return {"fields": {"XIM_PHASE": phase, **more}}


def trace(logger: logging.Logger, msg: str, *args, **kwargs) -> None:
    logger.log(TRACE, msg, *args, **kwargs)
