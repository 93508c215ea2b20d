"""`xim-router serve`: the store, the mesh and the HTTP app, started and stopped together."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path

import zmq
from aiohttp import web

from xim_router import keys, openai_api
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


def settings_from(args) -> RouterSettings:
    if args.lease_timeout <= args.lease_interval:
        raise StartupError("--lease-timeout must be longer than --lease-interval")
    return RouterSettings(lease_interval_s=args.lease_interval, lease_timeout_s=args.lease_timeout,
                          dead_after_s=args.dead_after, token_ttl_s=args.token_ttl,
                          sweep_interval_s=min(1.0, args.lease_interval / 2))


async def serve(args) -> int:
    state_dir = Path(args.state_dir)
    settings = settings_from(args)
    ssl_context = tls_context(args.tls_cert, args.tls_key)
    try:
        api_settings = openai_api.settings_from(args)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    try:
        store = store_mod.Store(state_dir)
        keypair = keys.load_or_create_keypair(state_dir)
    except OSError as exc:
        raise StartupError(f"cannot use the state directory {state_dir}: {exc}") from None
    router = Router(store, keypair, mesh_bind=args.mesh, settings=settings,
                    advertise=tuple(args.advertise))
    try:
        await router.start()
    except zmq.ZMQError as exc:
        raise StartupError(f"cannot listen on {args.mesh}: {exc}") from None
    app = build_app(router)
    openai_api.configure(app, api_settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = args.http
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await router.stop()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = runner.addresses[0][:2]
    scheme = "https" if ssl_context else "http"
    http_url = f"{scheme}://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
    # One line on stdout that scripts and tests parse; the same facts go to the log.
    print(f"xim-router serving http={http_url} mesh={router.mesh_endpoint} "
          f"public_key={keypair.public} state_dir={state_dir}", flush=True)
    log.info("enrollment API on %s, mesh on %s", http_url, router.mesh_endpoint)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()
    await router.stop()
    store.close()
    sys.stdout.flush()
    return 0
