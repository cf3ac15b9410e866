"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only, 127.0.0.1, random port).

Written from what the real ``huggingface_hub`` client (2.4) sends and reads, so that tests run the real
client code over real HTTP with ``HF_ENDPOINT`` pointing here and ``HF_HUB_DISABLE_XET=1``.

Supported (models, datasets and spaces; repo ids ``ns/name`` or ``name``):
  downloads   HEAD/GET ``/{repo}/resolve/{rev}/{path}`` (X-Repo-Commit, ETag, X-Linked-Etag/-Size for LFS
              files, Content-Length, single ``Range`` requests -> 206/416); ``/api/{type}s/{repo}[/revision/{rev}]``
              (sha, siblings with sizes/blobId/lfs); ``tree/{rev}[/{path}]?recursive=``; ``paths-info/{rev}``;
              ``refs``; ``commits/{rev}``.
  uploads     ``/api/repos/create`` (409 when it exists) and ``/api/repos/delete``; ``/api/whoami-v2``;
              ``preupload/{rev}`` (LFS for weight-like suffixes, binary samples or >= 10 MiB, else inline);
              the git-LFS batch API (``{repo}.git/info/lfs/objects/batch``, basic transfer, PUT to a signed URL on
              this server, ``verify``); the NDJSON ``commit/{rev}`` (file, lfsFile, deletedFile, deletedFolder,
              ``parentCommit`` -> 412 when stale, ``create_pr=1`` -> ``refs/pr/N`` + pullRequestUrl);
              ``branch/{name}`` (POST create, DELETE); ``/api/validate-yaml`` (400 on malformed front matter).
  errors      like the Hub: 404 + ``X-Error-Code`` RepoNotFound / RevisionNotFound / EntryNotFound, JSON
              ``{"error": ...}`` and ``X-Error-Message``. Auth (when ``token`` is set): writes need
              ``Authorization: Bearer <token>`` (missing -> 401, wrong -> 403); private repos read as
              RepoNotFound (401 without a token, 404 with a wrong one); gated repos: metadata public, files
              need the token (else GatedRepo 401/403); ``whoami`` -> 401 unless the token is valid.
  test hooks  ``add_repo``, ``files``, ``commits``, ``refs``, ``requests`` log, ``fail_next(n, status)``,
              ``offline()`` (listener closed: the client gets a connection error), ``reset()``.

Not supported: Xet storage, multipart LFS uploads, tags, LFS copies from other repos, discussions beyond the PR
ref, ``.gitignore`` in preupload, pagination, access requests for gated repos, rate limits, ``expand=`` (every
field is always sent; ``cardData`` is the README.md front matter, when there is one), real git
(commit shas are random, not git hashes). Every response closes its connection (no keep-alive), which keeps
``offline()`` and ``stop()`` simple.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import shutil
import sys
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy",
                ".npz", ".pkl", ".pickle", ".joblib", ".model", ".tflite", ".ot", ".arrow", ".parquet", ".zip",
                ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".wasm")
