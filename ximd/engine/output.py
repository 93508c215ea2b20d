"""The engine's stdout/stderr, forwarded to logging line by line without ever blocking.

The event loop only puts lines into a bounded queue; a thread of its own hands them to
logging (whose journal handler may block). If logging falls behind and the queue is
full, lines are dropped and counted, and the count is logged once logging catches up:
a slow journal must never stall the engine (its pipe would fill) or the event loop
(the watchdog would stop being fed).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections import deque

ENGINE_LOGGER = "ximd.engine"   # the journal handler gives it SYSLOG_IDENTIFIER=ximd-engine
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# vLLM: "INFO 11-27 10:30:00 [api_server.py:12] ..." or "(EngineCore pid=7) WARNING ...";
# LMCache: "[2026-11-27 10:30:00,123] LMCache ERROR: ...".
LEVEL_WORD = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\b")
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
          "WARN": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL,
          "FATAL": logging.CRITICAL}
LEVEL_SEARCH_CHARS = 80   # the level sits in the line's prefix; further in, it is just text


def clean_line(raw: bytes) -> str:
    return ANSI_ESCAPE.sub("", raw.decode("utf-8", "replace")).rstrip("\r\n")


def engine_log_level(line: str) -> int:
    """The level the engine gave the line, INFO when it gave none (tracebacks, prints)."""
    match = LEVEL_WORD.search(line[:LEVEL_SEARCH_CHARS])
    return LEVELS[match.group(1)] if match else logging.INFO


class OutputForwarder:
    """Bounded, non-blocking hand-off of engine output lines to logging."""

    def __init__(self, logger: logging.Logger | None = None, capacity: int = 4096, tail_lines: int = 40):
        self.logger = logger or logging.getLogger(ENGINE_LOGGER)
        self.dropped = 0                   # written by the event loop only
        self.tail: deque[str] = deque(maxlen=tail_lines)   # last lines, for error messages
        self._queue: queue.Queue[str] = queue.Queue(maxsize=capacity)
        self._reported = 0                 # written by the logging thread only
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="ximd-engine-output", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def offer(self, line: str) -> None:
        """Never blocks: a full queue drops the line and counts it."""
        self.tail.append(line)
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def forget_tail(self) -> None:
        """A new engine lifetime: its errors must not quote the previous one's output."""
        self.tail.clear()

    def last_lines(self, count: int = 12) -> list[str]:
        return [line for line in list(self.tail)[-count:] if line.strip()]

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop after what is queued has been logged (or after the timeout)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._closing.clear()

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._closing.is_set():
                    break
                continue
            self._report_drops()
            try:
                self.logger.log(engine_log_level(line), "%s", line)
            except Exception:  # a broken handler must not end the thread
                pass
        self._report_drops()

    def _report_drops(self) -> None:
        dropped = self.dropped
        if dropped > self._reported:
            self.logger.warning("Dropped %d engine output lines: logging could not keep up",
                                dropped - self._reported)
            self._reported = dropped
