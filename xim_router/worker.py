"""One HTTP worker of `xim-router serve --workers N` (xim_router.workers has the design).

Started by the core as ``python -m xim_router.worker FD CORE_PID``: FD is its end
of the channel (xim_router.ipc), whose first message is its configuration. It
listens on the shared ``--http`` address with SO_REUSEPORT and serves the
completion endpoints with xim_router.openai_api's own handlers, whose
`dataplane.start` is here `Worker.start`: the request runs in the core, and its
answers come back over the channel into a `RemoteExchange` (dataplane.Exchange's
interface: next, more_chunks, written, cancel, client_gone). Every other path
(enrollment, /health, /metrics, /v1/models…) is passed to the core's HTTP app
on its private unix socket, as it came.

It exits when told to stop (the core's ``stop``, SIGTERM, SIGINT: it drains as
a single router does) and when the channel ends (the core is gone: its
requests fail with a retryable error first).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
from typing import Any

import aiohttp
from aiohttp import web

from xim_proto import codec, eventloop
from xim_router import dataplane, metrics, openai_api
from xim_router.api_common import ROUTER_KEY, error_response, json_errors
from xim_router.http import MAX_BODY_BYTES, quiet_malformed_requests
from xim_router.ipc import Channel
from xim_router.server import StartupError, tls_context
from xim_router.workers import CLIENT_HEADER, WorkerConfig

log = logging.getLogger("xim_router.worker")

PR_SET_PDEATHSIG = 1
# Not passed on to the core: hop-by-hop headers (RFC 9110 §7.6.1) and what aiohttp
# sets itself; CLIENT_HEADER is the worker's to set.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length", CLIENT_HEADER.lower()})
NOT_RETURNED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date",
                          "server"})


class RemoteExchange(dataplane.Exchange):
    """A request that runs in the core: its answers arrive over the channel."""

    def __init__(self, worker: Worker, local_id: int, settings: dataplane.Settings):
        # Not Exchange.__init__: no mesh here, and the deadline is the core's.
        self.worker, self.local_id, self.settings = worker, local_id, settings
        self.id = ""                       # the core's request id, with its first answer
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self._written = 0
        self._held: object | None = None

    async def next(self) -> codec.Message:
        msg = self._held if self._held is not None else await self.queue.get()
        self._held = None
        if isinstance(msg, dataplane.RequestFailed):     # no node took it (raised by the core's start)
            self.finished = True
            self.close()
            raise msg
        self._held = msg
        return await super().next()

    def written(self, frames: int = 1) -> None:
        self._written += frames
        if self._written >= self.settings.credit_batch:
            n, self._written = self._written, 0
            self.worker.channel.send("wrote", self.local_id, n)

    def cancel(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.worker.channel.send("cancel", self.local_id, reason)
        self.close()

    def close(self) -> None:
        self.worker.calls.pop(self.local_id, None)


class Counts:
    """openai_api's /metrics counters (metrics.RouterMetrics' methods), counted by the core."""

    def __init__(self, channel: Channel):
        self.channel = channel

    def request_done(self, endpoint: str, status: int) -> None:
        self.channel.send("count", "request", endpoint, status)

    def failed(self, code: str) -> None:
        self.channel.send("count", "error", code)

    def used(self, usage: codec.Usage | None) -> None:
        if usage is not None:
            self.channel.send("count", "usage", usage.prompt_tokens, usage.completion_tokens)


class Worker:
    def __init__(self) -> None:
        self.channel: Channel
        self.calls: dict[int, RemoteExchange] = {}
        self.config: asyncio.Future[WorkerConfig] = asyncio.get_running_loop().create_future()
        self.stop = asyncio.Event()
        self.core_gone = False
        self._next_id = 0
        self.session: aiohttp.ClientSession | None = None
        self.settings = dataplane.Settings()

    # ---------------------------------------------------------------- the channel

    def on_message(self, msg: list) -> None:
        kind = msg[0]
        if kind == "c":
            exchange = self.calls.get(msg[1])
            if exchange is not None:
                exchange.queue.put_nowait(codec.Chunk(id=exchange.id, seq=0, data=msg[2]))
        elif kind == "id":
            exchange = self.calls.get(msg[1])
            if exchange is not None:
                exchange.id = msg[2]
        elif kind == "d":
            exchange = self.calls.get(msg[1])
            if exchange is not None:
                usage = codec.Usage(**msg[3]) if msg[3] else None
                exchange.queue.put_nowait(codec.Done(id=exchange.id, finish_reason=msg[2], usage=usage,
                                                     body=msg[4]))
        elif kind == "e":
            _, lid, rid, code, message, status, retryable, param = msg
            exchange = self.calls.get(lid)
            if exchange is not None:
                exchange.queue.put_nowait(
                    dataplane.RequestFailed(code, message, status, retryable, param) if rid is None else
                    codec.Error(code=code, message=message, retryable=retryable, http_status=status, id=rid))
        elif kind == "config":
            if not self.config.done():
                self.config.set_result(WorkerConfig(**msg[1]))
        elif kind == "stop":
            self.stop.set()

    def on_lost(self) -> None:
        """The core is gone: what runs here cannot finish."""
        self.core_gone = True
        for exchange in list(self.calls.values()):
            exchange.queue.put_nowait(codec.error_for(
                "agent_unavailable", "the router's core process ended; retry shortly",
                request_id=exchange.id))
        if not self.config.done():
            self.config.cancel()
        self.stop.set()

    async def start(self, router: object, settings: dataplane.Settings, *, model: str, endpoint: str,
                    body: bytes, stream: bool, presence: dataplane.Presence | None = None,
                    holds: object = None) -> tuple[dataplane.Exchange, codec.Message]:
        """dataplane.start, run by the core."""
        self._next_id += 1
        exchange = RemoteExchange(self, self._next_id, settings)
        self.calls[exchange.local_id] = exchange
        if self.core_gone:
            raise dataplane.RequestFailed("agent_unavailable", "the router's core process ended; "
                                                               "retry shortly", 503)
        self.channel.send("open", exchange.local_id, model, endpoint, body, stream)
        if presence is not None:
            presence.attach(exchange)
        try:
            return exchange, await exchange.next()
        except BaseException:
            exchange.cancel("router gave up")
            raise

    # ---------------------------------------------------------------- HTTP

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Any path but the completions: the core's own app answers it."""
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers[CLIENT_HEADER] = request.remote or ""
        assert self.session is not None
        try:
            async with self.session.request(request.method, "http://core" + request.rel_url.raw_path_qs,
                                            headers=headers, data=body, allow_redirects=False) as resp:
                data = await resp.read()
                out = [(k, v) for k, v in resp.headers.items() if k.lower() not in NOT_RETURNED]
        except aiohttp.ClientError as exc:
            return error_response(503, "unavailable", f"the router's core does not answer: {exc}")
        response = web.Response(status=resp.status, body=data)
        for key, value in out:
            response.headers.add(key, value)
        return response

    def app(self, config: WorkerConfig) -> web.Application:
        app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
        app[ROUTER_KEY] = self
        app[openai_api.START_KEY] = self.start
        app[metrics.METRICS_KEY] = Counts(self.channel)
        openai_api.add_completion_routes(app)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        self.settings = dataplane.Settings(request_timeout_s=config.request_timeout_s,
                                           credit_batch=config.credit_batch)
        openai_api.configure(app, openai_api.ApiSettings(api_keys=frozenset(config.api_keys),
                                                         dataplane=self.settings))
        return app

    async def run(self, sock: socket.socket) -> int:
        self.channel = await Channel.connect(sock, self.on_message, self.on_lost)
        try:
            config = await self.config
        except asyncio.CancelledError:
            return 1
        setup_logging(config)
        try:
            ssl_context = tls_context(config.tls_cert, config.tls_key)
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=config.core_socket),
                                             auto_decompress=False)
        runner = web.AppRunner(self.app(config), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context, reuse_port=True)
        try:
            await site.start()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
            await runner.cleanup()
            await self.session.close()
            return 1
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        self.channel.send("ready", config.index, os.getpid())
        log.debug("HTTP worker %d (pid %d) serves %s:%d", config.index, os.getpid(), config.host,
                  config.port)
        await self.stop.wait()
        await runner.cleanup()          # streams in flight end (openai_api.end_live_requests)
        await self.session.close()
        self.channel.close()
        return 1 if self.core_gone else 0


def setup_logging(config: WorkerConfig) -> None:
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {config.index}]: %(message)s")
    quiet_malformed_requests()


def die_with(parent: int) -> bool:
    """SIGTERM when the core dies (PR_SET_PDEATHSIG); False when it is gone already."""
    try:
        libc: Any = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass            # the channel's end still stops the worker
    return os.getppid() == parent


async def serve(fd: int) -> int:
    return await Worker().run(socket.socket(fileno=fd))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        logging.basicConfig(stream=sys.stderr)
        log.error("xim_router.worker is started by `xim-router serve --workers N`, not by hand")
        return 2
    fd, parent, loop = int(args[0]), int(args[1]), args[2]     # the core's own event loop
    if not die_with(parent):
        return 1
    return eventloop.choose(loop).run(serve(fd))


if __name__ == "__main__":
    sys.exit(main())
