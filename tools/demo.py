"""`make demo`: the whole thing on one machine, ending in a streamed answer.

    .venv/bin/python tools/demo.py [--keep] [--prompt TEXT]

After `make host venv engine` (the Makefile's demo target runs them first):

  1. the engine environment (tools/setup-engine.sh, cached) and the tiny model
     (tools/make_tiny_model.py, cached);
  2. `xim-router serve` on loopback, and a fresh join key;
  3. an agent.toml with that key, then `ximd run` with its state, runtime and
     cache directories under .demo/;
  4. waits until the daemon is ready and its agent is active on the router;
  5. asks for a streamed chat completion through the official `openai` client
     and prints the tokens as they come;
  6. stops everything it started — or, with --keep, leaves it running and says
     how to talk to it and how to stop it.

Every step prints one progress line; a failure prints the tail of the log
that explains it and exits non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / ".demo"
VENV_BIN = Path(sys.executable).parent
SERVED_MODEL = "tiny"
ENGINE_READY_TIMEOUT_S = 600      # vLLM on 2 CPU cores: about a minute, more when cold
STEP_TIMEOUT_S = 60


class DemoFailed(Exception):
    def __init__(self, message: str, log: Path | None = None):
        super().__init__(message)
        self.log = log


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_dir() -> Path:
    return Path(os.environ.get("XIMD_CACHE_DIR", "/var/cache/ximd-dev"))


# ---------------------------------------------------------------- engine and model


def engine_python() -> str:
    """The engine environment's interpreter: the last stdout line of tools/setup-engine.sh."""
    log = DEMO / "setup-engine.log"
    with open(log, "w") as err:
        done = subprocess.run(["bash", str(REPO / "tools" / "setup-engine.sh")], stdout=subprocess.PIPE,
                              stderr=err, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise DemoFailed("tools/setup-engine.sh failed", log)
    return done.stdout.strip().splitlines()[-1]


def tiny_model(python: str) -> Path:
    """The tiny random Llama, cached by the hash of the script that makes it.

    Same cache key as the tests' helper (tests/support/engine.py), so both reuse one build.
    """
    script = REPO / "tools" / "make_tiny_model.py"
    dest = cache_dir() / f"tiny-llama-{hashlib.sha256(script.read_bytes()).hexdigest()[:12]}"
    if (dest / "config.json").exists():
        return dest
    log = DEMO / "make-tiny-model.log"
    with open(log, "w") as out:
        done = subprocess.run([python, str(script), str(dest)], stdout=out, stderr=subprocess.STDOUT,
                              env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                   "TRANSFORMERS_OFFLINE": "1", "HOME": str(dest.parent)})
    if done.returncode != 0 or not (dest / "config.json").exists():
        raise DemoFailed("building the tiny model failed", log)
    return dest


# ---------------------------------------------------------------- processes


@dataclass
class Started:
    """A process the demo started, with its log."""

    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {timeout:g} s; killing it")
                self.proc.kill()
                self.proc.wait()


