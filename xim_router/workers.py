"""`xim-router serve --workers N`: the core's side of its HTTP worker processes.

With N ≥ 2 the router is N + 1 processes. The **core** (this process) keeps
everything it has with one: the store, the mesh (CurveZMQ, ZAP), choosing,
retries, holds and credit accounting (xim_router.dataplane), the enrollment
API, /health, /healthz, /version, /metrics and /v1/models. N **HTTP workers**
(xim_router.worker) listen on the ``--http`` address together (SO_REUSEPORT:
the kernel spreads the client connections over them) and do the per-token
HTTP work: TLS, request parsing, API keys, SSE writes. A worker serves the
completion endpoints itself and passes every other request to the core's own
HTTP app on a unix socket in a private directory (``core.sock``).

The channel (xim_router.ipc, one socketpair per worker) carries, as
``[kind, …]`` arrays:

- worker → core: ``ready`` (listening), ``open`` (a completion: local id,
  model, endpoint, body, stream), ``wrote`` (frames written to the client: the
  core grants credit), ``cancel`` (the client went away, the worker stops),
  ``count`` (the worker's /metrics counters, as requests end);
- core → worker: ``config`` (first), ``id`` (the request id, with the first
  answer), ``c`` (a chunk frame's payloads, the node's bytes), ``d`` (done),
  ``e`` (an error; without a request id: the request failed before any node
  took it), ``stop`` (drain and exit).

Once a request has its first answer the core stops waking for it: the mesh
hands each frame straight to the worker's channel (`dataplane.Exchange.forward`).

Workers are the core's children: started once the core is up (the core is
READY only when all of them listen), told to stop on SIGTERM and waited for
(their streams end as a single process's do), restarted with a growing pause
when one dies (its requests are cancelled on their nodes). A worker exits when
its channel ends: the core died (PR_SET_PDEATHSIG covers a core stopped before
the channel is read).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xim_proto import codec, eventloop
from xim_router import dataplane, metrics, openai_api
from xim_router.ipc import Channel
from xim_router.mesh import Router

log = logging.getLogger("xim_router.workers")

MAX_WORKERS = 64
AUTO_LIMIT = 4                # `auto`: one worker per core, at most this many (see docs/performance.md)
READY_TIMEOUT_S = 30.0        # a worker that does not listen by then fails the start
STOP_TIMEOUT_S = 25.0         # the unit's TimeoutStopSec= is 30 s: the core needs the rest
RESTART_PAUSE_S = (0.5, 30.0)  # the first pause before a restart, and the longest
STABLE_S = 60.0               # a worker that lived this long restarts after the first pause again
CLIENT_HEADER = "X-Xim-Worker-Client"   # the client's address, from a worker to the core's unix site
RUNTIME_ENV = "RUNTIME_DIRECTORY"        # systemd's RuntimeDirectory=, when the unit sets one


def parse_workers(text: str) -> int:
    """``--workers``: a count from 1 to MAX_WORKERS, or ``auto`` (a worker per usable core,
    at most AUTO_LIMIT; 1 on a single core). ValueError says what is accepted."""
    if text.strip().lower() == "auto":
        return max(1, min(len(os.sched_getaffinity(0)), AUTO_LIMIT))
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a number of workers (1 to {MAX_WORKERS}, or auto)") from None
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"--workers must be 1 to {MAX_WORKERS} (or auto), not {count}")
    return count


class WorkersError(Exception):
    """The workers cannot be set up (said in one line; server.StartupError wraps it)."""


def private_directory() -> Path:
    """A fresh directory only this user can enter, for the core's unix socket:
    under $RUNTIME_DIRECTORY when systemd gives one, else the temporary directory."""
    parent = os.environ.get(RUNTIME_ENV) or tempfile.gettempdir()
    try:
        path = Path(tempfile.mkdtemp(prefix="xim-router-", dir=parent))
    except OSError as exc:
        raise WorkersError(f"cannot create the workers' socket directory in {parent}: "
                           f"{exc.strerror or exc}") from None
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise WorkersError(f"{path} is not private to this user (mode {stat.S_IMODE(info.st_mode):o})")
    return path


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold ``host:port`` for the workers: a bound, never listening SO_REUSEPORT socket
    (the kernel gives connections only to listening ones). First checked without
    SO_REUSEPORT, so that another process of this user that shares ports cannot quietly
    take part of the traffic. OSError when the address is taken or cannot be bound."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.bind(address)
        address = probe.getsockname()
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs, sent over its channel (never on a command line: API keys)."""

    index: int
    host: str
    port: int
    core_socket: str
    api_keys: list[str]
    request_timeout_s: float
    credit_batch: int
    tls_cert: str | None
    tls_key: str | None
    log_level: str


