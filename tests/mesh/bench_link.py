"""Measure the link: CURVE round trips and frames/s through codec + Router + MeshLink.

    .venv/bin/python tests/mesh/bench_link.py [--round-trips 2000] [--frames 50000]

Two processes on loopback, as in production: this one runs the real
xim_router Router (CURVE ROUTER + ZAP + sessions + request queues); a child
runs a real MeshLink whose on_message answers each `infer` at once:
- round trip: router sends `infer`, agent answers `done`, router's request
  queue receives it (infer -> done, both directions through CURVE and the codec);
- throughput: one `infer` asks for N `chunk` frames, sent as fast as the link
  allows; the router decodes and queues every one.
Prints one JSON object. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psutil
import zmq

from xim_proto import codec
from xim_router import keys
from xim_router import store as store_mod
from xim_router.mesh import Router, RouterSettings
from ximd import enrollment
from ximd.mesh.link import MeshLink
from ximd.mesh.report import HelloInfo, LeaseInfo

CHUNK = (b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny",'
         b'"choices":[{"index":0,"delta":{"content":" word"},"finish_reason":null}]}')


# ---------------------------------------------------------------- agent process


async def agent_main(state_dir: str) -> None:
    identity = enrollment.load_identity(state_dir)
    models = (codec.Model(name="tiny", state="ready"),)
    link: MeshLink

    async def on_message(msg: codec.Message) -> None:
        if isinstance(msg, codec.Infer):
            spec = json.loads(msg.body)
            per_frame = spec.get("per_frame", 1)
            for seq in range(spec.get("chunks", 0)):
                await link.send(codec.Chunk(id=msg.id, seq=seq, data=[CHUNK] * per_frame))
            await link.send(codec.Done(id=msg.id, finish_reason="stop"))

    link = MeshLink(identity, hello_info=lambda: HelloInfo(models=models, max_concurrent=1),
                    lease_info=lambda: LeaseInfo(models=models, max_concurrent=1),
                    on_message=on_message, on_state=lambda s, d: None, lease_interval=5.0)
    await link.run()


def echo_main(endpoint: str, server_key: str) -> None:
    """Baseline peer: a bare sync CURVE DEALER that echoes every frame."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key.encode(), public, secret
    sock.connect(endpoint)
    sock.send(b"ready")
    while True:
        sock.send(sock.recv())