@dataclass
class Demo:
    keep: bool
    started: list[Started] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict | None = None) -> Started:
        log = DEMO / f"{name}.log"
        out = open(log, "ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=REPO, start_new_session=True)
        out.close()
        started = Started(name, proc, log)
        self.started.append(started)
        return started

    def stop_all(self) -> None:
        for started in reversed(self.started):
            started.stop(timeout=60 if started.name == "ximd" else 15)


def wait_until(what: str, check, timeout: float, watched: list[Started], interval: float = 0.5):
    """Poll ``check()`` until it returns something truthy; fail early if a watched process dies."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        for started in watched:
            if not started.alive():
                raise DemoFailed(f"{started.name} exited (code {started.proc.returncode}) while waiting "
                                 f"for {what}", started.log)
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:g} s waiting for {what}",
                             watched[-1].log if watched else None)
        time.sleep(interval)


ROUTER_LINE = re.compile(r"xim-router serving http=(\S+) mesh=(\S+)")


def start_router(demo: Demo) -> tuple[Started, str]:
    state = DEMO / "router"
    router = demo.start("router", [str(VENV_BIN / "xim-router"), "serve", "--state-dir", str(state),
                                   "--http", "127.0.0.1:0", "--mesh", "tcp://127.0.0.1:0"])

    def url():
        match = ROUTER_LINE.search(router.log.read_text(errors="replace"))
        return match.group(1) if match else None

    http_url = wait_until("the router to listen", url, STEP_TIMEOUT_S, [router], interval=0.1)
    return router, http_url


def mint_join_key() -> str:
    done = subprocess.run([str(VENV_BIN / "xim-router"), "join-key", "create", "--state-dir",
                           str(DEMO / "router"), "--ttl", "1h", "--allow-model", SERVED_MODEL],
                          capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip().startswith("xjk_"):
        raise DemoFailed(f"xim-router join-key create failed: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[0]


def write_config(router_url: str, join_key: str, python: str, model: Path, metrics_port: int) -> Path:
    path = DEMO / "agent.toml"
    settings = {
        "agent": {"state_dir": str(DEMO / "state"), "cache_dir": str(DEMO / "cache"),
                  "runtime_dir": str(DEMO / "run")},
        "router": {"url": router_url, "join_key": join_key, "allow_http": True},
        "engine": {"model": str(model), "served_model_name": SERVED_MODEL, "python": python},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }
    path.write_text("# Written by tools/demo.py for a local demo.\n"
                    "# router.allow_http: the router speaks plain http on loopback.\n"
                    + tomli_w.dumps(settings))
    path.chmod(0o600)           # it holds the join key
    return path


def ximd_env(config: Path) -> dict[str, str]:
    return {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(DEMO), "XEROTIER_AGENT_CONFIG": str(config),
            "LANG": "C.UTF-8"}


def models_on_router(router_url: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{router_url}/v1/models", timeout=5) as resp:
            return [m["id"] for m in json.load(resp)["data"]]
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return []


def ximd_status(env: dict) -> dict | None:
    done = subprocess.run([str(VENV_BIN / "ximd"), "status", "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout)
    except ValueError:
        return None


# ---------------------------------------------------------------- the answer


def stream_answer(router_url: str, prompt: str) -> str:
    from openai import OpenAI  # the official client (a test dependency in .venv)

    client = OpenAI(base_url=f"{router_url}/v1", api_key="not-needed-on-loopback", max_retries=0,
                    timeout=120)
    stream = client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=48,
        stream=True, stream_options={"include_usage": True})
    text, usage = [], None
    print("demo: answer (random weights, so the words are noise; what matters is how they travel):",
          flush=True)
    print("    ", end="", flush=True)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content or ""
            text.append(piece)
            print(piece, end="", flush=True)
    print(flush=True)
    if not text:
        raise DemoFailed("the stream carried no tokens")
    if usage is not None:
        say(f"usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens")
    return "".join(text)


def fresh_demo_dir() -> None:
    """Start from nothing but the caches: a previous run's router and identity would not match."""
    DEMO.mkdir(exist_ok=True)
    for name in ("router", "state", "run"):
        shutil.rmtree(DEMO / name, ignore_errors=True)
    for log in DEMO.glob("*.log"):
        log.unlink()


def run(args) -> int:
    fresh_demo_dir()
    demo = Demo(keep=args.keep)
    ok = False
    try:
        say("engine environment (tools/setup-engine.sh; cached after the first run) ...")
        python = engine_python()
        say(f"engine interpreter: {python}")
        say("tiny model (tools/make_tiny_model.py; cached) ...")
        model = tiny_model(python)
        say(f"model: {model}")

        router, router_url = start_router(demo)
        say(f"router: {router_url} (log {router.log})")
        join_key = mint_join_key()
        say("join key minted (single use, 1 h; not printed)")
        metrics_port = free_port()
        config = write_config(router_url, join_key, python, model, metrics_port)
        env = ximd_env(config)
        ximd = demo.start("ximd", [str(VENV_BIN / "ximd"), "run"], env=env)
        say(f"ximd: started (pid {ximd.proc.pid}, log {ximd.log}); enrolling and loading the model, "
            "about a minute on this machine ...")
        wait_until("ximd to be ready", lambda: (ximd_status(env) or {}).get("phase") == "serving",
                   ENGINE_READY_TIMEOUT_S, [router, ximd], interval=2)
        say("ximd: ready")
        wait_until(f"the router to list model '{SERVED_MODEL}'",
                   lambda: SERVED_MODEL in models_on_router(router_url), STEP_TIMEOUT_S, [router, ximd])
        say(f"router: agent active, serving '{SERVED_MODEL}'")
        stream_answer(router_url, args.prompt)
        ok = True
        if args.keep:
            print(f"""
demo: left running (logs in {DEMO}):
  router   pid {router.proc.pid}   {router_url}
  ximd     pid {ximd.proc.pid}   metrics http://127.0.0.1:{metrics_port}/metrics
talk to it:
  curl -N {router_url}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{SERVED_MODEL}", "stream": true, "messages": [{{"role": "user", "content": "hi"}}]}}'
  XEROTIER_AGENT_CONFIG={config} {VENV_BIN}/ximd status
stop it:
  kill {ximd.proc.pid} {router.proc.pid}""", flush=True)
        return 0
    except DemoFailed as exc:
        say(f"FAILED: {exc}")
        if exc.log is not None:
            print(f"--- last lines of {exc.log} ---\n{tail(exc.log)}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:     # e.g. the openai client's errors: say what, show the daemon's log
        say(f"FAILED: {type(exc).__name__}: {exc}")
        for started in demo.started:
            print(f"--- last lines of {started.log} ---\n{tail(started.log, 20)}", file=sys.stderr)
        return 1
    finally:
        if not (ok and args.keep):
            say("stopping what the demo started ...")
            demo.stop_all()
            say("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description="Run router + ximd + vLLM locally and "
                                                               "print a streamed answer.")
    parser.add_argument("--keep", action="store_true",
                        help="leave the router and ximd running and print how to use and stop them")
    parser.add_argument("--prompt", default="Say hello to the mesh.", help="what to ask")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
