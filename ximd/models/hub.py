"""Talking to the Hugging Face hub: the official client, run in the engine's environment.

ximd itself has no hub client (the .deb runs on the distribution's Python); the
engine environment has ``huggingface_hub``, so a short script runs there as a
child process with an environment built from nothing: the hub's endpoint and
proxies, the token (only here, never the engine's), ``HF_HOME`` = the cache.

- ``manifest``: the revision's files with sizes and checksums (``model_info``
  with files metadata), known before a byte is fetched.
- ``fetch``: the selected files, several at a time, each into a partial file
  with a stable name (``blobs/<etag>.ximd-partial``) through the client's
  ``http_get`` with a Range for what is already there, then renamed to its blob
  and linked into the snapshot exactly as the client's cache lays it out.
  (``hf_hub_download`` itself starts a file over in every new process.)

The child speaks one JSON object per ``XIMD-JSON`` line on stdout; a failure
is classified there (gated, not found, HTTP status, network) because only
the client's exception classes know. It dies with its parent (PDEATHSIG), and
a cancelled download kills its process group at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from ximd.hubenv import DOWNLOAD_ENV_NAMES, passed_through
from ximd.models.choice import ModelError
from ximd.models.credentials import DEFAULT_TOKEN_PATH, TOKEN_ENV_NAMES, HubToken
from ximd.models.manifest import Manifest, ManifestError

log = logging.getLogger("ximd.models")

DEFAULT_ENDPOINT = "https://huggingface.co"
LINE_PREFIX = "XIMD-JSON "
STOP_GRACE_S = 3.0
MANIFEST_TIMEOUT_S = 120.0

_CHILD = r"""
import json, os, sys

def say(obj):
    sys.stdout.write("XIMD-JSON " + json.dumps(obj) + "\n")
    sys.stdout.flush()

def die_with_parent(parent):
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, 9)          # PR_SET_PDEATHSIG, SIGKILL
    except Exception:
        pass
    if os.getppid() != parent:
        sys.exit(1)

NETWORK = ("ConnectError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "TimeoutException",
           "NetworkError", "RemoteProtocolError", "ReadError", "TransportError", "ProtocolError",
           "ChunkedEncodingError", "IncompleteRead", "LocalEntryNotFoundError")

def classify(exc):
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    def names(e):
        return {c.__name__ for c in type(e).__mro__}
    for kind, wanted in (("gated", {"GatedRepoError"}),
                         ("not_found", {"RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"}),
                         ("http", {"HfHubHTTPError"}), ("network", set(NETWORK))):
        for e in chain:
            if names(e) & wanted:
                status = getattr(getattr(e, "response", None), "status_code", None)
                text = [line for line in str(e).splitlines() if line.strip()]
                return {"kind": kind, "status": status, "type": type(e).__name__,
                        "message": (text[0] if text else type(e).__name__)[:300]}
    kind = "network" if isinstance(exc, OSError) else "error"
    return {"kind": kind, "status": None, "type": type(exc).__name__, "message": str(exc)[:300]}

def manifest(repo, revision):
    from huggingface_hub import HfApi
    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    files = []
    for s in info.siblings or []:
        lfs = s.lfs
        sha256 = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        size = s.size
        if size is None and lfs:
            size = lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)
        files.append({"path": s.rfilename, "size": size, "blob_id": s.blob_id, "sha256": sha256})
    say({"manifest": {"repo": repo, "revision": info.sha, "files": files}})

def fetch_one(repo, revision, entry, item):
    # The client's own hf_hub_download starts a file over in every new process; this
    # keeps a partial file under a stable name and asks the hub for the rest (Range),
    # so a download interrupted by a stop or a crash resumes where it was.
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    blob = os.path.join(entry, "blobs", item["etag"])
    if not os.path.exists(blob):
        partial = blob + ".ximd-partial"
        with os.fdopen(os.open(partial, os.O_RDWR | os.O_CREAT, 0o644), "r+b") as f:
            have = f.seek(0, 2)
            if have > item["size"]:
                f.seek(0)
                f.truncate()
                have = 0
            http_get(hf_hub_url(repo, item["path"], revision=revision), f, resume_size=have,
                     headers=build_hf_headers(), expected_size=item["size"])
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, blob)
    link = os.path.join(entry, "snapshots", revision, item["path"])
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if not os.path.islink(link):
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)

def fetch(repo, revision, cache_dir, workers):
    from concurrent.futures import ThreadPoolExecutor
    items = json.load(sys.stdin)
    entry = os.path.join(cache_dir, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(entry, "blobs"), exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fetch_one, repo, revision, entry, item) for item in items]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    say({"fetched": len(items)})

