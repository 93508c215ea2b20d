"""A stand-in Hugging Face Hub: enough of the Hub's HTTP API for huggingface_hub to fetch a model.

The real hub is out of reach of the test machines, so tests point the official client at
this server with HF_ENDPOINT=http://127.0.0.1:PORT. Standard library only: the same file
runs as a script inside a bare Debian guest (python3 only), e.g. as a transient unit:

    python3 hubstub.py --repo org/name=/srv/model --port 8099 [--rate BYTES_PER_S]
                       [--token-file F [--require-token]] [--mode MODE] [--cut-after-bytes N]

What huggingface_hub 2.4.0 asks of the hub to download a repository (read from its
_snapshot_download.py, file_download.py, hf_api.py and utils/_http.py):

  GET  /api/models/{repo}/revision/{rev}        snapshot_download → repo_info: needs "sha"
       (/api/models/{repo} when no revision)    (the commit it then pins every file to);
                                                model_info(files_metadata=True) adds
                                                ?blobs=true and reads siblings[].rfilename,
                                                size, blobId, lfs{size, sha256, pointerSize}.
  GET  /api/models/{repo}/tree/{sha}?recursive=true&expand=false
                                                list_repo_tree: a JSON list of
                                                {type: file|directory, path, oid, size,
                                                lfs{oid, size, pointerSize}}; more pages only
                                                if a `Link: <…>; rel="next"` header says so.
                                                Cached by the client in trees/{sha}.json.
  HEAD /{repo}/resolve/{sha}/{path}             per file, with Accept-Encoding: identity.
                                                Needs X-Repo-Commit (else FileMetadataError),
                                                and an etag: X-Linked-Etag, else ETag (the
                                                blob is stored as blobs/{etag}); size from
                                                X-Linked-Size, else Content-Length. A
                                                redirect on the same host is followed.
  GET  /{repo}/resolve/{sha}/{path}             the body; on a dropped connection the client
                                                retries within the same call with
                                                `Range: bytes=N-` and expects 206 (a 200
                                                makes it start the file over). It writes
                                                in 10 MiB chunks, so N is a multiple of
                                                10 MiB: a cut in the first 10 MiB of a
                                                file restarts it without a Range.

Errors are told apart by headers, not bodies (HEAD answers have none): X-Error-Code
RepoNotFound / RevisionNotFound / EntryNotFound / GatedRepo and X-Error-Message.
Xet is never offered: the client takes the xet path only when a HEAD answer carries
X-Xet-Hash (with a xet-auth Link or X-Xet-Refresh-Route), or a cached tree entry has a
xetHash; this server sends neither.

Files named *.safetensors, *.bin, *.gguf or larger than 1 MiB are "LFS" files, as on the
hub: their etag is the sha256 of the content and their blob id the git sha1 of the LFS
pointer; other files' etag and blob id are the git blob sha1 ("blob <len>\\0" + content).
The commit sha is a sha1 over the sorted (path, blob id) pairs, so it is deterministic.

Modes (stub.mode = ..., or POST /_stub/config {"mode": ..., "rate": ..., ...}):
  normal     everything answers;
  throttled  file bodies trickle out at `rate` bytes/s in total (metadata stays fast);
  cut        file bodies stop, connection dropped, once `cut_after_bytes` body bytes have
             gone out in this mode (counted across files); after that every body is cut at
             its first byte, `cut_drops` times (None: for ever) — then bodies flow again;
  gated      metadata is public; file HEAD/GET answer 401 without a bearer token and 403
             with a wrong one (X-Error-Code: GatedRepo → GatedRepoError);
             `require_token` (--require-token) gates the files the same way in every
             other mode too, so that a gated repository can also be throttled or cut;
  corrupt    file bodies have some bytes flipped: same size, same headers;
  down       every hub request answers 503.
Unknown repos answer 404 with X-Error-Code: RepoNotFound in every mode but `down`.

Accounting: stub.bytes_served, stub.requests [(method, path, status, authorized)] — the
token itself is never stored — and GET /_stub/stats, which returns both as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

MODES = ("normal", "throttled", "cut", "gated", "corrupt", "down")
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
LFS_MIN_SIZE = 1024 * 1024
DEFAULT_RATE = 200_000           # bytes/s in `throttled` mode
DEFAULT_BRANCH = "main"
CHUNK = 64 * 1024
CORRUPT_EVERY = 1024             # `corrupt` flips the byte at every offset divisible by this
IDLE_TIMEOUT_S = 30              # a keep-alive connection with no request is closed after this


# ---------------------------------------------------------------- the repositories served


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The text git keeps in place of an LFS file; its length is the hub's `pointerSize`."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class RepoFile(NamedTuple):
    path: str            # inside the repo, '/'-separated
    disk: Path
    size: int
    blob_id: str         # git sha1 of the content, or of the LFS pointer for LFS files
    sha256: str | None   # set for LFS files only

    @property
    def etag(self) -> str:
        """What the client names the blob after: the sha256 for LFS files, the git sha1 otherwise."""
        return self.sha256 or self.blob_id

    def lfs_json(self, sha_key: str) -> dict:
        return {sha_key: self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256 or "", self.size))}


def scan_file(path: str, disk: Path) -> RepoFile:
    data = disk.read_bytes()
    if disk.name.endswith(LFS_SUFFIXES) or len(data) > LFS_MIN_SIZE:
        sha256 = hashlib.sha256(data).hexdigest()
        return RepoFile(path, disk, len(data), git_blob_sha1(lfs_pointer(sha256, len(data))), sha256)
    return RepoFile(path, disk, len(data), git_blob_sha1(data), None)


class Repo:
    """A directory on disk seen as a model repository with a single commit on `main`."""

    def __init__(self, repo_id: str, root: Path):
        self.repo_id = repo_id
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"repo {repo_id}: {root} is not a directory")
        self.files = {}
        for disk in sorted(p for p in root.rglob("*") if p.is_file()):
            path = disk.relative_to(root).as_posix()
            if not path.startswith("."):            # no .git, .cache or hidden files
                self.files[path] = scan_file(path, disk)
        digest = hashlib.sha1()
        for path, entry in sorted(self.files.items()):
            digest.update(f"{path}\0{entry.blob_id}\n".encode())
        self.sha = digest.hexdigest()

    def resolves(self, revision: str) -> bool:
        return revision in (DEFAULT_BRANCH, self.sha)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())

    def folders(self) -> list[str]:
        found = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return sorted(found)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range; None when it cannot be served."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first_s, _, last_s = spec.strip().partition("-")
    try:
        if first_s == "":                           # suffix form: the last N bytes
            length = int(last_s)
            first, last = max(size - length, 0), size - 1
        else:
            first = int(first_s)
            last = min(int(last_s), size - 1) if last_s else size - 1
    except ValueError:
        return None
    if first > last or first >= size:
        return None
    return first, last


# ---------------------------------------------------------------- the server


class Served(NamedTuple):
    method: str
    path: str
    status: int
    authorized: bool   # the request carried the configured token (the token itself is never kept)


class HubError(Exception):
    """An error answer, with the headers huggingface_hub reads to pick its exception class."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class HubStub:
    """The stand-in hub, served from a background thread: `with HubStub({"org/m": dir}) as hub: hub.url`."""

    def __init__(self, repos: dict[str, Path | str], *, host: str = "127.0.0.1", port: int = 0, mode: str = "normal",
                 rate: int = DEFAULT_RATE, token: str | None = None, require_token: bool = False,
                 cut_after_bytes: int = 0, cut_drops: int | None = None, quiet: bool = True):
        self.repos = {repo_id: Repo(repo_id, Path(root)) for repo_id, root in repos.items()}
        self.host, self.port, self.quiet = host, port, quiet
        self.rate = rate
        self.token = token
        self.require_token = require_token
        self.cut_after_bytes = cut_after_bytes
        self.cut_drops = cut_drops
        self.bytes_served = 0
        self.requests: list[Served] = []
        self._lock = threading.Lock()
        self._pace_next = 0.0          # when the throttle lets the next chunk go (monotonic)
        self._cut_sent = 0             # body bytes sent since `cut` mode began
        self._mode = "normal"
        self.mode = mode
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------ settings

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"unknown hub stub mode {value!r}; modes: {', '.join(MODES)}")
        with self._lock:
            self._mode = value
            self._cut_sent = 0        # entering `cut` (again) starts the byte count over
            self._pace_next = 0.0

    def configure(self, settings: dict) -> None:
        """What POST /_stub/config does: change any of mode, rate, token, require_token,
        cut_after_bytes, cut_drops."""
        names = ("rate", "token", "require_token", "cut_after_bytes", "cut_drops")
        unknown = set(settings) - {"mode", *names}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        for name in names:
            if name in settings:
                setattr(self, name, settings[name])
        if "mode" in settings:
            self.mode = settings["mode"]

    def stats(self) -> dict:
        with self._lock:
            return {"mode": self._mode, "require_token": self.require_token, "bytes_served": self.bytes_served,
                    "requests": [r._asdict() for r in self.requests],
                    "repos": {r.repo_id: {"sha": r.sha, "size": r.total_size} for r in self.repos.values()}}

    # ------------------------------------------------ life cycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HubStub:
        self._stopping.clear()
        self._server = ThreadingHTTPServer((self.host, self.port), make_handler(self))
        self._server.daemon_threads = True      # a stalled client must not hold up stop()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="hubstub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()                    # ends throttled bodies still trickling out
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------ what the handler asks

    def record(self, served: Served) -> None:
        with self._lock:
            self.requests.append(served)

    @property
    def gates_files(self) -> bool:
        """Whether file HEAD/GET need the token now: mode gated, or require_token in any mode."""
        return self._mode == "gated" or self.require_token

    def authorized(self, header: str | None) -> bool:
        if not self.token or not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].encode(), self.token.encode())

    def find_repo(self, path: str) -> tuple[Repo, str]:
        """The repo a path starts with, and the rest of the path; RepoNotFound when none does."""
        for repo_id, repo in self.repos.items():
            if path == repo_id or path.startswith(repo_id + "/"):
                return repo, path[len(repo_id):].lstrip("/")
        raise HubError(404, "RepoNotFound", "Repository not found")

    def pace(self, nbytes: int) -> None:
        """In `throttled` mode, wait for this chunk's turn: all bodies together get `rate` bytes/s."""
        with self._lock:
            start = max(time.monotonic(), self._pace_next)
            self._pace_next = start + nbytes / max(self.rate, 1)
            wait = self._pace_next - time.monotonic()
        if wait > 0:
            self._stopping.wait(wait)

    def cut_allowance(self, wanted: int) -> int | None:
        """In `cut` mode, how many of `wanted` bytes may still go out; None: bodies are not being cut now."""
        with self._lock:
            if self._mode != "cut":
                return None
            if self.cut_drops is not None and self.cut_drops <= 0:
                return None
            allowed = max(min(wanted, self.cut_after_bytes - self._cut_sent), 0)
            self._cut_sent += allowed
            if allowed < wanted and self.cut_drops is not None:
                self.cut_drops -= 1             # this body is the one being cut
            return allowed

    def count_body(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_served += nbytes


def corrupted(chunk: bytes, offset: int) -> bytes:
    """`chunk` (found at `offset` of its file) with every byte at a multiple of CORRUPT_EVERY flipped."""
    data = bytearray(chunk)
    first = -offset % CORRUPT_EVERY
    for i in range(first, len(data), CORRUPT_EVERY):
        data[i] ^= 0xFF
    return bytes(data)


def make_handler(stub: HubStub) -> type[BaseHTTPRequestHandler]:
    class Handler(HubHandler):
        pass
    Handler.stub = stub
    return Handler


class HubHandler(BaseHTTPRequestHandler):
    """One connection. HTTP/1.1 keep-alive, as the client's connection pool expects."""

    protocol_version = "HTTP/1.1"
    server_version = "hubstub/1"
    timeout = IDLE_TIMEOUT_S
    stub: HubStub

    # ------------------------------------------------ dispatch

    def do_GET(self):
        self.dispatch(body=True)

    def do_HEAD(self):
        self.dispatch(body=False)

    def do_POST(self):
        self.dispatch(body=True)

    def dispatch(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.authorized = self.stub.authorized(self.headers.get("Authorization"))
        self.recorded = path.startswith("/_stub/")   # the test's own calls are not accounted
        try:
            if path.startswith("/_stub/"):
                self.control(path)
            elif self.stub.mode == "down":
                raise HubError(503, None, "Service Unavailable (hubstub is in mode down)")
            elif self.command == "POST":
                raise HubError(405, None, "Method not allowed")
            elif path.startswith("/api/models/"):
                self.api(path[len("/api/models/"):], query)
            else:
                self.resolve(path.lstrip("/"), body, self.authorized)
        except HubError as error:
            self.send_error_answer(error, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True        # the client went away mid-body; nothing to answer
        finally:
            self.record(0)                      # 0: the connection broke before any answer

    def send_response(self, code, message=None):
        self.record(code)
        super().send_response(code, message)

    def record(self, status: int) -> None:
        # Recorded as the status line goes out, before the client can read it: a test that
        # has its answer finds the request in stub.requests, whatever then befalls the body.
        if not self.recorded:
            self.recorded = True
            self.stub.record(Served(self.command, self.path, status, self.authorized))

    # ------------------------------------------------ answers

    def send_error_answer(self, error: HubError, body: bool) -> None:
        payload = json.dumps({"error": error.message}).encode()
        self.send_response(error.status)
        if error.code:
            self.send_header("X-Error-Code", error.code)
        self.send_header("X-Error-Message", error.message)
        if error.commit:
            self.send_header("X-Repo-Commit", error.commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def send_json(self, data, status: int = 200) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    # ------------------------------------------------ /_stub/: the test's controls

    def control(self, path: str) -> None:
        if path == "/_stub/stats" and self.command == "GET":
            self.send_json(self.stub.stats())
            return
        if path == "/_stub/config" and self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            try:
                self.stub.configure(json.loads(self.rfile.read(length) or b"{}"))
            except (ValueError, TypeError, AttributeError) as error:
                raise HubError(400, None, f"bad config: {error}") from None
            self.send_json(self.stub.stats())
            return
        raise HubError(404, None, "no such stub control")

    # ------------------------------------------------ /api/models/: metadata

    def api(self, rest: str, query: dict) -> None:
        repo, tail = self.stub.find_repo(rest)
        if tail == "" or tail.startswith("revision/"):
            revision = tail[len("revision/"):] if tail else DEFAULT_BRANCH
            self.check_revision(repo, revision)
            self.send_json(self.model_info(repo, files_metadata=query.get("blobs") == "true"))
            return
        if tail.startswith("tree/"):
            revision, _, folder = tail[len("tree/"):].partition("/")
            self.check_revision(repo, revision)
            self.send_json(self.tree(repo, folder, recursive=query.get("recursive") == "true"))
            return
        raise HubError(404, None, "Not found")

    @staticmethod
    def check_revision(repo: Repo, revision: str) -> None:
        if not repo.resolves(revision):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def model_info(self, repo: Repo, files_metadata: bool) -> dict:
        siblings = []
        for f in repo.files.values():
            sibling: dict = {"rfilename": f.path}
            if files_metadata:
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.sha256:
                    sibling["lfs"] = f.lfs_json("sha256")
            siblings.append(sibling)
        return {"_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": repo.sha, "private": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "gated": "manual" if self.stub.gates_files else False, "siblings": siblings}

    @staticmethod
    def tree(repo: Repo, folder: str, recursive: bool) -> list[dict]:
        def wanted(path: str) -> bool:
            if folder and not path.startswith(folder + "/"):
                return False
            inside = path[len(folder) + 1:] if folder else path
            return recursive or "/" not in inside
        entries = [{"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                   for p in repo.folders() if wanted(p)]
        for f in repo.files.values():
            if wanted(f.path):
                entry: dict = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
                if f.sha256:
                    entry["lfs"] = f.lfs_json("oid")
                entries.append(entry)
        return entries

    # ------------------------------------------------ /{repo}/resolve/{rev}/{path}: files

    def resolve(self, rest: str, body: bool, authorized: bool) -> None:
        repo, tail = self.stub.find_repo(rest)
        if not tail.startswith("resolve/"):
            raise HubError(404, None, "Not found")
        revision, _, filename = tail[len("resolve/"):].partition("/")
        self.check_revision(repo, revision)
        self.check_gate(repo, authorized)
        entry = repo.files.get(filename)
        if entry is None:
            raise HubError(404, "EntryNotFound", f"{filename} does not exist on {revision}", commit=repo.sha)
        first, last = 0, entry.size - 1
        status = 200
        if self.headers.get("Range") and entry.size:
            wanted = parse_range(self.headers["Range"], entry.size)
            if wanted is None:
                raise HubError(416, None, f"Range not satisfiable: {self.headers['Range']} of {entry.size}")
            (first, last), status = wanted, 206
        self.send_file_headers(repo, entry, status, first, last)
        if body:
            self.send_body(entry, first, last)

    def check_gate(self, repo: Repo, authorized: bool) -> None:
        if not self.stub.gates_files or authorized:
            return
        if self.headers.get("Authorization"):
            raise HubError(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not in the "
                                             "authorized list. Visit the model page to ask for access.")
        raise HubError(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access to it "
                                         "and be authenticated to access it. Please log in.")

    def send_file_headers(self, repo: Repo, entry: RepoFile, status: int, first: int, last: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{entry.size}")
        self.send_header("ETag", f'"{entry.etag}"')
        if entry.sha256:
            # the real hub redirects LFS files to its CDN and names the blob in these two
            self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
            self.send_header("X-Linked-Size", str(entry.size))
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Content-Disposition", f"inline; filename*=UTF-8''{quote(entry.path.rsplit('/', 1)[-1])}")
        self.end_headers()

    def send_body(self, entry: RepoFile, first: int, last: int) -> None:
        stub = self.stub
        with open(entry.disk, "rb") as f:
            f.seek(first)
            offset = first
            while offset <= last and not stub._stopping.is_set():
                size = min(CHUNK, last + 1 - offset)
                if stub.mode == "throttled":
                    size = min(size, max(stub.rate // 10, 1024))   # small chunks keep the rate smooth
                    stub.pace(size)
                chunk = f.read(size)
                allowance = stub.cut_allowance(len(chunk))
                if allowance is not None and allowance < len(chunk):
                    self.drop_connection(chunk[:allowance])
                    return
                if stub.mode == "corrupt":
                    chunk = corrupted(chunk, offset)
                self.write_body(chunk)
                offset += len(chunk)
        if offset <= last:                     # stopped mid-body: do not leave the client waiting
            self.drop_connection(b"")

    def write_body(self, chunk: bytes) -> None:
        # Counted before the write: a client that has read the whole body must find it in
        # bytes_served already. A write that fails takes its bytes back out.
        self.stub.count_body(len(chunk))
        try:
            self.wfile.write(chunk)
        except OSError:
            self.stub.count_body(-len(chunk))
            raise

    def drop_connection(self, last_bytes: bytes) -> None:
        """Send what is allowed, then close the socket under the client, as a network drop would."""
        if last_bytes:
            self.write_body(last_bytes)
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(2)        # socket.SHUT_RDWR
        except OSError:
            pass

    def log_message(self, format, *args):   # http.server names the argument `format`
        if not self.stub.quiet:
            sys.stderr.write(f"hubstub: {self.address_string()} {format % args}\n")


# ---------------------------------------------------------------- as a script


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A stand-in Hugging Face Hub serving directories as model repos.")
    parser.add_argument("--repo", action="append", required=True, metavar="ORG/NAME=DIR",
                        help="a repository to serve (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--mode", default="normal", choices=MODES)
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE, help="bytes/s in mode throttled")
    parser.add_argument("--token-file", type=Path, help="file holding the token mode gated requires")
    parser.add_argument("--require-token", action="store_true",
                        help="gate the files (as mode gated does) whatever the mode, e.g. throttled")
    parser.add_argument("--cut-after-bytes", type=int, default=0)
    parser.add_argument("--cut-drops", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repos = {}
    for spec in args.repo:
        repo_id, sep, root = spec.partition("=")
        if not sep or repo_id.count("/") != 1:
            raise SystemExit(f"hubstub: --repo wants ORG/NAME=DIR, not {spec!r}")
        repos[repo_id] = Path(root)
    token = args.token_file.read_text().strip() if args.token_file else None
    if args.require_token and not token:
        raise SystemExit("hubstub: --require-token needs --token-file")
    stub = HubStub(repos, host=args.host, port=args.port, mode=args.mode, rate=args.rate, token=token,
                   require_token=args.require_token, cut_after_bytes=args.cut_after_bytes, cut_drops=args.cut_drops,
                   quiet=not args.verbose)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())   # `systemctl stop` ends it cleanly
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with stub:
        print(f"hubstub: serving {', '.join(repos)} on {stub.url} (pid {os.getpid()})", flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