def raw_curve_baseline(n: int) -> dict:
    """The same round trip with bare pyzmq (no asyncio, codec or sessions), for scale."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    sock.curve_server, sock.curve_secretkey = True, secret
    sock.bind("tcp://127.0.0.1:0")
    child = subprocess.Popen([sys.executable, __file__, "--echo",
                              sock.getsockopt_string(zmq.LAST_ENDPOINT), public.decode()])
    try:
        peer, _ = sock.recv_multipart()
        echo = psutil.Process(child.pid)
        rtts = []
        for i in range(n + 200):
            if i == 200:
                echo_cpu0, own_cpu0 = sum(echo.cpu_times()[:2]), time.process_time()
            start = time.perf_counter()
            sock.send_multipart([peer, b"x" * 100])
            sock.recv_multipart()
            if i >= 200:
                rtts.append((time.perf_counter() - start) * 1e6)
        return {**percentiles(rtts), "cpu_per_round_trip": {
            "router_us": round((time.process_time() - own_cpu0) / n * 1e6, 1),
            "agent_us": round((sum(echo.cpu_times()[:2]) - echo_cpu0) / n * 1e6, 1)}}
    finally:
        child.kill()
        child.wait(10)
        sock.close(0)
        ctx.term()


def codec_costs(n: int = 20000) -> dict:
    """Microseconds per encode and per decode of a one-chunk and an 8-chunk frame."""
    out = {}
    for per_frame in (1, 8):
        msg = codec.Chunk(id="chatcmpl-0123456789abcdef", seq=42, data=[CHUNK] * per_frame)
        frame = codec.encode(msg)
        start = time.perf_counter()
        for _ in range(n):
            codec.encode(msg)
        middle = time.perf_counter()
        for _ in range(n):
            codec.decode(frame, sender=codec.AGENT)
        end = time.perf_counter()
        out[f"chunk_{per_frame}_per_frame"] = {"bytes": len(frame),
                                              "encode_us": round((middle - start) / n * 1e6, 2),
                                              "decode_us": round((end - middle) / n * 1e6, 2)}
    return out


def percentiles(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {"n": len(samples), "p50": round(statistics.median(samples), 1),
            "p99": round(samples[int(len(samples) * 0.99) - 1], 1),
            "mean": round(statistics.fmean(samples), 1)}


# ---------------------------------------------------------------- router side


def make_identity(store: store_mod.Store, router_pair, endpoint: str) -> enrollment.Identity:
    public, secret = (k.decode() for k in zmq.curve_keypair())
    key = store.create_join_key(ttl_s=60, uses=1, model=None)
    enrolled = store.enroll(join_key=key, public_key=public, hostname="bench", hardware={},
                            max_concurrent=1, agent_version="bench", token_ttl_s=3600)
    return enrollment.Identity(
        agent_id=enrolled.agent.agent_id, worker_id=enrolled.agent.worker_id, router_url="http://unused",
        mesh_endpoints=(endpoint,), router_public_key=router_pair.public, agent_public_key=public,
        agent_secret_key=secret, token=enrolled.token, token_expires_at=enrolled.token_expires_at,
        enrolled_at=time.time())


async def one_request(router: Router, worker: str, n: int, chunks: int = 0, per_frame: int = 1):
    rid = f"r{n}"
    queue = router.open_request(rid, worker, credit=1 << 30)
    await router.send(worker, codec.Infer(id=rid, model="tiny", endpoint="completions",
                                          body=json.dumps({"chunks": chunks, "per_frame": per_frame}).encode(),
                                          stream=True, deadline_s=60.0, credit=1 << 30))
    frames = 0
    while True:
        msg = await queue.get()
        if isinstance(msg, codec.Chunk):
            frames += 1
        else:
            router.close_request(rid)
            return frames


async def bench(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-link-"))
    store = store_mod.Store(tmp / "router")
    pair = keys.load_or_create_keypair(tmp / "router")
    router = Router(store, pair, mesh_bind="tcp://127.0.0.1:0", settings=RouterSettings())
    endpoint = await router.start()
    identity = make_identity(store, pair, endpoint)
    enrollment.save_identity(tmp / "agent", identity)
    child = subprocess.Popen([sys.executable, __file__, "--agent", str(tmp / "agent")])
    try:
        deadline = time.monotonic() + 20
        while identity.worker_id not in router.sessions:
            if time.monotonic() > deadline or child.poll() is not None:
                raise SystemExit("the agent did not connect")
            await asyncio.sleep(0.05)
        for i in range(200):                                    # warm up
            await one_request(router, identity.worker_id, i)
        agent_proc = psutil.Process(child.pid)
        agent_cpu0, router_cpu0 = sum(agent_proc.cpu_times()[:2]), time.process_time()
        rtts = []
        for i in range(args.round_trips):
            start = time.perf_counter()
            await one_request(router, identity.worker_id, 10_000 + i)
            rtts.append((time.perf_counter() - start) * 1e6)
        cpu = {"router_us": round((time.process_time() - router_cpu0) / len(rtts) * 1e6, 1),
               "agent_us": round((sum(agent_proc.cpu_times()[:2]) - agent_cpu0) / len(rtts) * 1e6, 1)}
        results = {"round_trip_us": percentiles(rtts),
                   "cpu_per_round_trip": cpu,
                   "raw_pyzmq_curve_round_trip_us": raw_curve_baseline(args.round_trips),
                   "codec": codec_costs(),
                   "load_average_1m": os.getloadavg()[0]}
        for per_frame in (1, 8):
            cpu0, start = time.process_time(), time.perf_counter()
            frames = await one_request(router, identity.worker_id, 99_000 + per_frame,
                                       chunks=args.frames, per_frame=per_frame)
            elapsed = time.perf_counter() - start
            results[f"chunk_frames_{per_frame}_per_frame"] = {
                "frames": frames, "seconds": round(elapsed, 3),
                "frames_per_s": round(frames / elapsed), "chunks_per_s": round(frames * per_frame / elapsed),
                "router_cpu_s": round(time.process_time() - cpu0, 3)}
        return results
    finally:
        child.terminate()
        child.wait(10)
        await router.stop()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--agent", help=argparse.SUPPRESS)
    parser.add_argument("--echo", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        echo_main(*args.echo)
        return
    if args.agent:
        import signal
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        asyncio.run(agent_main(args.agent))
        return
    print(json.dumps(asyncio.run(bench(args)), indent=2))


if __name__ == "__main__":
    main()
