"""A small Hugging Face Hub compatible HTTP server for offline tests.

The real ``huggingface_hub`` client (tested against 2.4.0) talks to it through ``HF_ENDPOINT``. Standard library
only: ``http.server.ThreadingHTTPServer`` on 127.0.0.1, all state in memory.

Typical use from a test::

    server = start_server()
    server.add_user("tok-alice", "alice")                  # write token
    server.add_user("tok-alice-ro", "alice", write=False)  # read-only token
    env = client_env(server, tmp_path / "hf_home", token="tok-alice")
    out = run_client("from huggingface_hub import HfApi; emit(HfApi().whoami()['name'])", env)
    assert out == "alice"
    server.stop()

``huggingface_hub`` reads ``HF_ENDPOINT``/``HF_HOME``/``HF_HUB_DISABLE_XET`` at import time, so client code must run
in a process whose environment is set *before* the import: use :func:`run_client` (subprocess), or put
:func:`hub_env` into ``os.environ`` before anything imports ``huggingface_hub``. ``HF_HUB_DISABLE_XET=1`` is required:
the server only speaks the plain Git LFS "basic" transfer, not Xet.

Implemented endpoints (``{t}`` is ``models``/``datasets``/``spaces``, ``{p}`` the URL prefix ``""``/``datasets/``/
``spaces/``, ``{rev}`` a branch, tag, ``refs/pr/N``, full or >=7-char commit sha, URL-encoded or not):

* ``GET /api/whoami-v2``
* ``POST /api/repos/create`` (409 + ``url`` if it exists), ``DELETE /api/repos/delete``, ``POST /api/repos/move``
* ``POST /api/validate-yaml`` (always valid)
* ``GET /api/{t}`` (list, ``author``/``search`` filters; ``models`` for Spaces: those whose README lists the model)
* ``POST /api/collections`` (409 + ``slug`` when the namespace has one with that title),
  ``GET /api/collections/{slug}``, ``POST /api/collections/{slug}/items`` (409 when the item is in it)
* ``GET /api/{t}/{repo}`` and ``GET /api/{t}/{repo}/revision/{rev}`` (``?blobs=true`` adds sizes/LFS info: the
  ``sha256`` a pinned mixture records; ``gated`` as set by :meth:`HubServer.set_gated`; a model's ``cardData``:
  its README's YAML metadata)
* ``GET /api/{t}/{repo}/tree/{rev}[/{path}]`` (``recursive``, ``expand``), ``POST /api/{t}/{repo}/paths-info/{rev}``
* ``GET /api/{t}/{repo}/refs`` (``include_prs``), ``GET /api/{t}/{repo}/commits/{rev}``
* ``POST|DELETE /api/{t}/{repo}/branch/{branch}``, ``POST /api/{t}/{repo}/tag/{rev}``, ``DELETE .../tag/{tag}``
* ``PUT /api/{t}/{repo}/settings`` (visibility/private), ``GET /api/spaces/{repo}/runtime``
* ``POST /api/spaces/{repo}/hardware`` (``flavor``; also ``hardware`` at create): the runtime's requested hardware
* ``POST /api/{t}/{repo}/preupload/{rev}`` and ``POST /api/{t}/{repo}/commit/{rev}`` (NDJSON; ``create_pr=1``,
  ``parentCommit``; ``file``/``lfsFile``/``deletedFile``/``deletedFolder`` operations)
* ``POST /{p}{repo}.git/info/lfs/objects/batch`` (upload, basic transfer) with signed
  ``PUT /__lfs__/upload/{oid}`` and ``POST /__lfs__/verify/{oid}`` actions (the PUT carries no token, only the
  signature in its query string)
* ``GET|HEAD /{p}{repo}/resolve/{rev}/{path}`` (and ``/raw/``): ``X-Repo-Commit``, quoted ``ETag``,
  ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Content-Length``, ``Accept-Ranges``; ``Range: bytes=...``
  answered with 206 (what ``HfApi.parse_safetensors_file_metadata`` uses to read a header only:
  :meth:`HubServer.downloaded_files` tells ranged reads from whole downloads). No redirects.

Errors carry ``X-Error-Code`` (``RepoNotFound``/``RevisionNotFound``/``EntryNotFound``) and ``X-Error-Message``
headers plus a JSON ``{"error": ...}`` body, which is what ``hf_raise_for_status`` maps to the client's exceptions.
An unknown/private repo answers 401 without a token and 404 with one (both ``RepoNotFound``), like the real Hub.

Run by hand: ``python tests/hub_server.py --port 8080 --token secret``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

__all__ = [
    "LFS_SUFFIXES",
    "RequestRecord",
    "ClientError",
    "Fault",
    "HubServer",
    "client_env",
    "hub_env",
    "run_client",
    "start_server",
]

# Suffixes tracked by LFS (the usual Hub .gitattributes). Any file with one of them, any file larger than the
# server's ``lfs_threshold`` and any file whose first 512 bytes contain a NUL byte is uploaded through LFS.
LFS_SUFFIXES = (
    ".7z",
    ".arrow",
    ".bin",
    ".bz2",
    ".ckpt",
    ".ftz",
    ".gz",
    ".h5",
    ".joblib",
    ".mlmodel",
    ".model",
    ".msgpack",
    ".npy",
    ".npz",
    ".onnx",
    ".ot",
    ".parquet",
    ".pb",
    ".pickle",
    ".pkl",
    ".pt",
    ".pth",
    ".rar",
    ".safetensors",
    ".tar",
    ".tflite",
    ".tgz",
    ".wasm",
    ".xz",
    ".zip",
    ".zst",
)
DEFAULT_LFS_THRESHOLD = 1024 * 1024

GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()

_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SPACE_SDKS = ("gradio", "streamlit", "docker", "static")
_REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_BODY_FAULTS = ("drop", "truncate", "corrupt")


# --------------------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------------------


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit. Content lives in ``HubServer._blobs[sha256]``."""

    size: int
    sha256: str
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return _lfs_pointer(self.sha256, self.size)

    def git_oid(self, content: bytes) -> str:
        return _git_blob_oid(self.pointer if self.lfs else content)


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, FileEntry]
    title: str
    message: str
    author: str
    date: float


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    sdk: str | None
    created: float
    refs: dict[str, str] = field(default_factory=dict)  # full ref name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pr_count: int = 0
    pr_authors: dict[str, str] = field(default_factory=dict)  # "refs/pr/N" -> user name
    gated: str | bool = False  # False, "auto" or "manual": reported by the info endpoints (downloads stay open)
    object_id: str = field(default_factory=lambda: secrets.token_hex(12))
    requested_hardware: str | None = None  # Space hardware requests (see _request_space_hardware)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class User:
    token: str
    name: str
    write: bool = True
    orgs: tuple[str, ...] = ()

    def member_of(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


@dataclass
class Fault:
    """An injected failure, see :meth:`HubServer.set_fault`.

    ``kind`` is one of:

    * an HTTP status (``"500"``, ``"503"``, ``"429"``...): answered with that status and a JSON error body;
    * ``"drop"`` / ``"drop:N"``: headers with the full Content-Length, then half of the body / its first N bytes
      (nothing at all on a resumed ``Range`` request), then the connection is closed;
    * ``"truncate"``: a shorter but complete body (Content-Length matches what is sent);
    * ``"corrupt"``: same length, first bytes altered;
    * ``"reset"``: the connection is closed without any response;
    * ``"delay:SECONDS"``: sleep, then serve normally.

    Body kinds (drop/truncate/corrupt) only apply to successful responses that carry a body, never to HEAD.
    ``hits`` counts the requests the fault was applied to."""

    match: str
    kind: str
    times: int | None = None
    methods: tuple[str, ...] | None = None
    hits: int = 0

    def matches(self, method: str, raw_path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.kind.split(":")[0] in _BODY_FAULTS and method == "HEAD":
            return False
        return self.match in raw_path or self.match in unquote(raw_path)


@dataclass
class RequestRecord:
    """One entry of ``HubServer.log``: the request as received (header names lower-cased) and the status sent
    back (``None``: no response, e.g. a ``reset`` fault)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int | None = None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra or {}
        self.headers: dict[str, str] = {}


# --------------------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    hub: HubServer


class HubServer:
    """In-memory Hub. Create it with :func:`start_server`.

    Public attributes: ``url``, ``host``, ``port``, ``requests`` (list of ``(method, path)`` tuples, path as sent,
    without the query string), ``log`` (list of :class:`RequestRecord`: the same requests with query string,
    headers and response status), ``lfs_threshold``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        seed_gitattributes: bool = True,
        verbose: bool = False,
    ):
        self.lfs_threshold = lfs_threshold
        self.seed_gitattributes = seed_gitattributes
        self.verbose = verbose
        self.requests: list[tuple[str, str]] = []
        self.log: list[RequestRecord] = []
        self._lock = threading.RLock()
        self._users: dict[str, User] = {}
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 hex -> content (regular and LFS files alike)
        self._faults: list[Fault] = []
        self._collections: dict[str, dict[str, Any]] = {}  # slug -> the collection as the API returns it
        self._secret = secrets.token_bytes(32)
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.hub = self
        self.host, self.port = self._httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._thread: threading.Thread | None = None

    # ----- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- users, faults, request log ------------------------------------------------------------------------

    def add_user(self, token: str, name: str, write: bool = True, orgs: Iterable[str] = ()) -> User:
        """Register ``token`` for user ``name``. ``write=False`` makes it a read-only token. ``orgs`` are extra
        namespaces the user may read (private repos) and, with a write token, write to."""
        user = User(token=token, name=name, write=write, orgs=tuple(orgs))
        with self._lock:
            self._users[token] = user
        return user

    def set_fault(
        self, match: str, kind: str, *, times: int | None = None, method: str | Iterable[str] | None = None
    ) -> Fault:
        """Make requests whose path (raw or URL-decoded, query included) contains ``match`` fail; see
        :class:`Fault` for the kinds. ``times`` limits the number of affected requests (default: all until
        :meth:`clear_faults`); ``method`` restricts to one or several HTTP methods."""
        kind = str(kind)
        if not (
            kind.isdigit()
            or kind in (*_BODY_FAULTS, "reset")
            or re.fullmatch(r"drop:\d+", kind)
            or re.fullmatch(r"delay:\d+(\.\d*)?", kind)
        ):
            raise ValueError(f"unknown fault kind {kind!r}")
        methods = None
        if method is not None:
            methods = (method.upper(),) if isinstance(method, str) else tuple(m.upper() for m in method)
        fault = Fault(match=match, kind=kind, times=times, methods=methods)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.log.clear()

    def downloaded_files(self, method: str = "GET", *, ranged: bool | None = None) -> list[str]:
        """Repo-relative paths fetched through ``/resolve/`` (or ``/raw/``) with ``method``, in request order.

        ``ranged=False`` keeps only whole-file requests (no ``Range`` header), ``ranged=True`` only ranged reads
        (what ``HfApi.parse_safetensors_file_metadata`` sends for a header)."""
        out = []
        with self._lock:
            log = [(r.method, r.path, "range" in r.headers) for r in self.log]
        for m, path, has_range in log:
            if m != method or (ranged is not None and has_range != ranged):
                continue
            parsed = _parse_file_url([unquote(s) for s in path.split("/")[1:]])
            if parsed is not None:
                out.append(parsed[3])
        return out

    def set_gated(self, repo_id: str, gated: str | bool, repo_type: str = "model") -> None:
        """Report the repo as gated (``"auto"``/``"manual"``) or not (``False``) in its info, as the Hub does."""
        if gated not in (False, "auto", "manual"):
            raise ValueError(f"gated must be False, 'auto' or 'manual', got {gated!r}")
        with self._lock:
            self._repos[(repo_type, repo_id)].gated = gated

    # ----- direct (client-less) helpers for seeding and inspecting state ---------------------------------------

    def create_repo(
        self, repo_id: str, repo_type: str = "model", *, private: bool = False, sdk: str | None = None
    ) -> Repo:
        """Create a repo directly (no auth). Raises ``ValueError`` if it exists."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} {repo_id} exists")
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, sdk=sdk, created=time.time())
            files: dict[str, FileEntry] = {}
            if self.seed_gitattributes:
                files[".gitattributes"] = self._store(GITATTRIBUTES, lfs=False)
            commit = self._new_commit(None, files, "initial commit", "", "system")
            repo.commits[commit.oid] = commit
            repo.refs["refs/heads/main"] = commit.oid
            self._repos[(repo_type, repo_id)] = repo
            return repo

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | None],
        *,
        repo_type: str = "model",
        branch: str = "main",
        message: str = "Direct commit",
        author: str = "system",
        lfs: bool | None = None,
    ) -> str:
        """Commit directly to ``branch`` (created from main if missing). ``None`` values delete. Returns the sha.

        ``lfs`` forces every file in or out of LFS (a plain git weight file, as an old repo may hold); ``None``: the
        server's rule (suffix, size, binary)."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            ref = branch if branch.startswith("refs/") else f"refs/heads/{branch}"
            base = repo.refs.get(ref) or repo.refs["refs/heads/main"]
            new_files = dict(repo.commits[base].files)
            for path, content in files.items():
                if content is None:
                    new_files.pop(path, None)
                else:
                    wants = self._wants_lfs(path, len(content), content[:512]) if lfs is None else lfs
                    new_files[path] = self._store(content, lfs=wants)
            commit = self._new_commit(base, new_files, message, "", author)
            repo.commits[commit.oid] = commit
            repo.refs[ref] = commit.oid
            return commit.oid

    def get_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            commit = repo.commits[self._resolve(repo, revision)[0]]
            return self._blobs[commit.files[path].sha256]

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return sorted(repo.commits[self._resolve(repo, revision)[0]].files)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._resolve(self._repos[(repo_type, repo_id)], revision)[0]

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._repos[(repo_type, repo_id)].refs)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    # ----- internals --------------------------------------------------------------------------------------

    def _store(self, content: bytes, lfs: bool) -> FileEntry:
        sha = hashlib.sha256(content).hexdigest()
        self._blobs.setdefault(sha, bytes(content))
        return FileEntry(size=len(content), sha256=sha, lfs=lfs)

    def _new_commit(self, parent: str | None, files: dict[str, FileEntry], title: str, message: str, author: str):
        return Commit(
            oid=secrets.token_hex(20),
            parent=parent,
            files=files,
            title=title,
            message=message,
            author=author,
            date=time.time(),
        )

    def _wants_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return path.lower().endswith(LFS_SUFFIXES) or size > self.lfs_threshold or b"\0" in sample

    def _git_oid(self, entry: FileEntry) -> str:
        return entry.git_oid(b"" if entry.lfs else self._blobs[entry.sha256])

    def _resolve(self, repo: Repo, revision: str | None) -> tuple[str, str | None]:
        """Return ``(commit_oid, full_ref_or_None)``; raise RevisionNotFound."""
        rev = revision or "main"
        for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref.startswith("refs/") and ref in repo.refs:
                return repo.refs[ref], ref
        low = rev.lower()
        if low in repo.commits:
            return low, None
        if _HEX_RE.match(low):
            found = [oid for oid in repo.commits if oid.startswith(low)]
            if len(found) == 1:
                return found[0], None
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _sign(self, action: str, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{action}:{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    def _take_fault(self, method: str, raw_path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, raw_path):
                    fault.hits += 1
                    return fault
        return None


def _parse_file_url(segs: list[str]) -> tuple[str, str, str, str] | None:
    """``[prefix/]ns/name/(resolve|raw)/rev/path`` -> ``(repo_type, repo_id, rev, path)``."""
    if len(segs) >= 6 and segs[0] in _TYPE_FROM_PLURAL and segs[0] != "models" and segs[3] in ("resolve", "raw"):
        repo_type, repo_id, rest = _TYPE_FROM_PLURAL[segs[0]], f"{segs[1]}/{segs[2]}", segs[4:]
    elif len(segs) >= 5 and segs[2] in ("resolve", "raw"):
        repo_type, repo_id, rest = "model", f"{segs[0]}/{segs[1]}", segs[3:]
    else:
        return None
    rev, path_parts = _split_rev(rest)
    path = "/".join(path_parts)
    if not path:
        return None
    return repo_type, repo_id, rev, path


def _split_rev(parts: list[str]) -> tuple[str, list[str]]:
    """Split URL segments (already decoded one by one) into a revision and the remaining path segments. The
    client URL-encodes revisions into one segment; an unencoded ``refs/pr/N``-style revision is tolerated."""
    if not parts:
        return "main", []
    if parts[0] == "refs" and len(parts) >= 3 and parts[1] in ("pr", "heads", "tags", "convert"):
        return "/".join(parts[:3]), parts[3:]
    return parts[0], parts[1:]


def _qbool(query: dict[str, list[str]], name: str) -> bool:
    return any(v.lower() in ("1", "true", "yes") for v in query.get(name, []))


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise HubError(400, f"Invalid path: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")) or "\\" in path:
        raise HubError(400, f"Invalid path: {path!r}")
    return path


# --------------------------------------------------------------------------------------------------------------
# Request handler
# --------------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-hub/1.0"
    timeout = 120
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.hub.verbose:
            sys.stderr.write("hub-server: " + (format % args) + "\n")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    # ----- plumbing ----------------------------------------------------------------------------------------

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise HubError(400, "Truncated chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.hub.url

    def _handle(self, method: str) -> None:
        raw = self.path
        raw_path, _, raw_query = raw.partition("?")
        self._method = method
        self._body_fault: Fault | None = None
        try:
            body = self._read_body()
        except Exception:  # malformed framing: give up on this connection
            self.close_connection = True
            return
        self._record = RequestRecord(method, raw_path, raw_query, {k.lower(): v for k, v in self.headers.items()})
        with self.hub._lock:
            self.hub.requests.append((method, raw_path))
            self.hub.log.append(self._record)

        fault = self.hub._take_fault(method, raw)
        if fault is not None:
            if fault.kind == "reset":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault.kind.startswith("delay:"):
                time.sleep(float(fault.kind.split(":", 1)[1]))
            elif fault.kind.isdigit():
                self._send_error(HubError(int(fault.kind), f"Injected fault ({fault.kind}) for {raw_path}"))
                return
            else:
                self._body_fault = fault

        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        while segs and segs[-1] == "":
            segs.pop()
        query = parse_qs(raw_query, keep_blank_values=True)
        try:
            self._dispatch(method, segs, query, body)
        except HubError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # pragma: no cover - surfaced to the client as a 500
            traceback.print_exc()
            self._send_error(HubError(500, f"Internal error: {type(err).__name__}: {err}"))

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/octet-stream")
        fault = self._body_fault if (status < 300 and self._method != "HEAD" and body) else None
        length = len(body)
        payload = body
        close_after = False
        if fault is not None:
            if fault.kind == "truncate":
                payload = body[: len(body) // 2]
                length = len(payload)
            elif fault.kind == "corrupt":
                head = bytes(b ^ 0xFF for b in body[:64])
                payload = head + body[64:]
            elif fault.kind.startswith("drop"):
                resumed = status == 206 and not headers.get("Content-Range", "bytes 0-").startswith("bytes 0-")
                cut = int(fault.kind[5:]) if fault.kind.startswith("drop:") else len(body) // 2
                payload = b"" if resumed else body[: max(0, min(cut, len(body) - 1))]
                close_after = True
        headers["Content-Length"] = str(length)
        self._record.status = status
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if close_after:
                self.send_header("Connection", "close")
            self.end_headers()
            if self._method != "HEAD" and payload:
                self.wfile.write(payload)
            self.wfile.flush()
            if close_after:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _json(self, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        self._send(status, json.dumps(obj).encode(), hdrs)

    def _send_error(self, err: HubError) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8", **err.headers}
        headers["X-Error-Message"] = err.message.encode("ascii", "replace").decode()
        if err.code:
            headers["X-Error-Code"] = err.code
        self._body_fault = None
        self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers)

    # ----- auth --------------------------------------------------------------------------------------------

    def _user(self) -> User | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubError(401, "Invalid credentials in Authorization header")
        with self.hub._lock:
            user = self.hub._users.get(token.strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_type: str, repo_id: str, user: User | None, *, write: bool = False) -> Repo:
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not (user is not None and user.member_of(repo.namespace))):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            self._require_write(user, repo.namespace)
        return repo

    @staticmethod
    def _require_write(user: User | None, namespace: str) -> User:
        if user is None:
            raise HubError(401, "You must be authenticated to perform this action")
        if not user.write:
            raise HubError(403, "You don't have the rights to perform this action: this token is read-only")
        if not user.member_of(namespace):
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace}")
        return user

    def _json_body(self, body: bytes) -> dict:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise HubError(400, "Invalid JSON body") from None
        if not isinstance(data, dict):
            raise HubError(400, "Expected a JSON object")
        return data

    def _repo_url(self, repo: Repo) -> str:
        return f"{self._base_url()}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ----- routing -----------------------------------------------------------------------------------------

    def _dispatch(self, method: str, segs: list[str], query: dict[str, list[str]], body: bytes) -> None:
        hub = self.hub
        if segs and segs[0] == "api":
            with hub._lock:
                return self._api(method, segs[1:], query, body)
        if len(segs) == 3 and segs[0] == "__lfs__":
            return self._lfs_object(method, segs[1], segs[2], query, body)
        if len(segs) >= 6 and segs[-4:] == ["info", "lfs", "objects", "batch"] and segs[-5].endswith(".git"):
            head = segs[:-4]
            head[-1] = head[-1][: -len(".git")]
            if len(head) == 3 and head[0] in ("datasets", "spaces"):
                repo_type, repo_id = _TYPE_FROM_PLURAL[head[0]], f"{head[1]}/{head[2]}"
            elif len(head) == 2:
                repo_type, repo_id = "model", f"{head[0]}/{head[1]}"
            else:
                raise HubError(404, "Repository not found", "RepoNotFound")
            if method != "POST":
                raise HubError(405, "Method not allowed")
            with hub._lock:
                return self._lfs_batch(repo_type, repo_id, body)
        parsed = _parse_file_url(segs)
        if parsed is not None and method in ("GET", "HEAD"):
            return self._resolve_file(*parsed)
        raise HubError(404, f"Not found: {method} /{'/'.join(segs)}")

    def _api(self, method: str, segs: list[str], query: dict[str, list[str]], body: bytes) -> None:
        user = self._user()
        route = (method, *segs[:2])
        if route == ("GET", "whoami-v2"):
            return self._whoami(user)
        if route == ("POST", "repos", "create"):
            return self._create_repo(user, self._json_body(body))
        if route == ("DELETE", "repos", "delete"):
            return self._delete_repo(user, self._json_body(body))
        if route == ("POST", "repos", "move"):
            return self._move_repo(user, self._json_body(body))
        if route == ("POST", "validate-yaml"):
            return self._json({"errors": [], "warnings": []})
        if segs and segs[0] == "collections":
            return self._collections_api(method, user, segs[1:], body)
        if not segs or segs[0] not in _TYPE_FROM_PLURAL:
            raise HubError(404, f"Not found: /api/{'/'.join(segs)}")
        repo_type = _TYPE_FROM_PLURAL[segs[0]]
        if len(segs) == 1:
            if method != "GET":
                raise HubError(405, "Method not allowed")
            return self._list_repos(user, repo_type, query)
        if len(segs) == 2:
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        repo_id, rest = f"{segs[1]}/{segs[2]}", segs[3:]
        action = rest[0] if rest else ""
        arg = "/".join(rest[1:])

        if method == "GET" and action in ("", "revision"):
            return self._repo_info(user, repo_type, repo_id, arg or None, query)
        if method == "GET" and action == "tree":
            rev, path_parts = _split_rev(rest[1:])
            return self._tree(user, repo_type, repo_id, rev, "/".join(path_parts), query)
        if method == "POST" and action == "paths-info":
            return self._paths_info(user, repo_type, repo_id, arg, body)
        if method == "GET" and action == "refs":
            return self._refs(user, repo_type, repo_id, query)
        if method == "GET" and action == "commits":
            return self._commits(user, repo_type, repo_id, arg, query)
        if method == "POST" and action == "preupload":
            return self._preupload(user, repo_type, repo_id, arg, query, body)
        if method == "POST" and action == "commit":
            return self._commit(user, repo_type, repo_id, arg, query, body)
        if action == "branch" and method in ("POST", "DELETE"):
            return self._branch(method, user, repo_type, repo_id, arg, body)
        if action == "tag" and method in ("POST", "DELETE"):
            return self._tag(method, user, repo_type, repo_id, arg, body)
        if method == "PUT" and action == "settings":
            return self._settings(user, repo_type, repo_id, self._json_body(body))
        if method == "GET" and action == "runtime" and repo_type == "space":
            return self._json(_space_runtime(self._repo(repo_type, repo_id, user).requested_hardware))
        if method == "POST" and action == "hardware" and repo_type == "space":
            return self._request_space_hardware(user, repo_id, self._json_body(body))
        raise HubError(404, f"Not found: {method} /api/{'/'.join(segs)}")

    # ----- account & repo management ----------------------------------------------------------------------

    def _whoami(self, user: User | None) -> None:
        if user is None:
            raise HubError(401, "Invalid username or password.")
        self._json(
            {
                "type": "user",
                "id": hashlib.sha1(user.name.encode()).hexdigest()[:24],
                "name": user.name,
                "fullname": user.name,
                "email": f"{user.name}@example.com",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in user.orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {
                        "displayName": "test-token",
                        "role": "write" if user.write else "read",
                        "createdAt": _iso(0),
                    },
                },
            }
        )

    def _create_repo(self, user: User | None, payload: dict) -> None:
        name = payload.get("name")
        if not isinstance(name, str) or not _REPO_NAME_RE.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or user.name
        self._require_write(user, namespace)
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        sdk = payload.get("sdk")
        if repo_type == "space" and sdk not in _SPACE_SDKS:
            raise HubError(400, f"Invalid space sdk: {sdk!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self._base_url()}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub._repos:
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        visibility = payload.get("visibility")
        private = visibility == "private" or payload.get("private") is True
        hardware = _space_flavor(payload["hardware"]) if repo_type == "space" and payload.get("hardware") else None
        repo = self.hub.create_repo(repo_id, repo_type, private=private, sdk=sdk if repo_type == "space" else None)
        repo.requested_hardware = hardware
        self._json({"url": url, "name": repo_id, "id": repo.object_id})

    # ----- Space hardware requests (s3-demospace: `space push --hardware zero-a10g`) -----------------------------
    def _request_space_hardware(self, user: User | None, repo_id: str, payload: dict) -> None:
        """``request_space_hardware``: records the flavor as the Space's requested hardware (nothing runs)."""
        repo = self._repo("space", repo_id, user, write=True)
        repo.requested_hardware = _space_flavor(payload.get("flavor"))
        self._json(_space_runtime(repo.requested_hardware))

    # ----- end of Space hardware requests ----------------------------------------------------------------------

    def _delete_repo(self, user: User | None, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or (user.name if user else "")
        repo_id = f"{namespace}/{payload.get('name')}"
        self._repo(repo_type, repo_id, user, write=True)
        del self.hub._repos[(repo_type, repo_id)]
        self._json({})

    def _move_repo(self, user: User | None, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        src, dst = payload.get("fromRepo", ""), payload.get("toRepo", "")
        repo = self._repo(repo_type, src, user, write=True)
        if dst.count("/") != 1 or not _REPO_NAME_RE.match(dst.split("/")[1]):
            raise HubError(400, f"Invalid repo id: {dst!r}")
        self._require_write(user, dst.split("/")[0])
        if (repo_type, dst) in self.hub._repos:
            raise HubError(409, "A repo with this name already exists")
        del self.hub._repos[(repo_type, src)]
        repo.repo_id = dst
        self.hub._repos[(repo_type, dst)] = repo
        self._json({})

    def _settings(self, user: User | None, repo_type: str, repo_id: str, payload: dict) -> None:
        repo = self._repo(repo_type, repo_id, user, write=True)
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        if "private" in payload:
            repo.private = bool(payload["private"])
        self._json({})

    def _list_repos(self, user: User | None, repo_type: str, query: dict[str, list[str]]) -> None:
        author = (query.get("author") or [None])[0]
        search = (query.get("search") or [""])[0].lower()
        out = []
        for (rtype, repo_id), repo in sorted(self.hub._repos.items()):
            if rtype != repo_type or (repo.private and not (user and user.member_of(repo.namespace))):
                continue
            if (author and repo.namespace != author) or search not in repo_id.lower():
                continue
            if rtype == "space" and query.get("models") and not set(query["models"]) <= self._card_models(repo):
                continue
            commit = repo.commits[repo.refs["refs/heads/main"]]
            out.append(self._info_dict(repo, commit, with_siblings=False, blobs=False))
        self._json(out)

    def _card_models(self, repo: Repo) -> set[str]:
        """The ``models:`` of a repo's README front matter at ``main`` (block or flow list, or one id)."""
        entry = repo.commits[repo.refs["refs/heads/main"]].files.get("README.md")
        text = self.hub._blobs[entry.sha256].decode("utf-8", "replace") if entry else ""
        match = re.match(r"\A---\n(.*?)\n---", text, flags=re.S)
        models: set[str] = set()
        lines = match.group(1).splitlines() if match else []
        for i, line in enumerate(lines):
            if not line.startswith("models:"):
                continue
            value = line[len("models:") :].strip()
            if value.startswith("["):
                models.update(v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip())
            elif value:
                models.add(value.strip("'\""))
            for item in lines[i + 1 :]:
                if not item.lstrip().startswith("- "):
                    break
                models.add(item.lstrip()[2:].strip().strip("'\""))
        return models

    # ----- collections ----------------------------------------------------------------------------------------

    def _collections_api(self, method: str, user: User | None, segs: list[str], body: bytes) -> None:
        if method == "POST" and not segs:
            return self._create_collection(user, self._json_body(body))
        if len(segs) < 2:
            raise HubError(404, f"Not found: {method} /api/collections/{'/'.join(segs)}")
        collection = self._collection(user, f"{segs[0]}/{segs[1]}")
        if method == "GET" and len(segs) == 2:
            return self._json(collection)
        if method == "POST" and segs[2:] == ["items"]:
            return self._add_collection_item(user, collection, self._json_body(body))
        raise HubError(404, f"Not found: {method} /api/collections/{'/'.join(segs)}")

    def _collection(self, user: User | None, slug: str) -> dict[str, Any]:
        collection = self.hub._collections.get(slug)
        owner = collection["owner"]["name"] if collection else ""
        if collection is None or (collection["private"] and not (user and user.member_of(owner))):
            raise HubError(404, "Collection not found")
        return collection

    def _create_collection(self, user: User | None, payload: dict) -> None:
        title, namespace = payload.get("title"), payload.get("namespace")
        if not isinstance(title, str) or not title.strip() or not isinstance(namespace, str):
            raise HubError(400, "A collection needs a `title` and a `namespace`")
        self._require_write(user, namespace)
        for slug, existing in self.hub._collections.items():
            if existing["owner"]["name"] == namespace and existing["title"] == title:
                raise HubError(409, "You already have a collection with this title", extra={"slug": slug})
        words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "collection"
        slug = f"{namespace}/{words}-{secrets.token_hex(12)}"
        collection = {
            "slug": slug,
            "title": title,
            "description": payload.get("description"),
            "owner": {"name": namespace, "type": "user" if namespace == user.name else "org"},
            "items": [],
            "lastUpdated": _iso(time.time()),
            "position": sum(c["owner"]["name"] == namespace for c in self.hub._collections.values()),
            "private": bool(payload.get("private")),
            "theme": "blue",
            "upvotes": 0,
        }
        self.hub._collections[slug] = collection
        self._json(collection)

    def _add_collection_item(self, user: User | None, collection: dict[str, Any], payload: dict) -> None:
        self._require_write(user, collection["owner"]["name"])
        item = payload.get("item")
        if not isinstance(item, dict) or item.get("type") not in _TYPE_FROM_PLURAL.values():
            raise HubError(400, "`item` must be {'id': repo id, 'type': 'model' | 'dataset' | 'space'}")
        item_id, item_type = str(item.get("id")), item["type"]
        self._repo(item_type, item_id, user)  # 404 for a repo that does not exist (or that the token cannot see)
        if any(i["id"] == item_id and i["type"] == item_type for i in collection["items"]):
            raise HubError(409, "This item is already in the collection")
        entry: dict[str, Any] = {
            "_id": secrets.token_hex(12),
            "id": item_id,
            "type": item_type,
            "position": len(collection["items"]),
        }
        if isinstance(payload.get("note"), str):
            entry["note"] = {"text": payload["note"], "html": payload["note"]}
        collection["items"].append(entry)
        collection["lastUpdated"] = _iso(time.time())
        self._json(collection)

    # ----- read endpoints ----------------------------------------------------------------------------------

    def _card_data(self, commit: Commit) -> dict | None:
        """The YAML front matter of the commit's README.md (what the Hub's info endpoints send as ``cardData``)."""
        entry = commit.files.get("README.md")
        if entry is None:
            return None
        import yaml

        text = self.hub._blobs[entry.sha256].decode("utf-8", errors="replace")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
        try:
            data = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None

    def _info_dict(self, repo: Repo, commit: Commit, *, with_siblings: bool, blobs: bool) -> dict:
        info: dict[str, Any] = {
            "_id": repo.object_id,
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "likes": 0,
            "tags": [],
        }
        if repo.repo_type == "model":
            info.update({"modelId": repo.repo_id, "downloads": 0, "library_name": None})
            card_data = self._card_data(commit)
            if card_data is not None:
                info["cardData"] = card_data  # the README's YAML metadata, as the Hub sends it
        elif repo.repo_type == "dataset":
            info.update({"downloads": 0})
        else:
            subdomain = repo.repo_id.replace("/", "-").replace("_", "-").replace(".", "-").lower()
            info.update({"sdk": repo.sdk, "subdomain": subdomain, "runtime": _space_runtime(repo.requested_hardware)})
        if with_siblings:
            siblings = []
            for path in sorted(commit.files):
                sib: dict[str, Any] = {"rfilename": path}
                if blobs:
                    entry = commit.files[path]
                    sib.update({"size": entry.size, "blobId": self.hub._git_oid(entry)})
                    if entry.lfs:
                        sib["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": len(entry.pointer)}
                siblings.append(sib)
            info["siblings"] = siblings
            info["usedStorage"] = sum(e.size for e in commit.files.values())
        return info

    def _repo_info(
        self, user: User | None, repo_type: str, repo_id: str, revision: str | None, query: dict[str, list[str]]
    ) -> None:
        repo = self._repo(repo_type, repo_id, user)
        oid, _ = self.hub._resolve(repo, revision)
        self._json(self._info_dict(repo, repo.commits[oid], with_siblings=True, blobs=_qbool(query, "blobs")))

    def _file_json(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        entry = commit.files[path]
        item: dict[str, Any] = {"type": "file", "oid": self.hub._git_oid(entry), "size": entry.size, "path": path}
        if entry.lfs:
            item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(entry.pointer)}
        if expand:
            item["lastCommit"] = self._last_commit(repo, commit, lambda c: c.files.get(path))
        return item

    def _dir_json(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        def listing(c: Commit) -> tuple:
            return tuple(sorted((p, e) for p, e in c.files.items() if p.startswith(path + "/")))

        oid = hashlib.sha1(repr(listing(commit)).encode()).hexdigest()
        item: dict[str, Any] = {"type": "directory", "oid": oid, "size": 0, "path": path}
        if expand:
            item["lastCommit"] = self._last_commit(repo, commit, listing)
        return item

    @staticmethod
    def _last_commit(repo: Repo, commit: Commit, key: Any) -> dict:
        current, value = commit, key(commit)
        while current.parent is not None:
            parent = repo.commits[current.parent]
            if key(parent) != value:
                break
            current = parent
        return {"id": current.oid, "title": current.title, "date": _iso(current.date)}

    def _tree(
        self, user: User | None, repo_type: str, repo_id: str, rev: str, path: str, query: dict[str, list[str]]
    ) -> None:
        repo = self._repo(repo_type, repo_id, user)
        commit = repo.commits[self.hub._resolve(repo, rev)[0]]
        recursive, expand = _qbool(query, "recursive"), _qbool(query, "expand")
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        dirs: set[str] = set()
        files: list[str] = []
        for file_path in commit.files:
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if depth > 1 and not recursive:
                    break
                dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.append(file_path)
        if path and not files and not dirs:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", extra={})
        out = [self._dir_json(repo, commit, d, expand) for d in sorted(dirs)]
        out += [self._file_json(repo, commit, f, expand) for f in sorted(files)]
        self._json(out)

    def _paths_info(self, user: User | None, repo_type: str, repo_id: str, rev: str, body: bytes) -> None:
        repo = self._repo(repo_type, repo_id, user)
        commit = repo.commits[self.hub._resolve(repo, rev)[0]]
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            data = self._json_body(body)
            paths, expand = data.get("paths") or [], bool(data.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _qbool(form, "expand")
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(self._file_json(repo, commit, p, expand))
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append(self._dir_json(repo, commit, p, expand))
        self._json(out)

    def _refs(self, user: User | None, repo_type: str, repo_id: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_type, repo_id, user)

        def items(prefix: str) -> list[dict]:
            refs = sorted((r for r in repo.refs if r.startswith(prefix)), key=lambda r: (r != "refs/heads/main", r))
            return [{"name": r[len(prefix) :], "ref": r, "targetCommit": repo.refs[r]} for r in refs]

        out: dict[str, Any] = {"branches": items("refs/heads/"), "converts": [], "tags": items("refs/tags/")}
        if _qbool(query, "include_prs"):
            prs = sorted((r for r in repo.refs if r.startswith("refs/pr/")), key=lambda r: int(r.split("/")[-1]))
            out["pullRequests"] = [{"name": r, "ref": r, "targetCommit": repo.refs[r]} for r in prs]
        self._json(out)

    def _commits(self, user: User | None, repo_type: str, repo_id: str, rev: str, query: dict) -> None:
        repo = self._repo(repo_type, repo_id, user)
        oid: str | None = self.hub._resolve(repo, rev or "main")[0]
        formatted = "formatted" in query.get("expand[]", []) + query.get("expand", [])
        out = []
        while oid is not None:
            c = repo.commits[oid]
            item: dict[str, Any] = {
                "id": c.oid,
                "authors": [{"user": c.author, "avatar": ""}],
                "date": _iso(c.date),
                "title": c.title,
                "message": c.message,
            }
            if formatted:
                item["formatted"] = {"title": c.title, "message": c.message}
            out.append(item)
            oid = c.parent
        self._json(out)

    def _resolve_file(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            user = self._user()
            repo = self._repo(repo_type, repo_id, user)
            oid, _ = hub._resolve(repo, rev)
            entry = repo.commits[oid].files.get(path)
            if entry is None:
                err = HubError(404, f"Entry not found: {path}", "EntryNotFound")
                err.headers["X-Repo-Commit"] = oid
                raise err
            content = hub._blobs[entry.sha256]
            git_oid = hub._git_oid(entry)
        etag = entry.sha256 if entry.lfs else git_oid
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        status, body = 200, content
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
            size = len(content)
            start = end = None
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                else:
                    start, end = max(size - int(match.group(2)), 0), size - 1
            if start is None or end is None or start >= size or start > end:
                err = HubError(416, f"Range not satisfiable: {range_header}")
                err.headers["Content-Range"] = f"bytes */{size}"
                raise err
            status, body = 206, content[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, body, headers)

    # ----- write endpoints ---------------------------------------------------------------------------------

    def _writable_target(
        self, user: User | None, repo_type: str, repo_id: str, rev: str, create_pr: bool
    ) -> tuple[Repo, str, str | None]:
        """Check rights for writing to ``rev`` (or opening a PR against it) -> ``(repo, head_oid, ref)``."""
        repo = self._repo(repo_type, repo_id, user)
        oid, ref = self.hub._resolve(repo, rev)
        pr_author = repo.pr_authors.get(ref or "")
        if create_pr or (pr_author is not None and user is not None and user.name == pr_author):
            # Anyone with a write token who can see the repo may open a pull request and push to their own PR.
            if user is None:
                raise HubError(401, "You must be authenticated to open a pull request")
            if not user.write:
                raise HubError(403, "You don't have the rights to perform this action: this token is read-only")
        else:
            self._require_write(user, repo.namespace)
        return repo, oid, ref

    def _preupload(self, user: User | None, repo_type: str, repo_id: str, rev: str, query: dict, body: bytes) -> None:
        repo, oid, _ = self._writable_target(user, repo_type, repo_id, rev or "main", _qbool(query, "create_pr"))
        files = self._json_body(body).get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected a 'files' list")
        current = repo.commits[oid].files
        out = []
        for item in files:
            path = _check_path(item.get("path"))
            sample = base64.b64decode(item.get("sample") or "")
            lfs = self.hub._wants_lfs(path, int(item.get("size") or 0), sample)
            info: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = current.get(path)
            if existing is not None:
                info["oid"] = existing.sha256 if existing.lfs else self.hub._git_oid(existing)
            out.append(info)
        self._json({"files": out, "commitOid": oid})

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        user = self._user()
        repo = self._repo(repo_type, repo_id, user)
        payload = self._json_body(body)
        operation = payload.get("operation")
        objects = payload.get("objects")
        if not isinstance(objects, list):
            raise HubError(400, "Expected an 'objects' list")
        base = self._base_url()
        out = []
        if operation == "upload":
            if user is None:
                raise HubError(401, "You must be authenticated to upload LFS objects")
            if not user.write:
                raise HubError(403, "You don't have the rights to perform this action: this token is read-only")
            for obj in objects:
                oid, size = str(obj.get("oid", "")).lower(), obj.get("size")
                if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                    out.append({"oid": str(obj.get("oid")), "size": int(size or 0), "error": _lfs_err(422, "Bad")})
                    continue
                item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                stored = self.hub._blobs.get(oid)
                if stored is None or len(stored) != size:
                    q_up = f"size={size}&sig={self.hub._sign('upload', oid, size)}"
                    q_verify = f"size={size}&sig={self.hub._sign('verify', oid, size)}"
                    item["actions"] = {
                        "upload": {"href": f"{base}/__lfs__/upload/{oid}?{q_up}", "expires_in": 3600},
                        "verify": {"href": f"{base}/__lfs__/verify/{oid}?{q_verify}", "expires_in": 3600},
                    }
                out.append(item)
        elif operation == "download":
            for obj in objects:
                oid, size = str(obj.get("oid", "")).lower(), int(obj.get("size") or 0)
                stored = self.hub._blobs.get(oid)
                referenced = any(e.sha256 == oid for c in repo.commits.values() for e in c.files.values())
                if stored is None or not referenced:
                    out.append({"oid": oid, "size": size, "error": _lfs_err(404, "Object does not exist")})
                    continue
                query = f"size={len(stored)}&sig={self.hub._sign('download', oid, len(stored))}"
                href = f"{base}/__lfs__/download/{oid}?{query}"
                out.append({"oid": oid, "size": len(stored), "actions": {"download": {"href": href}}})
        else:
            raise HubError(400, f"Unsupported LFS operation: {operation!r}")
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": out, "hash_algo": "sha256"}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_object(self, method: str, action: str, oid: str, query: dict, body: bytes) -> None:
        hub = self.hub
        try:
            size = int((query.get("size") or ["-1"])[0])
        except ValueError:
            size = -1
        sig = (query.get("sig") or [""])[0]
        if size < 0 or not hmac.compare_digest(sig, hub._sign(action, oid, size)):
            raise HubError(403, "Invalid or missing signature")
        if action == "upload" and method == "PUT":
            if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "Uploaded content does not match the announced oid/size")
            with hub._lock:
                hub._blobs.setdefault(oid, body)
            return self._send(200, b"", {"ETag": f'"{oid}"'})
        if action == "verify" and method == "POST":
            with hub._lock:
                stored = hub._blobs.get(oid)
            if stored is None or len(stored) != size:
                raise HubError(404, "Object not found")
            return self._json({"oid": oid, "size": size})
        if action == "download" and method in ("GET", "HEAD"):
            with hub._lock:
                stored = hub._blobs.get(oid)
            if stored is None:
                raise HubError(404, "Object not found")
            return self._send(200, stored)
        raise HubError(405, "Method not allowed")

    def _commit(self, user: User | None, repo_type: str, repo_id: str, rev: str, query: dict, body: bytes) -> None:
        hub = self.hub
        create_pr = _qbool(query, "create_pr")
        repo, head_oid, ref = self._writable_target(user, repo_type, repo_id, rev or "main", create_pr)
        assert user is not None
        header: dict[str, Any] = {}
        ops: list[tuple[str, dict]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, "Malformed NDJSON commit payload") from None
            if key == "header":
                header = value
            else:
                ops.append((key, value))
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "Commit summary is required")

        parent_commit = header.get("parentCommit")
        base_oid = head_oid
        if parent_commit:
            parent_commit = str(parent_commit).lower()
            if create_pr:
                base_oid = hub._resolve(repo, parent_commit)[0]
            elif not head_oid.startswith(parent_commit):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
        if not create_pr and (ref is None or not ref.startswith(("refs/heads/", "refs/pr/"))):
            raise HubError(400, f"Invalid rev id: {rev} is not a branch")

        files = dict(repo.commits[base_oid].files)
        for key, value in ops:
            if key == "file":
                path = _check_path(value.get("path"))
                encoding = value.get("encoding", "base64")
                raw = value.get("content", "")
                try:
                    content = base64.b64decode(raw, validate=True) if encoding == "base64" else raw.encode()
                except ValueError:
                    raise HubError(400, f"Invalid base64 content for {path}") from None
                files[path] = hub._store(content, lfs=False)
            elif key == "lfsFile":
                path = _check_path(value.get("path"))
                oid = str(value.get("oid", "")).lower()
                stored = hub._blobs.get(oid)
                if stored is None:
                    raise HubError(400, f"LFS object {oid} for {path} was not uploaded")
                if value.get("size") is not None and int(value["size"]) != len(stored):
                    raise HubError(400, f"Size mismatch for LFS file {path}")
                files[path] = FileEntry(size=len(stored), sha256=oid, lfs=True)
            elif key == "deletedFile":
                path = _check_path(value.get("path"))
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = _check_path(str(value.get("path", "")).rstrip("/")) + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {prefix}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unsupported commit operation: {key!r}")

        commit = hub._new_commit(base_oid, files, summary, header.get("description") or "", user.name)
        repo.commits[commit.oid] = commit
        pr_url = None
        if create_pr:
            repo.pr_count += 1
            repo.refs[f"refs/pr/{repo.pr_count}"] = commit.oid
            repo.pr_authors[f"refs/pr/{repo.pr_count}"] = user.name
            pr_url = f"{self._repo_url(repo)}/discussions/{repo.pr_count}"
        else:
            assert ref is not None
            repo.refs[ref] = commit.oid
        self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            }
        )

    def _branch(self, method: str, user: User | None, repo_type: str, repo_id: str, branch: str, body: bytes) -> None:
        repo = self._repo(repo_type, repo_id, user, write=True)
        if not branch or branch.startswith("refs/") or ".." in branch or branch.endswith("/"):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        ref = f"refs/heads/{branch}"
        if method == "DELETE":
            if branch == "main":
                raise HubError(403, "Cannot delete the main branch")
            if ref not in repo.refs:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del repo.refs[ref]
            return self._json({})
        if ref in repo.refs:
            raise HubError(409, f"Reference already exists: {ref}")
        start = self._json_body(body).get("startingPoint") or "main"
        repo.refs[ref] = self.hub._resolve(repo, start)[0]
        self._json({})

    def _tag(self, method: str, user: User | None, repo_type: str, repo_id: str, arg: str, body: bytes) -> None:
        repo = self._repo(repo_type, repo_id, user, write=True)
        if method == "DELETE":
            ref = f"refs/tags/{arg}"
            if ref not in repo.refs:
                raise HubError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
            del repo.refs[ref]
            return self._json({})
        tag = self._json_body(body).get("tag")
        if not isinstance(tag, str) or not tag or tag.startswith("refs/"):
            raise HubError(400, f"Invalid tag name: {tag!r}")
        ref = f"refs/tags/{tag}"
        if ref in repo.refs:
            raise HubError(409, f"Tag already exists: {tag}")
        repo.refs[ref] = self.hub._resolve(repo, arg or "main")[0]
        self._json({})


def _lfs_err(code: int, message: str) -> dict:
    return {"code": code, "message": message}


def _space_flavor(flavor: Any) -> str:
    """A hardware flavor the Hub knows (``huggingface_hub.SpaceHardware``), else the Hub's 400."""
    from huggingface_hub import SpaceHardware

    if flavor not in {h.value for h in SpaceHardware}:
        raise HubError(400, f"Invalid hardware flavor: {flavor!r}")
    return flavor


def _space_runtime(requested: str | None = None) -> dict:
    """A running Space; a hardware request is shown as requested (and current: the server runs nothing)."""
    hardware = requested or "cpu-basic"
    return {
        "stage": "RUNNING",
        "hardware": {"current": hardware, "requested": hardware},
        "storage": None,
        "gcTimeout": 172800,
        "replicas": {"current": 1, "requested": 1},
        "devMode": False,
    }


# --------------------------------------------------------------------------------------------------------------
# Helpers for tests
# --------------------------------------------------------------------------------------------------------------


def start_server(port: int = 0, host: str = "127.0.0.1", **kwargs: Any) -> HubServer:
    """Start a :class:`HubServer` in a daemon thread (``port=0`` picks a free port). Call ``.stop()`` when done.
    Keyword arguments: ``lfs_threshold`` (bytes, default 1 MiB), ``seed_gitattributes`` (new repos start with an
    "initial commit" holding ``.gitattributes``, like the Hub; default True), ``verbose``."""
    return HubServer(host, port, **kwargs).start()


def hub_env(server: HubServer | str, home: str | os.PathLike[str], token: str | None = None) -> dict[str, str]:
    """The environment variables a ``huggingface_hub`` client needs to use ``server`` with cache/config under
    ``home`` (``HF_HOME``). ``token`` becomes ``HF_TOKEN`` (empty string: anonymous). They must be in the
    environment before ``huggingface_hub`` is imported."""
    url = server if isinstance(server, str) else server.url
    return {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_TOKEN": token or "",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
        "HF_HUB_DISABLE_EXPERIMENTAL_WARNING": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


_STRIPPED_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_")
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}


def client_env(
    server: HubServer | str,
    home: str | os.PathLike[str],
    token: str | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A full environment for a client subprocess: ``base`` (default ``os.environ``) without any inherited
    ``HF_*``/``HUGGINGFACE_*``/proxy variables, plus :func:`hub_env`."""
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith(_STRIPPED_ENV_PREFIXES) and k not in _PROXY_VARS
    }
    env.update(hub_env(server, home, token))
    return env


class ClientError(AssertionError):
    """A :func:`run_client` subprocess exited with a non-zero status."""


_RESULT_MARK = "__HUB_CLIENT_RESULT__"

_PRELUDE = f'''
import json as _json, sys as _sys

def emit(obj):
    """Return ``obj`` (JSON-serialisable) to the parent test."""
    _sys.stdout.write("\\n{_RESULT_MARK}" + _json.dumps(obj, default=str) + "\\n")
    _sys.stdout.flush()

def capture(fn, *args, **kwargs):
    """Call fn; return {{"ok": True, "value": ...}} or a description of the exception it raised."""
    try:
        return {{"ok": True, "value": fn(*args, **kwargs)}}
    except BaseException as exc:
        response = getattr(exc, "response", None)
        return {{
            "ok": False,
            "error": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "status": getattr(response, "status_code", None),
            "message": str(exc)[:2000],
        }}
'''


def run_client(
    code: str,
    env: Mapping[str, str],
    *,
    timeout: float = 120,
    check: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> Any:
    """Run ``code`` with ``sys.executable`` in a fresh process with exactly ``env`` (see :func:`client_env`) and
    return the last value it passed to ``emit(obj)`` (``None`` if it never did). ``capture(fn, *a, **kw)`` is also
    predefined. Raises :class:`ClientError` (with stdout/stderr) on a non-zero exit status when ``check``."""
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + "\n" + code],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise ClientError(
            f"client snippet failed with exit status {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"
        )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            result = json.loads(line[len(_RESULT_MARK) :])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Hugging Face Hub server for local testing.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token", action="append", default=[], help="write token (repeatable)")
    parser.add_argument("--read-token", action="append", default=[], help="read-only token (repeatable)")
    parser.add_argument("--user", default="user", help="user name owning the tokens")
    parser.add_argument("--lfs-threshold", type=int, default=DEFAULT_LFS_THRESHOLD)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    server = HubServer(args.host, args.port, lfs_threshold=args.lfs_threshold, verbose=args.verbose)
    for token in args.token:
        server.add_user(token, args.user, write=True)
    for token in args.read_token:
        server.add_user(token, args.user, write=False)
    print(f"Fake Hub listening on {server.url} (user {args.user!r})", flush=True)
    for key, value in hub_env(server, Path.home() / ".cache" / "fake-hub", (args.token or [None])[0]).items():
        print(f"export {key}={value!r}", flush=True)
    try:
        server._httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
