"""Which systemd client library ximd talks to systemd through, chosen in one place.

python-systemd (Debian and Fedora: python3-systemd) is libsystemd's own client and
what the packaged daemon uses: `systemd.journal.send` writes entries of any size
(a record too big for one datagram goes through a sealed memfd), and
`systemd.daemon.notify` is sd_notify(3). It needs a compiler and libsystemd's
headers to pip-install, so a pip install without them takes sdnotify, a pure-Python
notifier (the `sdnotify` extra); the journal then gets stderr lines through the
unit's stream instead of native entries (ximd.logs).

Both senders keep the rule the daemon relies on: a notification never blocks.
libsystemd sends on a blocking socket, and python-systemd holds the GIL while it
does, so a full notification queue would freeze every thread of the daemon,
watchdog included; the queue is therefore checked for room first and the line
dropped when there is none, as sdnotify's socket (made non-blocking) drops it.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import select
import socket
from typing import Any, Protocol

LIBSYSTEMD = "python-systemd"
SDNOTIFY = "sdnotify"
# In order of preference: libsystemd's client where it is installed.
BACKENDS = (LIBSYSTEMD, SDNOTIFY)
_MODULES = {LIBSYSTEMD: "systemd.daemon", SDNOTIFY: "sdnotify"}


def installed(backend: str) -> bool:
    try:
        return importlib.util.find_spec(_MODULES[backend]) is not None
    except ModuleNotFoundError:       # "systemd" itself missing, for "systemd.daemon"
        return False


def choose(prefer: str | None = None) -> str | None:
    """The notification back-end to use: `prefer` when given and installed, else the first installed."""
    if prefer is not None:
        if prefer not in _MODULES:
            raise ValueError(f"unknown sd_notify back-end {prefer!r}; known: {', '.join(BACKENDS)}")
        return prefer if installed(prefer) else None
    return next((name for name in BACKENDS if installed(name)), None)


def journal_sender() -> Any | None:
    """`systemd.journal.send`, or None where python-systemd is not installed."""
    if not installed(LIBSYSTEMD):
        return None
    return _library("systemd.journal").send


class Sender(Protocol):
    name: str

    def send(self, text: str) -> None:
        """Deliver one notification now or raise OSError (BlockingIOError when the queue is full)."""

    def close(self) -> None: ...


def sender(backend: str, address: str) -> Sender:
    """A sender to `address`, which must be this process's $NOTIFY_SOCKET (both libraries read it there)."""
    if backend == LIBSYSTEMD:
        return LibsystemdSender(address)
    if backend == SDNOTIFY:
        return SdnotifySender(address)
    raise ValueError(f"unknown sd_notify back-end {backend!r}")


class LibsystemdSender:
    name = LIBSYSTEMD

    def __init__(self, address: str):
        self.address = address
        self._notify = _library("systemd.daemon").notify

    def send(self, text: str) -> None:
        require_room(self.address)
        if not self._notify(text):
            raise OSError(errno.ENOTCONN, "NOTIFY_SOCKET is not set in this process's environment")

    def close(self) -> None:
        pass


class SdnotifySender:
    name = SDNOTIFY

    def __init__(self, address: str):
        self.address = address
        self._notifier: Any = None

    def send(self, text: str) -> None:
        if self._notifier is None:
            sdnotify = _library("sdnotify")
            # debug=True: raise instead of swallowing, so a vanished socket is said once.
            notifier = sdnotify.SystemdNotifier(debug=True)
            notifier.socket.setblocking(False)
            self._notifier = notifier
        try:
            # sdnotify encodes as Latin-1; handing it the UTF-8 bytes as Latin-1 text sends
            # them unchanged, so a STATUS line with "→" or "…" arrives as systemd reads it.
            self._notifier.notify(text.encode("utf-8").decode("latin-1"))
        except OSError:
            self.close()              # reconnect next time: the manager may have re-executed
            raise

    def close(self) -> None:
        if self._notifier is not None:
            if self._notifier.socket is not None:
                self._notifier.socket.close()
            self._notifier = None


def _library(module: str) -> Any:
    # By name: this repository's own systemd/ folder (unit files) would otherwise look
    # like the "systemd" package to a type checker run from its root.
    return importlib.import_module(module)


def require_room(address: str) -> None:
    """Raise unless the datagram socket at `address` can take one more message now.

    A connected AF_UNIX datagram socket polls writable only while its peer's
    receive queue has room, which is exactly when a send would not block.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        probe.connect(sockaddr(address))
        poller = select.poll()
        poller.register(probe, select.POLLOUT)
        if not any(events & select.POLLOUT for _, events in poller.poll(0)):
            raise BlockingIOError(errno.EAGAIN, "the service manager's notification queue is full")
    finally:
        probe.close()


def sockaddr(address: str) -> str | bytes:
    # "@name" is an abstract socket: a leading NUL on the wire.
    return b"\0" + address[1:].encode() if address.startswith("@") else address
