"""Helpers for the mesh tests: agent configs, link callbacks that record, running links."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import zmq
import zmq.asyncio

from tests.support.router import RouterProcess, wait_for
from xim_proto import codec
from ximd import config as configmod
from ximd import enrollment
from ximd.mesh.link import Backoff, MeshLink
from ximd.mesh.report import HelloInfo, LeaseInfo
from ximd.mesh.state import LinkState


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_agent_config(path: Path, *, url: str, state_dir: Path, insecure: bool = True,
                       ca_file: str = "", join_key: str = "", join_key_file: str = "",
                       max_concurrent: int = 4) -> Path:
    lines = ["[agent]", f"state_dir = {toml_str(str(state_dir))}",
             f"max_concurrent = {max_concurrent}", "", "[router]", f"url = {toml_str(url)}",
             f"insecure = {'true' if insecure else 'false'}"]
    if ca_file:
        lines.append(f"ca_file = {toml_str(ca_file)}")
    if join_key:
        lines.append(f"join_key = {toml_str(join_key)}")
    if join_key_file:
        lines.append(f"join_key_file = {toml_str(join_key_file)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def load_config(path: Path) -> configmod.Config:
    return configmod.load(config_file=path, env={})


def enroll_fresh(router: RouterProcess, cfg, **key_kw) -> enrollment.Identity:
    identity = asyncio.run(enrollment.enroll(cfg, router.join_key(**key_kw), hostname="test-node",
                                             hardware={"gpus": []}))
    enrollment.save_identity(cfg.agent.state_dir, identity)
    return identity


class LinkProbe:
    """Callbacks for a MeshLink that record what happened."""

    def __init__(self, *, running: int = 0, models=("tiny",)):
        self.states: list[tuple[LinkState, str]] = []
        self.messages: list[codec.Message] = []
        self.running = running
        self.models = tuple(codec.Model(name=m, state="ready") for m in models)

    def hello_info(self) -> HelloInfo:
        return HelloInfo(hardware={"gpus": []}, models=self.models, max_concurrent=4)

    def lease_info(self) -> LeaseInfo:
        return LeaseInfo(running=self.running, waiting=0, kv_cache_usage=0.125, engine_state="ready",
                         models=self.models, in_flight=(), max_concurrent=4, draining=False)

    async def on_message(self, msg: codec.Message) -> None:
        self.messages.append(msg)

    def on_state(self, state: LinkState, detail: str) -> None:
        self.states.append((state, detail))

    def saw(self, state: LinkState, containing: str = "") -> bool:
        return any(s is state and containing in d for s, d in self.states)


def make_link(identity, probe: LinkProbe, **kw) -> MeshLink:
    kw.setdefault("backoff", Backoff(initial=0.1, maximum=1.0))
    kw.setdefault("lease_interval", 0.5)
    return MeshLink(identity, hello_info=probe.hello_info, lease_info=probe.lease_info,
                    on_message=probe.on_message, on_state=probe.on_state, **kw)


def stand_in_router(ctx: zmq.asyncio.Context) -> tuple[zmq.asyncio.Socket, enrollment.Identity]:
    """A CURVE ROUTER socket on loopback that a test drives as the router, and the identity of
    a node that trusts its key (enrolled nowhere: the test's router asks for no token)."""
    server_public, server_secret = (k.decode() for k in zmq.curve_keypair())
    agent_public, agent_secret = (k.decode() for k in zmq.curve_keypair())
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, server_secret.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    return sock, enrollment.Identity(
        agent_id="a1", worker_id="worker-fake", router_url="http://127.0.0.1:9",
        mesh_endpoints=(sock.getsockopt_string(zmq.LAST_ENDPOINT),), router_public_key=server_public,
        agent_public_key=agent_public, agent_secret_key=agent_secret, token="xat_fake",
        token_expires_at=time.time() + 3600, enrolled_at=time.time())


async def until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Async twin of wait_for, for use inside a running event loop."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def running(link: MeshLink):
    """Run a link for the body of a ``async with``, and always stop it."""
    task = asyncio.ensure_future(link.run())
    try:
        yield task
    finally:
        await link.close()
        try:
            await asyncio.wait_for(task, 10)
        except TimeoutError:
            task.cancel()
            raise AssertionError("MeshLink.run() did not end within 10 s of close()")


__all__ = ["LinkProbe", "RouterProcess", "enroll_fresh", "load_config", "make_link", "running",
           "stand_in_router", "until", "wait_for", "write_agent_config"]