class CoreCall:
    """One completion a worker brought: dataplane.start here, then forwarding."""

    def __init__(self, link: WorkerLink, local_id: int):
        self.link, self.local_id = link, local_id
        self.presence = dataplane.Presence()
        self.exchange: dataplane.Exchange | None = None
        self.task: asyncio.Task | None = None

    async def run(self, model: str, endpoint: str, body: bytes, stream: bool) -> None:
        pool, send, lid = self.link.pool, self.link.channel.send, self.local_id
        try:
            exchange, first = await dataplane.start(
                pool.router, pool.settings, model=model, endpoint=endpoint, body=body, stream=stream,
                presence=self.presence, holds=pool.holds)
        except dataplane.RequestFailed as exc:
            send("e", lid, None, exc.code, exc.message, exc.http_status, exc.retryable, exc.param)
            self._forget()
            return
        except dataplane.ClientGone:
            self._forget()
            return
        self.exchange = exchange
        if self.link.calls.get(lid) is not self:        # the worker went away meanwhile
            exchange.cancel("router worker gone")
            return
        send("id", lid, exchange.id)
        self.deliver(first, first=True)
        if not exchange.finished:
            exchange.forward(self.deliver)

    def deliver(self, msg: codec.Message, *, first: bool = False) -> None:
        """Pass an answer on: the first at once, the middle of a stream within 2 ms."""
        send, lid = self.link.channel.send, self.local_id
        if isinstance(msg, codec.Chunk):
            (send if first else self.link.channel.send_later)("c", lid, msg.data)
            return
        self._forget()
        if isinstance(msg, codec.Done):
            send("d", lid, msg.finish_reason, asdict(msg.usage) if msg.usage else None, msg.body)
        elif isinstance(msg, codec.Error):
            send("e", lid, msg.id, msg.code, msg.message, msg.http_status, msg.retryable, None)

    def _forget(self) -> None:
        """Drop this call from its link, and only this one: a worker restarted meanwhile
        numbers its calls afresh, and one of them may hold the same local id."""
        if self.link.calls.get(self.local_id) is self:
            del self.link.calls[self.local_id]

    def wrote(self, frames: int) -> None:
        if self.exchange is not None and not self.exchange.finished:
            self.exchange.written(frames)

    def cancel(self, reason: str) -> None:
        """The worker gave up on the request (its client went, it stops, it died)."""
        self._forget()
        if self.exchange is not None:
            self.exchange.cancel(reason)
        else:
            self.presence.mark_gone()           # still choosing or held: dataplane.start ends


class WorkerLink:
    """The core's end of one worker's channel: its process, its requests."""

    def __init__(self, pool: WorkerPool, index: int):
        self.pool, self.index = pool, index
        self.channel: Channel
        self.process: asyncio.subprocess.Process | None = None
        self.calls: dict[int, CoreCall] = {}
        self.ready = asyncio.Event()
        self.lost = asyncio.Event()
        self.requests = 0          # answered by this worker (its `count` messages)

    async def spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.channel = await Channel.connect(ours, self.on_message, self.on_lost)
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "xim_router.worker", str(theirs.fileno()), str(os.getpid()),
                eventloop.running_choice(),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        self.channel.send("config", asdict(self.pool.config_for(self.index)))

    def on_message(self, msg: list) -> None:
        kind = msg[0]
        if kind == "open":
            _, lid, model, endpoint, body, stream = msg
            call = self.calls[lid] = CoreCall(self, lid)
            call.task = asyncio.ensure_future(call.run(model, endpoint, body, stream))
        elif kind == "wrote":
            known = self.calls.get(msg[1])
            if known is not None:
                known.wrote(msg[2])
        elif kind == "cancel":
            known = self.calls.get(msg[1])
            if known is not None:
                known.cancel(msg[2])
        elif kind == "count":
            self.pool.count(self, msg[1:])
        elif kind == "ready":
            self.ready.set()
        else:
            log.warning("HTTP worker %d sent an unknown message %r", self.index, kind)

    def on_lost(self) -> None:
        for call in list(self.calls.values()):
            call.cancel("router worker gone")
        self.lost.set()


