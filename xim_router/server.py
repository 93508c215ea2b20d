"""`xim-router serve`: the store, the mesh and the HTTP app, started and stopped together.

The flags, and the line that announces where the router listens, are
xim_router.cli's; `start` returns what it bound.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import zmq
from aiohttp import web

from xim_router import enroll_api, keys, notify, openai_api, workers
from xim_router import store as store_mod
from xim_router.http import build_app
from xim_router.mesh import Router, RouterSettings

log = logging.getLogger("xim_router")


class StartupError(Exception):
    """Something the operator must fix before the router can start (said in one line)."""


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise StartupError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
    return context


@dataclass(frozen=True)
class ServeOptions:
    """Everything `start` needs, as values (the CLI builds it from the flags)."""

    state_dir: Path
    http: tuple[str, int]                    # host, port (0 = any free)
    mesh: str                                # tcp://HOST:PORT to bind
    advertise: tuple[str, ...]               # mesh endpoints given to agents (empty: the bound one)
    settings: RouterSettings
    api: openai_api.ApiSettings
    ssl_context: ssl.SSLContext | None = None
    enroll_http: tuple[str, int] | None = None   # a separate enrollment listener; None = on `http`
    workers: int = 1                         # HTTP worker processes (xim_router.workers); 1: none
    tls_files: tuple[str | None, str | None] = (None, None)   # what ssl_context was made of (workers)
    log_level: str = "info"


@dataclass(frozen=True)
class Bound:
    """Where a started router listens (ports resolved): what `xim-router serve` announces."""

    http_url: str
    mesh_endpoint: str
    public_key: str
    state_dir: Path
    enroll_url: str = ""          # where nodes enroll: http_url unless --enroll-http


@dataclass
class Running:
    """A started router: where it listens, and what `serve_until_signalled` stops."""

    bound: Bound
    store: store_mod.Store
    router: Router
    runners: tuple[web.AppRunner, ...]
    pool: workers.WorkerPool | None = None
    reserved: socket.socket | None = None       # holds --http's port for the workers
    private_dir: Path | None = None             # the core's unix socket for them

    async def serve_until_signalled(self) -> int:
        """Serve until SIGTERM or SIGINT, then stop everything; the exit status."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("OpenAI API on %s, enrollment API on %s, mesh on %s", self.bound.http_url,
                 self.bound.enroll_url, self.bound.mesh_endpoint)
        if self.pool is not None:
            log.info("%d HTTP worker processes serve %s (pids %s)", len(self.pool.links),
                     self.bound.http_url, " ".join(map(str, self.pool.pids())))
        await stop.wait()
        log.info("stopping")
        notify.send("STOPPING=1", "STATUS=stopping")
        if self.pool is not None:
            await self.pool.stop()          # first: their streams end, their requests are cancelled
        await self._close()
        return 0

    async def _close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        await self.router.stop()
        self.store.close()
        if self.reserved is not None:
            self.reserved.close()
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)


async def start(options: ServeOptions) -> Running:
    """Open the store, bind the mesh and the HTTP app; StartupError says what is in the way."""
    state_dir = options.state_dir
    try:
        store = store_mod.Store(state_dir)
        keypair = keys.load_or_create_keypair(state_dir)
    except OSError as exc:
        raise StartupError(f"cannot use the state directory {state_dir}: {exc}") from None
    router = Router(store, keypair, mesh_bind=options.mesh, settings=options.settings,
                    advertise=options.advertise)
    try:
        await router.start()
    except zmq.ZMQError as exc:
        raise StartupError(f"cannot listen on {options.mesh}: {exc}") from None
    ssl_context = options.ssl_context
    if options.enroll_http is None:
        listeners = [(options.http, build_app(router))]
    else:
        listeners = [(options.http, build_app(router, (openai_api,))),
                     (options.enroll_http, build_app(router, (enroll_api,)))]
    openai_api.configure(listeners[0][1], options.api)
    if options.workers > 1:
        return await _start_with_workers(options, store, router, keypair.public, listeners)
    runners: list[web.AppRunner] = []
    urls: list[str] = []
    for (host, port), app in listeners:
        try:
            runner, url = await _listen(app, host, port, ssl_context)
        except StartupError:
            for started in runners:
                await started.cleanup()
            await router.stop()
            raise
        runners.append(runner)
        urls.append(url)
    bound = Bound(http_url=urls[0], mesh_endpoint=router.mesh_endpoint, public_key=keypair.public,
                  state_dir=state_dir, enroll_url=urls[-1])
    return Running(bound=bound, store=store, router=router, runners=tuple(runners))


async def _start_with_workers(options: ServeOptions, store: store_mod.Store, router: Router, public_key: str,
                              listeners: list[tuple[tuple[str, int], web.Application]]) -> Running:
    """The core of `--workers N`: the API listener's app on a private unix socket for the
    workers, which listen on --http together; a separate enrollment listener as always."""
    running = Running(bound=Bound("", "", "", options.state_dir), store=store, router=router, runners=())
    try:
        running.private_dir = workers.private_directory()
        core_socket = running.private_dir / "core.sock"
        (host, port), app = listeners[0]
        runner = web.AppRunner(workers.core_app_for_workers(app), access_log=None)
        await runner.setup()
        running.runners = (runner,)
        await web.UnixSite(runner, str(core_socket)).start()
        enroll_url = ""
        if len(listeners) > 1:
            enroll_runner, enroll_url = await _listen(listeners[1][1], *listeners[1][0], options.ssl_context)
            running.runners += (enroll_runner,)
        try:
            running.reserved = workers.reserve_port(host, port)
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound_host, bound_port = running.reserved.getsockname()[:2]
        running.pool = workers.WorkerPool(options.workers, router, app, host=bound_host, port=bound_port,
                                          core_socket=core_socket, api=options.api,
                                          tls=options.tls_files, log_level=options.log_level)
        await running.pool.start()
    except (StartupError, workers.WorkersError, OSError) as exc:
        if running.pool is not None:
            await running.pool.stop()
        await running._close()
        if isinstance(exc, StartupError):
            raise
        raise StartupError(str(exc)) from None
    scheme = "https" if options.ssl_context else "http"
    http_url = f"{scheme}://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
    running.bound = Bound(http_url=http_url, mesh_endpoint=router.mesh_endpoint, public_key=public_key,
                          state_dir=options.state_dir, enroll_url=enroll_url or http_url)
    return running


async def _listen(app: web.Application, host: str, port: int,
                  ssl_context: ssl.SSLContext | None) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on host:port; (its runner, its URL with the port resolved)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = runner.addresses[0][:2]
    scheme = "https" if ssl_context else "http"
    return runner, f"{scheme}://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
