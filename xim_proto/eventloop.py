"""Which asyncio event loop a long-running program runs: uvloop when it is there, unless told.

ximd (``tuning.event_loop``, ``$XEROTIER_AGENT_EVENT_LOOP``) and the router
(``xim-router serve --event-loop``, router.toml's ``event_loop``) take the same
values:

- ``auto``: uvloop when it can be imported (Debian's and Fedora's python3-uvloop,
  ``pip install uvloop``), asyncio's own loop otherwise; the router's default;
- ``asyncio``: asyncio's own loop, uvloop or not; ximd's default;
- ``uvloop``: uvloop, and an error when it cannot be imported.

uvloop runs the same asyncio code with its loop in C (libuv): fewer CPU cycles
per wake-up and per socket read. One difference matters to ximd: uvloop makes a
burst of connects to a unix socket faster than the server accepts them, and a
connect that finds the listen backlog full fails (EAGAIN; under asyncio it fails
too, at the first write, but its slower connects did not get there in the same
runs): docs/performance.md, "uvloop".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

AUTO, ASYNCIO, UVLOOP = "auto", "asyncio", "uvloop"
CHOICES = (AUTO, ASYNCIO, UVLOOP)

T = TypeVar("T")


class EventLoopError(Exception):
    """The event loop asked for cannot run here (uvloop asked for and not installed)."""


@dataclass(frozen=True)
class EventLoop:
    """The loop chosen: its name as logged ("uvloop 0.17.0", "asyncio") and how to make one."""

    name: str
    factory: Callable[[], asyncio.AbstractEventLoop]

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """asyncio.run(main) on this loop."""
        with asyncio.Runner(loop_factory=self.factory) as runner:
            return runner.run(main)


def check(value: str) -> str:
    """``value`` as one of CHOICES (case and blanks aside); ValueError saying what is expected."""
    choice = value.strip().lower() if isinstance(value, str) else value
    if choice not in CHOICES:
        raise ValueError(f"{value!r} is not one of {', '.join(CHOICES)}")
    return choice


def choose(value: str) -> EventLoop:
    """The loop for the setting ``value``; ValueError for a value not in CHOICES,
    EventLoopError when ``uvloop`` is asked for and cannot be imported."""
    choice = check(value)
    # asyncio's own loop is SelectorEventLoop on Linux, named here rather than asked of the
    # event loop policy, which uvloop.install() replaces.
    if choice == ASYNCIO:
        return EventLoop(ASYNCIO, asyncio.SelectorEventLoop)
    try:
        import uvloop
    except ImportError as exc:
        if choice == UVLOOP:
            raise EventLoopError(f"event loop 'uvloop' asked for, but it cannot be imported ({exc}): "
                                 f"install python3-uvloop (or `pip install uvloop`), or set 'auto' or "
                                 f"'asyncio'") from None
        return EventLoop(ASYNCIO, asyncio.SelectorEventLoop)
    return EventLoop(f"uvloop {uvloop.__version__}", uvloop.new_event_loop)


def running_choice() -> str:
    """The setting that makes the loop this code runs on again (ASYNCIO or UVLOOP): what a
    process starts its children with, so that they run on the loop it was given."""
    return UVLOOP if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else ASYNCIO
