"""What both programs' commands share in how they print: format names, timestamps, a closed pipe.

The command layers (ximd/cli.py, ximd/commands/, xim_router/cli.py) print; this
module only names and converts, so that `ximd` and `xim-router` spell `--format`
alike, write every JSON timestamp in RFC 3339 UTC, and end alike when the reader
of their standard output goes away (`… | head`).
"""

from __future__ import annotations

import datetime
import os
import select
import sys
import time
from collections.abc import Callable

# `--format` on every command of both programs: human text, or JSON for scripts.
FORMATS = ("text", "json")
# Spellings that were accepted before the names were made one: `xim-router agents
# --format table` and `ximd config show --format toml` (its text is TOML) keep working.
FORMAT_ALIASES = {"table": "text", "toml": "text"}


def format_name(text: str) -> str:
    """A `--format` value in its one spelling (an unknown one is returned as given, to be refused)."""
    lowered = text.strip().lower()
    return FORMAT_ALIASES.get(lowered, lowered)


def rfc3339(epoch: float | None) -> str | None:
    """A moment as JSON shows it: RFC 3339 in UTC, whole seconds ("2026-11-30T10:00:00Z"); None stays None."""
    if not epoch:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_rfc3339(text: str) -> float:
    """The epoch of an RFC 3339 timestamp (what `rfc3339` writes, or any offset); ValueError otherwise."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def local_text(epoch: float) -> str:
    """A moment as text output shows it: the reader's local time, with its zone."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def stdout_reader_gone() -> bool:
    """Whether standard output is a pipe (or socket) whose reader has closed it.

    A BrokenPipeError can come from any socket a command writes to; only one that
    means "stdout's reader went away" is the quiet end of `… | head`.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, 0)          # POLLERR and POLLHUP are always reported
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def silence_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's last flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def quiet_on_closed_stdout(command: Callable[[], int], status: int) -> int:
    """Run a command to its end; when its reader has closed standard output, end quietly with `status`.

    Standard output is flushed here, inside the guard, so a reader that left after the
    last write is noticed too (not by the interpreter's own flush at exit, which would
    print "Exception ignored" and return 120). `--help` and `--version` (SystemExit)
    pass through the same guard.
    """
    try:
        try:
            return command()
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        silence_stdout()
        return status
