"""A loopback Hugging Face Hub for tests and benchmarks: no internet needed.

It speaks what huggingface_hub 2.x sends (read from its file_download.py and hf_api.py):

* ``GET /api/models/{repo}[/revision/{rev}]``: model info, with ``sha`` (the commit) and
  ``siblings`` (left out with ``siblings = False``, as some mirrors do);
  ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the folder listing (in pages of
  ``tree_page`` entries, linked by ``Link: <...>; rel="next"``, when it is set);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: small files answer 200 with ``X-Repo-Commit``,
  a quoted ``ETag`` (git blob sha1) and Range support; ``.safetensors`` files are LFS files,
  answered like the Hub does with a 302 to a CDN (a second server on another host,
  127.0.0.2, so huggingface_hub reads the metadata from the redirect: ``X-Linked-Etag``
  (sha256), ``X-Linked-Size``, ``Location``; huggingface_hub 1.33 follows a redirect to the
  same hostname whatever the port, 1.26 only a relative one, 2.x one to the same origin);
* 404s carry ``X-Error-Code``: ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``.

No Xet headers are ever sent, so huggingface_hub uses plain HTTP downloads. Every request is
recorded (server, method, path, Range, Authorization) before it is answered, so a test can
assert exactly what was fetched. ``bandwidth`` (bytes/s) caps the bytes sent by both servers
together, like one network link. Connections time out after ``timeout`` seconds of silence, and
``stop()`` closes the listening sockets and every open connection.

Use the ``hub_server`` fixture (re-exported by conftest.py), or ``HubServer`` with
``hf_pointed_at`` outside pytest (benchmarks/bench_hub_overlap.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

__all__ = ["HubServer", "Request", "hf_pointed_at", "hub_server"]

CHUNK = 64 * 1024
SENDFILE_CHUNK = 256 * 1024
_INFO = re.compile(r"^/api/models/(?P<repo>.+?)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>.+?)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_BLOB = re.compile(r"^/blobs/(?P<sha>[0-9a-f]{64})$")
_LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Request:
    """One request as received. ``file`` is the repo file it asked for (resolve and CDN
    requests); ``status`` and ``sent`` (body bytes) are filled in as it is answered."""

    server: str
    method: str
    path: str
    range: str | None
    authorization: str | None
    file: str | None = None
    status: int = 0
    sent: int = 0


@dataclass
class _File:
    path: str
    data: bytes | None
    disk: Path | None
    size: int
    sha256: str
    git_sha1: str

    @property
    def lfs(self) -> bool:
        return self.path.endswith(_LFS_SUFFIXES)

    @classmethod
    def make(cls, path: str, content: bytes | os.PathLike[str]) -> _File:
        if isinstance(content, (bytes, bytearray)):
            data, disk = bytes(content), None
            sha256 = hashlib.sha256(data).hexdigest()
            size = len(data)
        else:
            data, disk = None, Path(content)
            digest = hashlib.sha256()
            with open(disk, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
            sha256, size = digest.hexdigest(), disk.stat().st_size
        # The git blob of an LFS file is its pointer; any stable sha1 will do for the ETag.
        git_sha1 = hashlib.sha1(f"blob {size}\0{sha256}".encode()).hexdigest()
        return cls(path, data, disk, size, sha256, git_sha1)

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        if self.data is not None:
            for offset in range(start, end, CHUNK):
                yield self.data[offset:min(end, offset + CHUNK)]
            return
        assert self.disk is not None
        with open(self.disk, "rb") as f:
            f.seek(start)
            for offset in range(start, end, CHUNK):
                yield f.read(min(CHUNK, end - offset))


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)

    def commit(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class _Link:
    """One shared link of ``rate`` bytes/s (None: unlimited) for all connections: each chunk
    books the next free slot of the link and waits for it to pass. A link left idle banks at
    most ``burst`` bytes, so a sender that woke up late catches up without beating the rate
    over any window longer than a few milliseconds."""

    def __init__(self, rate: float | None, burst: int = 1 << 20):
        self.rate = rate
        self.burst = burst
        self._lock = threading.Lock()
        self._free_at = 0.0

    def wait(self, nbytes: int) -> None:
        rate = self.rate
        if not rate:
            return
        with self._lock:
            now = time.perf_counter()
            self._free_at = max(self._free_at, now - self.burst / rate) + nbytes / rate
            until = self._free_at
        time.sleep(max(0.0, until - now))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: HubServer, name: str, host: str):
        self.hub, self.name = hub, name
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__((host, 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def _bind(hub: HubServer, name: str, hosts: tuple[str, ...]) -> _Server:
    """A server on the first of ``hosts`` that can be bound."""
    for host in hosts[:-1]:
        try:
            return _Server(hub, name, host)
        except OSError:
            continue
    return _Server(hub, name, hosts[-1])


class HubServer:
    """The Hub (``url``) and its CDN (``cdn_url``) on two loopback ports.

    >>> with HubServer() as hub:                                          # doctest: +SKIP
    ...     commit = hub.add_repo("org/model", {"model.safetensors": data})
    """

    def __init__(self, *, bandwidth: float | None = None, timeout: float = 30.0):
        self.link = _Link(bandwidth)
        self.timeout = timeout
        self.repos: dict[str, _Repo] = {}
        self.blobs: dict[str, _File] = {}
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.url = self.cdn_url = ""
        self.faults: list[tuple[re.Pattern[str], int | None]] = []
        self._stopping = threading.Event()
        #: False: model info without ``siblings``, as some mirrors answer (clients list the
        #: folder with the tree API then).
        self.siblings = True
        #: Entries per page of the tree API (None: one page), the next page's URL in a
        #: ``Link: <...>; rel="next"`` header, as the Hub paginates.
        self.tree_page: int | None = None
        #: True: every page's next link leads back to the first page (a broken mirror).
        self.tree_loops = False

    def fail(self, pattern: str, status: int | None) -> None:
        """Requests whose path matches ``pattern`` get ``status`` (a 5xx: the Hub is down) or,
        with None, no answer at all until the server stops (a stalled connection)."""
        self.faults.append((re.compile(pattern), status))

    # --- lifecycle
    def start(self) -> HubServer:
        # The CDN on another loopback host (Linux routes all of 127.0.0.0/8 to lo): a redirect
        # to it leaves the Hub for huggingface_hub 1.33 too, which compares hostnames only. Where
        # only 127.0.0.1 answers (macOS, some sandboxes), another port is enough for 2.x.
        for name, hosts in (("hub", ("127.0.0.1",)), ("cdn", ("127.0.0.2", "127.0.0.1"))):
            server = _bind(self, name, hosts)
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"hub-server-{name}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.url, self.cdn_url = (f"http://{s.server_address[0]}:{s.server_address[1]}"
                                  for s in self._servers)
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (idempotent)."""
        self._stopping.set()
        for server in self._servers:
            server.shutdown()
            server.close_connections()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- content
    def add_repo(self, repo_id: str, files: Mapping[str, bytes | os.PathLike[str]], *,
                 branch: str = "main", tags: tuple[str, ...] = ()) -> str:
        """Commit ``files`` (repo path -> bytes or a local file) as the new head of ``branch``;
        ``tags`` point at the same commit. Returns the 40-hex commit sha."""
        repo = self.repos.setdefault(repo_id, _Repo())
        snapshot = {path: _File.make(path, content) for path, content in files.items()}
        digest = hashlib.sha1(f"{repo_id}:{len(repo.commits)}".encode())
        for path in sorted(snapshot):
            digest.update(f"{path}:{snapshot[path].sha256}".encode())
        commit = digest.hexdigest()
        repo.commits[commit] = snapshot
        for ref in (branch, *tags):
            repo.refs[ref] = commit
        for file in snapshot.values():
            self.blobs[file.sha256] = file
        return commit

    def add_folder(self, repo_id: str, folder: str | os.PathLike[str], **kwargs: Any) -> str:
        """Commit every file under ``folder`` (served from disk, not held in memory)."""
        root = Path(folder)
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        return self.add_repo(repo_id, files, **kwargs)

    # --- what happened
    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def fetched(self) -> list[str]:
        """Repo files whose content was asked for (GET on the Hub or the CDN), in order,
        without repeats: a resolve GET and its CDN GET count once."""
        out: list[str] = []
        for r in self.requests:
            if r.method == "GET" and r.file is not None and r.file not in out:
                out.append(r.file)
        return out

    def record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.hub.timeout)  # an idle keep-alive ends

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    # --- routing
    def _handle(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        self.req = Request(self.server.name, self.command, unquote(url.path),
                           self.headers.get("Range"), self.headers.get("Authorization"))
        hub.record(self.req)
        try:
            for pattern, status in hub.faults:
                if pattern.search(url.path):
                    if status is None:
                        hub._stopping.wait(hub.timeout)
                        self.close_connection = True
                    else:
                        self._error(status, None, "injected failure")
                    return
            if self.server.name == "cdn":
                self._blob(url.path)
            elif m := _TREE.match(url.path):
                self._tree(m, parse_qs(url.query))
            elif m := _INFO.match(url.path):
                self._info(m)
            elif m := _RESOLVE.match(url.path):
                self._resolve(m)
            else:
                self._error(404, None, "Not Found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _repo(self, m: re.Match[str]) -> tuple[_Repo, str] | None:
        repo = self.server.hub.repos.get(unquote(m["repo"]))
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        commit = repo.commit(unquote(m["rev"] or "main"))
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo, commit

    def _info(self, m: re.Match[str]) -> None:
        found = self._repo(m)
        if found:
            repo, commit = found
            repo_id = unquote(m["repo"])
            info: dict[str, Any] = {"_id": commit[:24], "id": repo_id, "modelId": repo_id,
                                    "sha": commit, "private": False, "tags": []}
            if self.server.hub.siblings:
                info["siblings"] = [{"rfilename": p} for p in sorted(repo.commits[commit])]
            self._json(info, commit)

    def _tree(self, m: re.Match[str], query: dict[str, list[str]]) -> None:
        found = self._repo(m)
        if not found:
            return
        repo, commit = found
        files = repo.commits[commit]
        base = unquote(m["path"] or "").strip("/")
        prefix = f"{base}/" if base else ""
        if base and not any(p.startswith(prefix) for p in files):
            self._error(404, "EntryNotFound", f"{base} does not exist", commit)
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries: dict[str, dict[str, Any]] = {}
        for path, file in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folder = prefix + rest.split("/", 1)[0]
                entries.setdefault(folder, {"type": "directory", "path": folder,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
                continue
            entry: dict[str, Any] = {"type": "file", "path": path, "size": file.size,
                                     "oid": file.git_sha1}
            if file.lfs:
                entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": 134}
            entries[path] = entry
        listed = list(entries.values())
        page = self.server.hub.tree_page
        if page is None:
            self._json(listed, commit)
            return
        start = int(query.get("cursor", ["0"])[0])
        headers = {}
        if start + page < len(listed):
            cursor = 0 if self.server.hub.tree_loops else start + page
            rest = urlencode({**{k: v[0] for k, v in query.items()}, "cursor": cursor})
            here = f"{self.server.hub.url}{urlsplit(self.path).path}"
            headers["Link"] = f'<{here}?{rest}>; rel="next"'
        self._json(listed[start:start + page], commit, headers)

    def _resolve(self, m: re.Match[str]) -> None:
        found = self._repo(m)
        if not found:
            return
        repo, commit = found
        path = unquote(m["path"])
        file = repo.commits[commit].get(path)
        if file is None:
            self._error(404, "EntryNotFound", f"{path} does not exist", commit)
            return
        self.req.file = path
        headers = {"X-Repo-Commit": commit, "ETag": f'"{file.git_sha1}"'}
        if file.lfs:
            headers.update({"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size),
                            "Location": f"{self.server.hub.cdn_url}/blobs/{file.sha256}",
                            "Content-Length": "0"})
            self._status(302, headers)
            return
        self._body(file, headers)

    def _blob(self, path: str) -> None:
        m = _BLOB.match(path)
        file = self.server.hub.blobs.get(m["sha"]) if m else None
        if file is None:
            self._error(404, None, "Not Found")
            return
        self.req.file = file.path
        self._body(file, {"ETag": f'"{file.sha256}"'})

    # --- answers
    def _body(self, file: _File, headers: dict[str, str]) -> None:
        start, end, status = 0, file.size, 200
        if (spec := self.headers.get("Range")) is not None:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", spec.strip())
            if m is None or int(m[1]) >= max(file.size, 1):
                self._status(416, {"Content-Range": f"bytes */{file.size}",
                                   "Content-Length": "0"})
                return
            start, end = int(m[1]), min(file.size, int(m[2]) + 1 if m[2] else file.size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
        headers.update({"Content-Length": str(end - start), "Accept-Ranges": "bytes",
                        "Content-Type": "application/octet-stream"})
        self._status(status, headers)
        if self.command == "HEAD":
            return
        link = self.server.hub.link
        if file.disk is None:
            for chunk in file.chunks(start, end):
                link.wait(len(chunk))
                self.wfile.write(chunk)
                self.req.sent += len(chunk)
            return
        # Files on disk go out with sendfile: the server's own CPU time must not be what limits
        # a benchmark on a 2-core machine.
        with open(file.disk, "rb") as f:
            offset = start
            while offset < end:
                count = min(SENDFILE_CHUNK, end - offset)
                link.wait(count)
                sent = self.connection.sendfile(f, offset, count)
                if sent == 0:
                    raise BrokenPipeError("the client went away")
                offset += sent
                self.req.sent += sent

    def _json(self, obj: Any, commit: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self._status(200, {"Content-Type": "application/json", "Content-Length": str(len(body)),
                           "X-Repo-Commit": commit, **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(body)
            self.req.sent += len(body)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None
               ) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
                   "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._status(status, headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _status(self, status: int, headers: dict[str, str]) -> None:
        self.req.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()


# Module attributes of huggingface_hub read at import time, so setting the environment in a
# test is not enough: (module, attribute) -> value, given the endpoint and the HF home.
def _hf_patches(endpoint: str, home: Path) -> dict[tuple[str, str], Any]:
    c = "huggingface_hub.constants"
    return {
        (c, "ENDPOINT"): endpoint,
        (c, "HUGGINGFACE_CO_URL_TEMPLATE"): endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        (c, "HF_HOME"): str(home),
        (c, "HF_HUB_CACHE"): str(home / "hub"),
        (c, "HUGGINGFACE_HUB_CACHE"): str(home / "hub"),
        (c, "HF_XET_CACHE"): str(home / "xet"),
        (c, "HF_TOKEN_PATH"): str(home / "token"),
        (c, "HF_STORED_TOKENS_PATH"): str(home / "stored_tokens"),
        (c, "HF_HUB_OFFLINE"): False,
        # Telemetry would fetch {ENDPOINT}/api/agent-harnesses once per process.
        (c, "HF_HUB_DISABLE_TELEMETRY"): True,
        (c, "HF_HUB_DISABLE_XET"): True,
        ("huggingface_hub.utils.tqdm", "HF_HUB_DISABLE_PROGRESS_BARS"): True,
    }


_HF_ENV = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
           "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_TELEMETRY", "NO_PROXY",
           "no_proxy")


@contextlib.contextmanager
def hf_pointed_at(endpoint: str, home: str | os.PathLike[str]) -> Iterator[Path]:
    """Point huggingface_hub at ``endpoint`` with an empty cache under ``home`` (environment and
    import-time constants), and restore everything on exit. Yields the hub cache folder."""
    import importlib

    home = Path(home)
    saved_env = {name: os.environ.get(name) for name in _HF_ENV}
    saved: dict[tuple[str, str], Any] = {}
    try:
        for name in _HF_ENV:
            os.environ.pop(name, None)
        # Loopback never through a proxy a CI machine may set for its package registry.
        loopback = ",".join(filter(None, (saved_env["NO_PROXY"], "127.0.0.1,127.0.0.2,localhost")))
        os.environ.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(home),
                           "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1",
                           "NO_PROXY": loopback, "no_proxy": loopback})
        for (module, attr), value in _hf_patches(endpoint, home).items():
            mod = importlib.import_module(module)
            saved[(module, attr)] = getattr(mod, attr)
            setattr(mod, attr, value)
        yield home / "hub"
    finally:
        for (module, attr), value in saved.items():
            setattr(importlib.import_module(module), attr, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[HubServer]:
    """A running loopback Hub with huggingface_hub pointed at it and an empty cache in
    ``tmp_path / "hf"``; stopped (and huggingface_hub restored) at teardown."""
    server = HubServer().start()
    try:
        with hf_pointed_at(server.url, tmp_path / "hf"):
            yield server
    finally:
        server.stop()
