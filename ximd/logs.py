"""Logging: native journal entries under systemd, one readable line otherwise.

Under systemd, records go to the journal through python-systemd
(`systemd.journal.send`, libsystemd's sd_journal_send: a record too big for one
datagram, a long traceback say, travels whole through a memfd) with
SYSLOG_IDENTIFIER=ximd (ximd-engine for the engine's own output) and any
structured fields a caller passes as `extra={"fields": {"XIM_PHASE": ...}}`,
so `journalctl -u ximd XIM_PHASE=engine` works. Without python-systemd (a pip
install without a compiler) the journal gets stderr lines with a `<priority>`
prefix through the unit's stream. By hand, stderr gets one line per event.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ximd import sdbackend

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


def journal_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Every field of the record's journal entry but MESSAGE, as `systemd.journal.send` takes them."""
    fields: dict[str, Any] = {
        "PRIORITY": str(syslog_priority(record.levelno)),
        "SYSLOG_IDENTIFIER": identifier_for(record.name),
        "CODE_FILE": record.pathname,
        "CODE_LINE": record.lineno,
        "CODE_FUNC": record.funcName,
        "LOGGER": record.name,
    }
    for key, value in (getattr(record, "fields", None) or {}).items():
        fields[journal_key(key)] = str(value)
    return fields


def journal_key(name: str) -> str:
    """A journal field name: upper-case letters, digits and `_`, not led by `_` or a digit.

    journald refuses a whole entry over one bad name, so a caller's key is made valid
    rather than trusted.
    """
    key = re.sub(r"[^A-Z0-9_]", "_", name.upper()).lstrip("_")
    return key if key and not key[0].isdigit() else f"X_{key}"


class JournalHandler(logging.Handler):
    """Native journal entries through python-systemd (`send` is `systemd.journal.send`)."""

    def __init__(self, send: Callable[..., Any] | None = None):
        super().__init__()
        send = send or sdbackend.journal_sender()
        if send is None:
            raise RuntimeError("python-systemd is not installed")
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self.send(message, **journal_fields(record))
        except OSError:
            # journald restarting: keep the line on stderr, which the unit's stream carries.
            sys.stderr.write(f"<{syslog_priority(record.levelno)}>{self.format(record)}\n")
        except Exception:
            self.handleError(record)


class LineFormatter(logging.Formatter):
    """`2026-11-27 10:30:00 info    ximd: message  XIM_PHASE=engine`"""

    def __init__(self, timestamps: bool = True, priority_prefix: bool = False):
        super().__init__("%(asctime)s " if timestamps else "", datefmt="%Y-%m-%d %H:%M:%S")
        self.timestamps = timestamps
        # `<4>` before the line: the journal's stream reader takes it as the entry's PRIORITY.
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        head = self.formatTime(record, self.datefmt) + " " if self.timestamps else ""
        if self.priority_prefix:
            head = f"<{syslog_priority(record.levelno)}>{head}"
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
    to_journal = stderr_is_journal(env)
    send = sdbackend.journal_sender() if to_journal and os.path.exists(JOURNAL_SOCKET) else None
    if send is not None:
        handler = JournalHandler(send)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = StderrHandler()
        # Under systemd without native entries the journal stamps lines itself and
        # takes each line's priority from its prefix.
        handler.setFormatter(LineFormatter(timestamps="INVOCATION_ID" not in env, priority_prefix=to_journal))
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