class WorkerPool:
    """N HTTP workers: started, supervised (restarted with backoff), stopped."""

    def __init__(self, count: int, router: Router, app: web.Application, *, host: str, port: int,
                 core_socket: Path, api: openai_api.ApiSettings,
                 tls: tuple[str | None, str | None], log_level: str):
        self.count_ = count
        self.router, self.app = router, app
        self.settings = api.dataplane
        self.holds: dataplane.Holds = app[openai_api.HOLDS_KEY]
        self.host, self.port, self.core_socket = host, port, core_socket
        self.api, self.tls, self.log_level = api, tls, log_level
        self.links: list[WorkerLink] = []
        self.restarts = 0
        self.stopping = False
        self._supervisors: list[asyncio.Task] = []
        registry_owner = metrics.metrics_of(app)
        self.metrics = registry_owner
        if registry_owner is not None:
            registry_owner.registry.register(WorkersCollector(self))

    def config_for(self, index: int) -> WorkerConfig:
        return WorkerConfig(index=index, host=self.host, port=self.port, core_socket=str(self.core_socket),
                            api_keys=sorted(self.api.api_keys),
                            request_timeout_s=self.settings.request_timeout_s,
                            credit_batch=self.settings.credit_batch, tls_cert=self.tls[0],
                            tls_key=self.tls[1], log_level=self.log_level)

    @property
    def running(self) -> int:
        return sum(1 for link in self.links if link.ready.is_set() and not link.lost.is_set())

    def pids(self) -> list[int]:
        return [link.process.pid for link in self.links if link.process is not None]

    async def start(self) -> None:
        """Start every worker and wait until all listen; WorkersError when one does not."""
        self.links = [WorkerLink(self, i) for i in range(self.count_)]
        for link in self.links:
            await link.spawn()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for link in self.links:
            ready = asyncio.ensure_future(link.ready.wait())
            lost = asyncio.ensure_future(link.lost.wait())
            await asyncio.wait((ready, lost), timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            lost.cancel()
            if not link.ready.is_set():
                why = "exited" if link.lost.is_set() else f"did not listen within {READY_TIMEOUT_S:g} s"
                await self.stop()
                raise WorkersError(f"HTTP worker {link.index} {why} (its messages are above)")
        self._supervisors = [asyncio.ensure_future(self._supervise(link)) for link in self.links]

    async def _supervise(self, link: WorkerLink) -> None:
        pause = RESTART_PAUSE_S[0]
        while True:
            started = time.monotonic()
            assert link.process is not None
            status = await link.process.wait()
            await link.lost.wait()
            if self.stopping:
                return
            pause = RESTART_PAUSE_S[0] if time.monotonic() - started > STABLE_S else pause
            log.warning("HTTP worker %d (pid %d) exited with status %s; restarting it in %.1f s",
                        link.index, link.process.pid, status, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RESTART_PAUSE_S[1])
            if self.stopping:
                return
            link.ready.clear()
            link.lost.clear()
            self.restarts += 1
            try:
                await link.spawn()
            except OSError as exc:
                log.error("cannot restart HTTP worker %d: %s", link.index, exc)
                link.lost.set()
                continue
            assert link.process is not None
            log.info("HTTP worker %d restarted (pid %d); %d of %d running", link.index,
                     link.process.pid, self.running, len(self.links))

    async def stop(self) -> None:
        """Tell every worker to drain and exit; wait up to STOP_TIMEOUT_S, then kill."""
        self.stopping = True
        for link in self.links:
            if not link.lost.is_set():
                link.channel.send("stop")
        processes = [link.process for link in self.links if link.process is not None]
        waits = [asyncio.ensure_future(p.wait()) for p in processes]
        if waits:
            _, late = await asyncio.wait(waits, timeout=STOP_TIMEOUT_S)
            for proc in processes:
                if proc.returncode is None:
                    log.warning("HTTP worker pid %d did not stop in %g s; killing it", proc.pid,
                                STOP_TIMEOUT_S)
                    proc.kill()
            if late:
                await asyncio.wait(late)
        for task in self._supervisors:
            task.cancel()
        for link in self.links:
            link.channel.close()

    def count(self, link: WorkerLink, what: list) -> None:
        """A worker's /metrics counters, as its requests end."""
        app_metrics = self.metrics
        kind = what[0]
        if kind == "request":
            link.requests += 1
        if app_metrics is None:
            return
        if kind == "request":
            app_metrics.request_done(what[1], what[2])
        elif kind == "error":
            app_metrics.failed(what[1])
        elif kind == "usage":
            app_metrics.used(codec.Usage(prompt_tokens=what[1], completion_tokens=what[2],
                                         total_tokens=what[1] + what[2]))


class WorkersCollector(Collector):
    """/metrics: how many workers run, each one's answered requests, the restarts."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        pool = self.pool
        yield GaugeMetricFamily("xim_router_http_workers", "HTTP worker processes listening now "
                                "(--workers).", value=pool.running)
        yield CounterMetricFamily("xim_router_http_worker_restarts", "HTTP workers restarted after "
                                  "they died, since the start.", value=pool.restarts)
        answered = CounterMetricFamily("xim_router_http_worker_requests", "Completion requests each "
                                       "HTTP worker answered, since the start.", labels=("worker",))
        for link in pool.links:
            answered.add_metric((str(link.index),), link.requests)
        yield answered


@web.middleware
async def client_address(request: web.Request, handler):
    """On the core's private unix site: the client's address as its worker saw it."""
    remote = request.headers.get(CLIENT_HEADER)
    return await handler(request.clone(remote=remote) if remote else request)


def core_app_for_workers(app: web.Application) -> web.Application:
    """The listener app, made ready to be served to the workers on the unix socket."""
    app.middlewares.insert(0, client_address)
    return app