def main():
    die_with_parent(int(sys.argv[1]))
    try:
        # The client reads and writes 10 MiB at a time; 1 MiB makes the progress the
        # parent reads from the partial file move smoothly, and a stop lose less.
        from huggingface_hub import constants
        constants.DOWNLOAD_CHUNK_SIZE = 1024 * 1024
    except Exception:
        pass
    try:
        if sys.argv[2] == "manifest":
            manifest(sys.argv[3], sys.argv[4])
        else:
            fetch(sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    except ImportError as exc:
        say({"error": {"kind": "no_client", "status": None, "type": "ImportError", "message": str(exc)}})
        sys.exit(2)
    except Exception as exc:
        say({"error": classify(exc)})
        sys.exit(2)
    os._exit(0)    # no waiting on the client's leftover threads

main()
"""


class HubProblem(ModelError):
    """The hub could not give us the model this time; ``kind`` says why (for the wording)."""

    def __init__(self, kind: str, status: int | None, detail: str):
        super().__init__(f"{kind} ({status}): {detail}" if status else f"{kind}: {detail}")
        self.kind = kind            # gated, not_found, http, network, error, no_client, corrupt
        self.status = status
        self.detail = detail


def endpoint_of(environ: Mapping[str, str]) -> str:
    return (environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def download_env(environ: Mapping[str, str], hf_home: str, token: HubToken | None) -> dict[str, str]:
    """The downloader's whole environment: what ximd.hubenv lets through, the cache, the token."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           **{k: v for k, v in passed_through(environ, DOWNLOAD_ENV_NAMES).items() if k not in TOKEN_ENV_NAMES},
           # HF_HOME is the cache, where nobody stores a token: the client sends ours or none.
           "HF_HOME": hf_home, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token is not None:
        env["HF_TOKEN"] = token.value
    return env


def explain(problem: HubProblem, hf_id: str, token: HubToken | None, endpoint: str,
            token_awaits_restart: bool = False) -> str:
    """What the operator reads in STATUS and the journal: what happened, what to do.

    A token goes into /etc/xerotier/hf-token, which systemd hands to ximd as a credential
    only when the service starts: `systemctl restart ximd` (a reload cannot bring it), and
    ``token_awaits_restart`` says that file is there already."""
    page = f"{endpoint}/{hf_id}"
    refused = problem.kind == "gated" or (problem.kind == "http" and problem.status == 401)
    if refused and token is None and token_awaits_restart:
        return (f"model {hf_id} is gated and {DEFAULT_TOKEN_PATH} came after ximd started: systemd hands it "
                "over only at start, so `systemctl restart ximd`")
    if problem.kind == "gated" and token is None:
        return (f"model {hf_id} is gated: accept its licence at {page}, put a token of that account in "
                f"{DEFAULT_TOKEN_PATH} (or model_cache.hf_token_file), then `systemctl restart ximd`")
    if problem.kind == "gated":
        return (f"model {hf_id} is gated and the token from {token.source if token else '-'} has no access: "
                f"accept its licence at {page} with that token's account, then `systemctl reload ximd`")
    if problem.kind == "not_found":
        access = (f"the token from {token.source} has no access to it" if token
                  else "no token is set (/etc/xerotier/hf-token)")
        return (f"model {hf_id} was not found at {endpoint}: check the name, or it is private and {access}")
    if problem.kind == "http" and problem.status == 401:
        return (f"the hub at {endpoint} refused the token from {token.source if token else 'nowhere'} "
                f"(HTTP 401): put a valid token in {DEFAULT_TOKEN_PATH}, then `systemctl restart ximd`")
    if problem.kind == "http":
        return (f"the hub at {endpoint} answered HTTP {problem.status} for {hf_id} ({problem.detail}); "
                "retrying (check HF_ENDPOINT if it is a mirror)")
    if problem.kind == "network":
        return (f"cannot reach the Hugging Face hub at {endpoint} to fetch {hf_id} ({problem.detail}); "
                "check the network, HTTPS_PROXY or the mirror (HF_ENDPOINT)")
    if problem.kind == "corrupt":
        return f"model {hf_id}: {problem.detail}"
    return f"downloading {hf_id} failed: {problem.detail}"


@dataclass(frozen=True)
class Downloader:
    """Runs the hub client of ``python`` (the engine's interpreter) with ``env`` (download_env)."""
    python: str
    env: Mapping[str, str]
    workers: int = 8

    async def manifest(self, hf_id: str, revision: str = "main") -> Manifest:
        answer = await asyncio.wait_for(self._run("manifest", hf_id, revision), MANIFEST_TIMEOUT_S)
        try:
            return Manifest.from_json(answer.get("manifest"))
        except ManifestError as exc:
            raise HubProblem("error", None, f"the hub's file list for {hf_id} is unusable: {exc}") from None

    async def fetch(self, manifest: Manifest, hub_dir: str) -> None:
        """Download every file of ``manifest`` into the hub cache at ``hub_dir``; resumes what is there."""
        # Small files first: the model's config arrives at once, the weights after.
        items = [{"path": f.path, "size": f.size, "etag": f.etag} for f in sorted(manifest.files, key=lambda f: f.size)]
        await self._run("fetch", manifest.repo, manifest.revision, hub_dir, str(self.workers),
                        stdin=json.dumps(items).encode())

    async def _run(self, *args: str, stdin: bytes | None = None) -> dict:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-c", _CHILD, str(os.getpid()), *args, env=dict(self.env),
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise ModelError(f"the engine interpreter {self.python} that downloads models does not exist "
                             "(engine.python; see xerotier-engine-install)") from None
        try:
            out, err = await proc.communicate(stdin)
        except asyncio.CancelledError:
            await _stop(proc)
            raise
        answers = [json.loads(line[len(LINE_PREFIX):]) for line in out.decode(errors="replace").splitlines()
                   if line.startswith(LINE_PREFIX)]
        answer = answers[-1] if answers else {}
        if "error" in answer:
            e = answer["error"]
            raise HubProblem(str(e.get("kind")), e.get("status"), str(e.get("message")))
        if proc.returncode != 0 or not answer:
            lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
            raise HubProblem("error", None, lines[-1] if lines else f"the downloader exited with {proc.returncode}")
        return answer


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the downloader's process group, SIGKILL after a grace: a stop must not wait on it."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), wait_s)
            return
        except TimeoutError:
            continue
    log.warning("the model downloader (pid %d) did not exit", proc.pid)