LFS_MIN_SIZE = 10 * 1024 * 1024
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
# Path segments that follow a one-segment repo id (e.g. "gpt2") in /api/{type}s/... urls.
_ACTIONS = {"revision", "tree", "paths-info", "refs", "commits", "preupload", "commit", "branch"}
_LFS_RE = re.compile(r"^/(?:(datasets|spaces)/)?(.+?)\.git/info/lfs/objects/(batch|verify)$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    """The server's choice between an inline (regular) file and an LFS file."""
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    oid: str  # git blob id: of the content (regular) or of the LFS pointer file


@dataclass
class Commit:
    oid: str
    parents: tuple[str, ...]
    title: str
    message: str
    date: str
    tree: dict[str, FileEntry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    gated: bool = False  # file downloads need a valid token (metadata stays readable)
    created_at: str = field(default_factory=_now)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)  # in creation order
    n_prs: int = 0


class HubError(Exception):
    """An error answered as the Hub does: JSON {"error": message}, X-Error-Message and X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


class LocalHub:
    """An in-process Hub: repos in memory, file contents on disk under ``root/objects`` (by sha256)."""

    def __init__(self, root: Path, token: str | None = "hf_test_token", user: str = "test-user"):
        self.root, self.token, self.user = Path(root), token, user
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.requests: list[tuple[str, str]] = []  # (method, url-decoded path without query)
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.RLock()
        self._fail: tuple[int, int] = (0, 503)
        self._secret = secrets.token_bytes(16)  # signs LFS upload urls
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    # ----- lifecycle -----
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.contextmanager
    def offline(self):
        """Close the listening socket for the duration (connection refused), then serve again on the same port.

        Cached files are then served from the cache; an uncached ``hf_hub_download`` retries with backoff (~20 s)
        before failing, so test that path with ``HF_HUB_OFFLINE=1`` / ``local_files_only=True`` instead.
        """
        self.stop()
        try:
            yield self
        finally:
            self.start()

    def reset(self) -> None:
        """Forget all repos, requests and pending failures (for a server shared between tests)."""
        with self._lock:
            self._repos.clear()
            self.requests.clear()
            self._fail = (0, 503)

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` requests (any endpoint) with ``status``."""
        with self._lock:
            self._fail = (n, status)

    # ----- test helpers -----
    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.url}/{prefix}{repo_id}"

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False, gated: bool = False) -> Repo:
        """A new repo with an empty "initial commit" on main (HubError 409 when it exists)."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                url = self.repo_url(repo_id, repo_type)
                raise HubError(409, f"You already created this {repo_type} repo", url=url)
            repo = self._repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private, gated)
            self._new_commit(repo, "main", {}, "initial commit", parents=())
            return repo

    def add_repo(self, repo_id: str, folder: Path | Mapping[str, bytes], repo_type: str = "model",
                 revision: str = "main", private: bool = False, gated: bool = False,
                 message: str = "Add files") -> str:
        """Commit ``folder`` (a directory, or a {path: bytes} mapping) as the whole tree of branch ``revision``.

        Creates the repo (``private``/``gated`` apply then) and the branch (from main) when needed; returns the sha.
        """
        if isinstance(folder, Mapping):
            items = dict(folder)
        else:
            root = Path(folder)
            items = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                     if p.is_file() and ".git" not in p.relative_to(root).parts}
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self.create_repo(repo_id, repo_type, private, gated)
            tree = {path: self._add_blob(data, is_lfs(path, len(data), data[:512])) for path, data in items.items()}
            parent = repo.refs.get(revision) or repo.refs.get("main")
            return self._new_commit(repo, revision, tree, message, parents=(parent,) if parent else ()).oid

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        commit = self._resolve(self._get_repo(repo_type, repo_id), revision)
        return {path: self._object(e.sha256).read_bytes() for path, e in sorted(commit.tree.items())}

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """All commits of the repo (every branch and PR), oldest first."""
        return list(self._get_repo(repo_type, repo_id).commits.values())

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        return dict(self._get_repo(repo_type, repo_id).refs)

    # ----- storage (callers hold the lock where state is mutated) -----
    def _object(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self._object(sha).exists():
            tmp = self._object(sha).with_suffix(f".{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            tmp.replace(self._object(sha))
        return sha

    def _add_blob(self, data: bytes, lfs: bool) -> FileEntry:
        sha = self._store(data)
        oid = git_blob_oid(_lfs_pointer(sha, len(data)) if lfs else data)
        return FileEntry(sha, len(data), lfs, oid)

    def _new_commit(self, repo: Repo, ref: str, tree: dict, title: str, message: str = "",
                    parents: tuple[str, ...] = ()) -> Commit:
        seed = f"{repo.repo_id}\0{parents}\0{sorted((p, e.oid) for p, e in tree.items())}\0{title}\0{_now()}"
        oid = hashlib.sha1((seed + secrets.token_hex(8)).encode()).hexdigest()
        commit = Commit(oid, parents, title, message, _now(), dict(tree))
        repo.commits[oid] = commit
        repo.refs[ref] = oid
        return commit

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, a ``refs/pr/N``, a full sha or a unique sha prefix (>= 7 hex digits)."""
        with self._lock:
            if revision in repo.refs:
                return repo.commits[repo.refs[revision]]
            hits = [c for oid, c in repo.commits.items()
                    if len(revision) >= 7 and re.fullmatch(r"[0-9a-f]+", revision) and oid.startswith(revision)]
        if len(hits) == 1:
            return hits[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    # ----- plumbing -----
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes | dict | list, headers: dict | None = None) -> None:
        headers = dict(headers or {})
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        self.send_response(status)
        for key, value in headers.items():  # header values must be one latin-1 line
            self.send_header(key, " ".join(str(value).split()).encode("ascii", "backslashreplace").decode())
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._read_body()  # always drain the body first, so that error answers reach the client
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        hub = self.hub
        with hub._lock:
            hub.requests.append((self.command, unquote(split.path)))
            n_fail, fail_status = hub._fail
            if n_fail > 0:
                hub._fail = (n_fail - 1, fail_status)
        try:
            if n_fail > 0:
                raise HubError(fail_status, "Simulated failure (LocalHub.fail_next)")
            status, payload, headers = self._route(self.command, split.path, query, body)
        except Exception as e:  # noqa: BLE001 - answer every error: malformed input -> 400, server bug -> 500
            if not isinstance(e, HubError):
                traceback.print_exc()
                bad_input = isinstance(e, (KeyError, ValueError, TypeError))
                e = HubError(400 if bad_input else 500, f"LocalHub: {type(e).__name__}: {e}")
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            status, payload = e.status, {"error": e.message, **e.extra}
        self._send(status, payload, headers)

    # ----- auth -----
    def _auth(self) -> str:
        """"none" (no token sent), "valid" or "invalid"; always "valid" when the hub has no token."""
        if self.hub.token is None:
            return "valid"
        header = self.headers.get("Authorization")
        if not header:
            return "none"
        ok = hmac.compare_digest(header.encode("latin-1"), f"Bearer {self.hub.token}".encode())
        return "valid" if ok else "invalid"

    def _check_write(self) -> None:
        auth = self._auth()
        if auth == "none":
            raise HubError(401, "Invalid username or password.")
        if auth == "invalid":
            raise HubError(403, "You don't have the rights to perform this operation with this token.")

    def _readable(self, repo_type: str, repo_id: str) -> Repo:
        auth = self._auth()
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and auth != "valid"):
            raise HubError(401 if auth == "none" else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_type: str, repo_id: str) -> Repo:
        self._check_write()
        return self._readable(repo_type, repo_id)

    # ----- routing -----
    def _route(self, method: str, path: str, query: dict, body: bytes):
        hub = self.hub
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/api/whoami-v2":
            if self._auth() != "valid":
                raise HubError(401, "Invalid credentials in Authorization header")
            token = {"displayName": "local-hub", "role": "write"}
            return 200, {"type": "user", "id": "0" * 24, "name": hub.user, "fullname": "Test User", "orgs": [],
                         "emailVerified": True, "auth": {"type": "access_token", "accessToken": token}}, {}
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        if path in ("/api/repos/create", "/api/repos/delete") and method in ("POST", "DELETE"):
            return self._create_or_delete_repo(path.endswith("create"), json.loads(body or b"{}"))
        if method == "PUT" and parts[0] == "__lfs" and len(parts) == 2:
            return self._lfs_put(parts[1], query.get("sig", ""), body)
        if method == "POST" and (m := _LFS_RE.match(path)):
            repo = self._writable(_TYPES[m[1]] if m[1] else "model", unquote(m[2]))
            return self._lfs_batch(repo, json.loads(body or b"{}")) if m[3] == "batch" else self._lfs_verify(body)
        if len(parts) >= 3 and parts[0] == "api" and parts[1] in _TYPES:
            rest = parts[2:]
            n = 2 if len(rest) >= 2 and rest[1] not in _ACTIONS else 1
            return self._repo_api(method, _TYPES[parts[1]], unquote("/".join(rest[:n])), rest[n:], query, body)
        repo_type, segs = "model", parts
        if segs[0] in ("datasets", "spaces") and len(segs) > 1:
            repo_type, segs = _TYPES[segs[0]], segs[1:]
        for i in (1, 2):
            if method in ("GET", "HEAD") and len(segs) > i + 2 and segs[i] == "resolve":
                repo = self._readable(repo_type, unquote("/".join(segs[:i])))
                return self._resolve_file(repo, unquote(segs[i + 1]), unquote("/".join(segs[i + 2:])))
        raise HubError(404, f"Not found: {method} {path}")

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict, body: bytes):
        action = rest[0] if rest else None
        rev = unquote(rest[1]) if len(rest) > 1 else "main"
        if method == "GET" and action in (None, "revision"):
            repo = self._readable(repo_type, repo_id)
            return 200, self._info(repo, self.hub._resolve(repo, rev)), {}
        if method == "GET" and action == "tree":
            repo = self._readable(repo_type, repo_id)
            commit = self.hub._resolve(repo, rev)
            recursive = query.get("recursive", "").lower() in ("1", "true")
            return 200, self._tree(commit, unquote("/".join(rest[2:])).strip("/"), recursive), {}
        if method == "POST" and action == "paths-info":
            commit = self.hub._resolve(self._readable(repo_type, repo_id), rev)
            form = parse_qs(body.decode()) if body[:1] != b"{" else json.loads(body)
            return 200, [e for p in form.get("paths", []) for e in self._tree(commit, p.strip("/"), None)], {}
        if method == "GET" and action == "refs":
            return 200, self._refs(self._readable(repo_type, repo_id), query.get("include_prs") == "1"), {}
        if method == "GET" and action == "commits":
            repo = self._readable(repo_type, repo_id)
            commit, history = self.hub._resolve(repo, rev), []
            while commit is not None:
                history.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                                "date": commit.date, "authors": [{"user": self.hub.user}]})
                commit = repo.commits.get(commit.parents[0]) if commit.parents else None
            return 200, history, {}
        if method == "POST" and action == "preupload":
            return self._preupload(self._writable(repo_type, repo_id), rev, json.loads(body or b"{}"))
        if method == "POST" and action == "commit":
            return self._commit(self._writable(repo_type, repo_id), rev, query.get("create_pr") == "1", body)
        if action == "branch" and method in ("POST", "DELETE"):
            return self._branch(self._writable(repo_type, repo_id), rev, method, json.loads(body or b"{}"))
        raise HubError(404, f"Not found: {method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    # ----- read endpoints -----
    @staticmethod
    def _lfs_json(e: FileEntry, oid_key: str) -> dict:  # tree listings say "oid", siblings say "sha256"
        return {"lfs": {oid_key: e.sha256, "size": e.size, "pointerSize": len(_lfs_pointer(e.sha256, e.size))}} \
            if e.lfs else {}

    def _file_json(self, path: str, e: FileEntry) -> dict:
        return {"type": "file", "oid": e.oid, "size": e.size, "path": path, **self._lfs_json(e, "oid")}

    def _info(self, repo: Repo, commit: Commit) -> dict:
        siblings = [{"rfilename": path, "size": e.size, "blobId": e.oid, **self._lfs_json(e, "sha256")}
                    for path, e in sorted(commit.tree.items())]
        return {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else self.hub.user,
                "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at,
                "private": repo.private, "gated": "auto" if repo.gated else False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(e.size for e in commit.tree.values()),
                **({"cardData": card} if (card := self._card_data(commit)) is not None else {})}

    def _card_data(self, commit: Commit) -> dict | None:
        """The YAML metadata of the commit's README.md, as the Hub reports it under ``cardData``."""
        entry = commit.tree.get("README.md")
        if entry is None:
            return None
        text = self.hub._object(entry.sha256).read_bytes().decode("utf-8", "replace")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
        if m is None:
            return None
        import yaml  # not stdlib, but a dependency of huggingface_hub itself

        try:
            data = yaml.safe_load(m[1])
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None

    def _tree(self, commit: Commit, sub: str, recursive: bool | None) -> list[dict]:
        """Entries under ``sub``; ``recursive=None`` means paths-info (the entry at ``sub`` itself, or nothing)."""
        if recursive is None:
            if sub in commit.tree:
                return [self._file_json(sub, commit.tree[sub])]
            is_dir = any(p.startswith(sub + "/") for p in commit.tree)
            return [{"type": "directory", "oid": git_blob_oid(sub.encode()), "size": 0, "path": sub}] if is_dir else []
        prefix = sub + "/" if sub else ""
        dirs: set[str] = set()
        files = []
        for path, e in sorted(commit.tree.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts) if recursive else min(2, len(parts))))
            if recursive or len(parts) == 1:
                files.append(self._file_json(path, e))
        if sub and not files and not dirs:
            raise HubError(404, f"{sub} does not exist on {commit.oid}", "EntryNotFound")
        folders = [{"type": "directory", "oid": git_blob_oid(d.encode()), "size": 0, "path": d} for d in sorted(dirs)]
        return folders + files

    def _refs(self, repo: Repo, include_prs: bool) -> dict:
        with self.hub._lock:
            refs = dict(repo.refs)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                    for n, c in refs.items() if not n.startswith("refs/")]
        prs = [{"name": n, "ref": n, "targetCommit": c} for n, c in refs.items() if n.startswith("refs/pr/")]
        return {"branches": branches, "converts": [], "tags": [], **({"pullRequests": prs} if include_prs else {})}

    def _resolve_file(self, repo: Repo, rev: str, filename: str):
        if repo.gated and self._auth() != "valid":  # a valid token stands for "access granted"
            msg = f"Access to {repo.repo_type} {repo.repo_id} is restricted. You must have access to it."
            raise HubError(401 if self._auth() == "none" else 403, msg, "GatedRepo")
        commit = self.hub._resolve(repo, rev)
        entry = commit.tree.get(filename)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        etag = entry.sha256 if entry.lfs else entry.oid
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream",
                   "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        data, size = self.hub._object(entry.sha256).read_bytes(), entry.size
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", self.headers.get("Range") or "")
        if m is None or not (m[1] or m[2]):  # no (single) range: the whole file
            return 200, data, headers
        start, end = (int(m[1]), int(m[2] or size - 1)) if m[1] else (max(size - int(m[2]), 0), size - 1)
        if start >= size or start > end:
            raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        end = min(end, size - 1)
        return 206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}

    # ----- write endpoints -----
    def _create_or_delete_repo(self, create: bool, payload: dict):
        self._check_write()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        url = self.hub.repo_url(repo_id, repo_type)
        if not create:
            with self.hub._lock:
                if self.hub._repos.pop((repo_type, repo_id), None) is None:
                    raise HubError(404, "Repository not found", "RepoNotFound")
            return 200, b"", {}
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        self.hub.create_repo(repo_id, repo_type, private)  # HubError 409 when it exists
        return 200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}, {}

    def _validate_yaml(self, payload: dict):
        content = payload.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if m is not None:
            import yaml  # not stdlib, but a dependency of huggingface_hub itself

            try:
                data = yaml.safe_load(m[1])
                if data is not None and not isinstance(data, dict):
                    raise ValueError("metadata must be a YAML mapping")
            except (yaml.YAMLError, ValueError) as e:
                msg = f"Invalid YAML metadata: {e}"
                return 400, {"errors": [{"message": msg}], "warnings": [], "error": msg}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _preupload(self, repo: Repo, rev: str, payload: dict):
        commit = self.hub._resolve(repo, rev)
        files = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = is_lfs(f["path"], int(f["size"]), sample)
            old = commit.tree.get(f["path"])
            remote_oid = None if old is None else (old.sha256 if old.lfs else old.oid)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": remote_oid})
        return 200, {"files": files, "commitOid": commit.oid}, {}

    def _lfs_sig(self, oid: str) -> str:
        return hmac.new(self.hub._secret, oid.encode(), hashlib.sha256).hexdigest()

    def _lfs_batch(self, repo: Repo, payload: dict):
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' operation is supported by LocalHub")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            out = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub._object(oid).exists():
                prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
                out["actions"] = {
                    "upload": {"href": f"{self.hub.url}/__lfs/{oid}?sig={self._lfs_sig(oid)}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/{prefix}{repo.repo_id}.git/info/lfs/objects/verify",
                               "header": {}},
                }
            objects.append(out)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _lfs_put(self, oid: str, sig: str, body: bytes):
        if not hmac.compare_digest(sig.encode(), self._lfs_sig(oid).encode()):
            raise HubError(403, "Invalid upload signature")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match sha256 {oid}")
        with self.hub._lock:
            self.hub._store(body)
        return 200, b"", {"ETag": f'"{oid}"'}

    def _lfs_verify(self, body: bytes):
        obj = json.loads(body or b"{}")
        path = self.hub._object(str(obj.get("oid")))
        if not path.exists() or path.stat().st_size != obj.get("size"):
            raise HubError(404, f"LFS object {obj.get('oid')} not found")
        return 200, {"success": True}, {}

    def _branch(self, repo: Repo, branch: str, method: str, payload: dict):
        hub = self.hub
        with hub._lock:
            if method == "DELETE":
                if branch not in repo.refs or branch == "main":
                    raise HubError(404 if branch != "main" else 403, f"Cannot delete branch {branch}")
                del repo.refs[branch]
                return 200, b"", {}
            if branch in repo.refs:
                raise HubError(409, "Reference already exists")
            if branch.startswith("refs/"):
                raise HubError(400, f"Invalid reference for a branch: {branch}")
            repo.refs[branch] = hub._resolve(repo, payload.get("startingPoint") or "main").oid
        return 200, b"", {}

    def _commit(self, repo: Repo, rev: str, create_pr: bool, body: bytes):
        hub = self.hub
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        with hub._lock:
            if rev not in repo.refs:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo.refs[rev]
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head].tree)
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    tree[value["path"]] = hub._add_blob(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    obj = hub._object(value["oid"])
                    if not obj.exists():
                        raise HubError(422, f"LFS object {value['oid']} was not uploaded")
                    size = obj.stat().st_size
                    oid = git_blob_oid(_lfs_pointer(value["oid"], size))
                    tree[value["path"]] = FileEntry(value["oid"], size, True, oid)
                elif key == "deletedFile":
                    if tree.pop(value["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    gone = [p for p in tree if p.startswith(prefix)]
                    if not gone:
                        raise HubError(404, f"A folder with this name doesn't exist: {value['path']}", "EntryNotFound")
                    for p in gone:
                        del tree[p]
                elif key != "header":
                    raise HubError(400, f"Unsupported commit operation: {key}")
            title, message = header.get("summary") or "Commit", header.get("description") or ""
            ref = rev
            if create_pr:
                repo.n_prs += 1
                ref = f"refs/pr/{repo.n_prs}"
            commit = hub._new_commit(repo, ref, tree, title, message, parents=(head,))
        out = {"success": True, "commitOid": commit.oid, "hookOutput": "",
               "commitUrl": f"{hub.repo_url(repo.repo_id, repo.repo_type)}/commit/{commit.oid}"}
        if create_pr:
            out["pullRequestUrl"] = f"{hub.repo_url(repo.repo_id, repo.repo_type)}/discussions/{repo.n_prs}"
        return 200, out, {}


# ----- pointing huggingface_hub (env + already-imported modules) at a server -----
def configure_hf_client(monkeypatch: pytest.MonkeyPatch, endpoint: str, token: str | None, hf_home: Path) -> None:
    """Make in-process calls and subprocesses use ``endpoint``, ``token`` and a fresh cache under ``hf_home``.

    The environment covers subprocesses and modules imported later; the attribute patches cover what
    ``huggingface_hub`` (and transformers / datasets, when already imported) computed at import time.
    """
    from huggingface_hub import constants
    from huggingface_hub.hf_api import api
    from huggingface_hub.utils import _http

    hf_home = Path(hf_home)
    hub_cache, assets = str(hf_home / "hub"), str(hf_home / "assets")
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE",
                "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HUGGINGFACE_CO_STAGING",
                "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_DATASETS_CACHE", "HF_MODULES_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)  # read by get_token() at every call

    host = urlsplit(endpoint).hostname or "127.0.0.1"
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {host},
        "HF_HOME": str(hf_home), "HF_HUB_CACHE": hub_cache, "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets, "HUGGINGFACE_ASSETS_CACHE": assets, "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"), "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True, "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    # Bound at import: the module-level HfApi behind huggingface_hub.upload_folder & co, the hosts the
    # client follows redirects to with the auth header, and names imported with `from ..constants import X`.
    monkeypatch.setattr(api, "endpoint", endpoint)
    monkeypatch.setattr(api, "_whoami_cache", {}, raising=False)
    if hasattr(_http, "_HUB_ORIGINS"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    for module, name, value in [
        ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", hub_cache),
        ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", assets),
        ("huggingface_hub.utils._git_credential", "ENDPOINT", endpoint),
        ("transformers.utils.hub", "HF_MODULES_CACHE", str(hf_home / "modules")),
        ("transformers.dynamic_module_utils", "HF_MODULES_CACHE", str(hf_home / "modules")),
        ("datasets.config", "HF_ENDPOINT", endpoint),
        ("datasets.config", "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"),
        ("datasets.config", "HF_HUB_OFFLINE", False),
        ("datasets.config", "HF_DATASETS_OFFLINE", False),
        ("datasets.config", "HF_CACHE_HOME", str(hf_home)),
        ("datasets.config", "HF_DATASETS_CACHE", hf_home / "datasets"),
        ("datasets.config", "HF_MODULES_CACHE", hf_home / "modules"),
    ]:
        if module in sys.modules and hasattr(sys.modules[module], name):
            monkeypatch.setattr(sys.modules[module], name, value)
    _http.close_session()  # no pooled connection to a previous server


@pytest.fixture
def local_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """A started LocalHub (token ``hf_test_token``, user ``test-user``) with huggingface_hub pointed at it."""
    hub = LocalHub(tmp_path_factory.mktemp("local_hub"))
    hub.start()
    configure_hf_client(monkeypatch, hub.url, hub.token, tmp_path_factory.mktemp("hf_home"))
    try:
        yield hub
    finally:
        hub.stop()
        from huggingface_hub.utils import _http

        _http.close_session()
        shutil.rmtree(hub.root, ignore_errors=True)
