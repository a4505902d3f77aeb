"""A local Hugging Face Hub-compatible HTTP server for tests and offline use, standard library only.

Point the unmodified ``huggingface_hub`` client at it with ``HF_ENDPOINT=http://127.0.0.1:PORT`` (set before
the import, or pass ``endpoint=``), ``HF_HUB_DISABLE_TELEMETRY=1`` and a token from ``LocalHub.tokens``.
It speaks what ``huggingface_hub`` 2.4 uses for repos, commits, branches, tags, listings, downloads (ranged
too) and the Git LFS upload path, keeps a real commit history, and can inject faults (error statuses,
connection resets, delays, truncated bodies) for retry tests. It never speaks Xet.

Differences from huggingface.co worth knowing: every valid token may read and write every repo; a new repo
starts with one commit holding ``.gitattributes``; ``ETag`` is the sha256 of the file for every file (the Hub
sends the git sha1 for non-LFS files); pull requests, gating and Xet are not implemented.

Run it by hand with ``python -m checkpointer.testing.hub_server --port 8765 [--root DIR]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import mmap
import os
import re
import secrets
import socket
import struct
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from checkpointer.testing.faults import FaultQueue

__all__ = ["HubError", "HubStore", "LocalHub", "RequestRecord", "main"]

REPO_TYPES = ("model", "dataset", "space")
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
GITATTRIBUTES = (
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.pt filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*tfevents* filter=lfs diff=lfs merge=lfs -text\n"
).encode()


def _now() -> str:
    """The current UTC time in the Hub's date format."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file that stands for a blob in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An HTTP error answer: status, ``X-Error-Code`` and message, plus optional headers and JSON fields."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.extra = dict(headers or {}), extra


# --------------------------------------------------------------------------------------------- storage


@dataclass
class Commit:
    """One commit: its parent and the full tree ``{path: blob sha256}`` at that point."""

    id: str
    parent: str | None
    tree: dict[str, str]
    title: str
    message: str
    date: str
    author: str


@dataclass
class Repo:
    """A repository: branches and tags pointing at commits of its history."""

    repo_type: str
    repo_id: str
    private: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


class HubStore:
    """Repos and content-addressed blobs, in memory or under a directory; every method is thread-safe."""

    def __init__(self, root: str | None = None):
        self.root = Path(root) if root else None
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._sha1: dict[str, str] = {}
        if self.root:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            self._load()

    # blobs
    def _blob_path(self, sha: str) -> Path:
        return self.root / "blobs" / sha[:2] / sha[2:]  # type: ignore[operator]

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` and return its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if self.root is None:
            self._blobs.setdefault(sha, data)
        elif not self._blob_path(sha).exists():
            path = self._blob_path(sha)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def has_blob(self, sha: str) -> bool:
        return sha in self._blobs if self.root is None else self._blob_path(sha).exists()

    def blob(self, sha: str) -> bytes:
        return self._blobs[sha] if self.root is None else self._blob_path(sha).read_bytes()

    def blob_view(self, sha: str) -> memoryview:
        """A zero-copy view of a blob (memory-mapped when stored on disk), for slicing out ranges."""
        if self.root is None or self.blob_size(sha) == 0:
            return memoryview(self._blobs[sha] if self.root is None else b"")
        with open(self._blob_path(sha), "rb") as f:
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def blob_size(self, sha: str) -> int:
        return len(self._blobs[sha]) if self.root is None else self._blob_path(sha).stat().st_size

    def blob_sha1(self, sha: str) -> str:
        """The git sha1 of a stored blob (cached)."""
        if sha not in self._sha1:
            self._sha1[sha] = git_blob_sha1(self.blob(sha))
        return self._sha1[sha]

    # repos
    def repo(self, repo_type: str, repo_id: str) -> Repo:
        """The repo, or a 404 ``RepoNotFound``."""
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository {repo_type}/{repo_id} not found")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> Repo:
        """Create a repo whose ``main`` holds one initial commit; 409 if it exists."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, None, f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_type, repo_id, private, _now())
            tree = {".gitattributes": self.put_blob(GITATTRIBUTES)}
            first = self._new_commit(repo, None, tree, "initial commit", "", author)
            repo.branches["main"] = first.id
            self.repos[(repo_type, repo_id)] = repo
            self._save()
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.repo(repo_type, repo_id)
            del self.repos[(repo_type, repo_id)]
            self._save()

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """The commit a branch, tag, full or short (7+ hex) commit id names; 404 ``RevisionNotFound`` if none."""
        with self.lock:
            sha = repo.branches.get(revision) or repo.tags.get(revision)
            if sha is None and revision in repo.commits:
                sha = revision
            if sha is None and re.fullmatch(r"[0-9a-f]{7,39}", revision):
                found = [c for c in repo.commits if c.startswith(revision)]
                sha = found[0] if len(found) == 1 else None
            if sha is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo.commits[sha]

    def history(self, repo: Repo, revision: str) -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        with self.lock:
            commit: Commit | None = self.resolve(repo, revision)
            out = []
            while commit is not None:
                out.append(commit)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return out

    def commit(self, repo: Repo, branch: str, apply: Callable[[dict[str, str]], None], title: str,
               message: str, author: str, parent: str | None = None) -> Commit:
        """Apply ``apply`` to a copy of the head tree of ``branch`` and record it as a new commit.

        ``parent``, when given, must be the branch head (412 otherwise): a stale writer must not win.
        """
        with self.lock:
            head = repo.branches.get(branch)
            if head is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch} is not a branch")
            if parent is not None and parent != head:
                raise HubError(412, None, f"A commit has happened since. Please refresh and try again. "
                                          f"(parentCommit {parent} is not the head {head} of {branch})")
            tree = dict(repo.commits[head].tree)
            apply(tree)
            new = self._new_commit(repo, head, tree, title, message, author)
            repo.branches[branch] = new.id
            self._save()
            return new

    def set_ref(self, repo: Repo, kind: str, name: str, sha: str | None, exists_ok: bool = False) -> None:
        """Point branch or tag ``name`` (``kind`` = "branches" | "tags") at ``sha``, or delete it if None."""
        with self.lock:
            refs: dict[str, str] = getattr(repo, kind)
            if sha is None and name not in refs:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {name}")
            if sha is not None and name in refs and not exists_ok:
                raise HubError(409, None, f"Reference already exists: {name}")
            if sha is None:
                del refs[name]
            else:
                refs[name] = sha
            self._save()

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict[str, str], title: str, message: str,
                    author: str) -> Commit:
        date = _now()
        seed = json.dumps([parent, sorted(tree.items()), title, message, date, uuid.uuid4().hex])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, tree, title, message, date, author)
        repo.commits[commit.id] = commit
        return commit

    # persistence
    def _save(self) -> None:
        if self.root is None:
            return
        state = [asdict(repo) for repo in self.repos.values()]
        tmp = self.root / f"state.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.root / "state.json")

    def _load(self) -> None:
        path = self.root / "state.json"  # type: ignore[operator]
        for raw in json.loads(path.read_text()) if path.exists() else []:
            commits = {sha: Commit(**c) for sha, c in raw.pop("commits").items()}
            repo = Repo(**raw, commits=commits)
            self.repos[(repo.repo_type, repo.repo_id)] = repo


# --------------------------------------------------------------------------------------------- HTTP API


@dataclass
class Request:
    """What a route handler sees of a request."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    base_url: str
    user: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body as JSON (``{}`` when empty); 400 if it is not JSON."""
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise HubError(400, None, f"Invalid JSON body: {e}") from None

    def ndjson(self) -> list[dict]:
        """The body as newline-delimited JSON objects."""
        try:
            return [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, None, f"Invalid NDJSON body: {e}") from None

    def form(self) -> dict[str, list[str]]:
        """The body as a form (``application/x-www-form-urlencoded``)."""
        return parse_qs(self.body.decode(), keep_blank_values=True)

    def arg(self, name: str, default: str | None = None) -> str | None:
        """A URL path parameter (unquoted) or else a query argument."""
        if self.params.get(name) is not None:
            return unquote(self.params[name])
        return self.query.get(name, [default])[0]


@dataclass
class Response:
    """A full answer: status, headers and body (``Content-Length`` is added when sent)."""

    status: int = 200
    body: bytes | memoryview = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


def error_response(error: HubError) -> Response:
    """A JSON error with ``X-Error-Code`` / ``X-Error-Message``, as the client's error mapping expects."""
    headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode(), **error.headers}
    if error.code:
        headers["X-Error-Code"] = error.code
    return json_response({"error": error.message, **error.extra}, error.status, headers)


_TYPE_OF = {"models": "model", "datasets": "dataset", "spaces": "space", "": "model", "datasets/": "dataset",
            "spaces/": "space"}
_T = r"/api/(?P<t>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_P = r"/(?P<prefix>(?:datasets/|spaces/)?)(?P<repo>[^/]+/[^/]+)"
ROUTES: list[tuple[str, str, str]] = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", _T, "repo_info"),
    ("GET", _T + r"/revision/(?P<rev>[^/]+)", "repo_info"),
    ("GET", _T + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", _T + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", _T + r"/refs", "refs"),
    ("GET", _T + r"/commits/(?P<rev>[^/]+)", "list_commits"),
    ("POST", _T + r"/branch/(?P<name>[^/]+)", "create_branch"),
    ("DELETE", _T + r"/branch/(?P<name>[^/]+)", "delete_branch"),
    ("POST", _T + r"/tag/(?P<rev>[^/]+)", "create_tag"),
    ("DELETE", _T + r"/tag/(?P<name>[^/]+)", "delete_tag"),
    ("POST", _T + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", _T + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("HEAD", _P + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", _P + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("POST", _P + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})/(?P<sig>[0-9a-f]{64})", "lfs_put"),
]


class HubApi:
    """The route handlers: each takes a ``Request`` and returns a ``Response`` or raises ``HubError``."""

    def __init__(self, hub: "LocalHub"):
        self.hub, self.store = hub, hub.store
        self._routes = [(m, re.compile(p + r"/?"), getattr(self, name)) for m, p, name in ROUTES]
        self._lfs_key = secrets.token_bytes(32)

    def dispatch(self, req: Request) -> Response:
        """Authenticate, route on the raw path, turn ``HubError`` into its answer."""
        try:
            req.user = self._user(req)
            for method, pattern, handler in self._routes:
                match = pattern.fullmatch(req.path)
                if match and method == req.method:
                    req.params = match.groupdict()
                    return handler(req)
            raise HubError(404, None, f"No route for {req.method} {req.path}")
        except HubError as e:
            return error_response(e)

    # helpers
    def _user(self, req: Request) -> str | None:
        """The user a Bearer token names; 401 for a token that is not valid, None without one."""
        auth = req.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[7:] if auth.lower().startswith("bearer ") else auth
        user = self.hub.tokens.get(token.strip())
        if user is None:
            raise HubError(401, "Unauthorized", "Invalid credentials in Authorization header")
        return user

    @staticmethod
    def _need_user(req: Request) -> str:
        if req.user is None:
            raise HubError(401, "Unauthorized", "You must be authenticated: pass a valid token")
        return req.user

    def _repo(self, req: Request, write: bool = False) -> Repo:
        """The repo the URL names, checking read (private) or write access."""
        repo_type = _TYPE_OF[req.params.get("t") or req.params.get("prefix") or ""]
        repo = self.store.repo(repo_type, req.params["repo"])
        if (write or repo.private) and req.user is None:
            raise HubError(401, "RepoNotFound", f"Repository {req.params['repo']} not found or needs a token")
        return repo

    def _commit(self, req: Request, repo: Repo) -> Commit:
        return self.store.resolve(repo, req.arg("rev") or "main")

    def _repo_url(self, req: Request, repo: Repo) -> str:
        return f"{req.base_url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _is_lfs(self, size: int) -> bool:
        threshold = self.hub.lfs_threshold
        return threshold is not None and size > 0 and size >= threshold

    def _file_entry(self, path: str, sha: str) -> dict:
        """A tree entry for a file: git ``oid``, ``size``, and ``lfs`` for files stored in LFS."""
        size = self.store.blob_size(sha)
        if not self._is_lfs(size):
            return {"type": "file", "path": path, "size": size, "oid": self.store.blob_sha1(sha)}
        pointer = lfs_pointer(sha, size)
        lfs = {"oid": sha, "size": size, "pointerSize": len(pointer)}
        return {"type": "file", "path": path, "size": size, "oid": git_blob_sha1(pointer), "lfs": lfs}

    @staticmethod
    def _dir_entry(path: str, tree: dict[str, str]) -> dict:
        inside = sorted((p, s) for p, s in tree.items() if p.startswith(path + "/"))
        return {"type": "directory", "path": path, "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest()}

    def _entries(self, tree: dict[str, str], base: str, recursive: bool) -> list[dict]:
        """Files and folders under ``base`` ("" = root), sorted; 404 ``EntryNotFound`` if it is no folder."""
        prefix = base + "/" if base else ""
        below = [p for p in tree if p.startswith(prefix)]
        if base and not below:
            raise HubError(404, "EntryNotFound", f"Folder {base} does not exist")
        dirs: set[str] = set()
        files = []
        for path in below:
            parts = path[len(prefix):].split("/")
            depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
            dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
            if recursive or len(parts) == 1:
                files.append(path)
        entries = [self._dir_entry(d, tree) for d in dirs] + [self._file_entry(p, tree[p]) for p in files]
        return sorted(entries, key=lambda e: e["path"])

    def _paged(self, req: Request, items: list) -> Response:
        """One page of ``items`` with a ``Link: <next>; rel="next"`` header while more remain."""
        start, size = int(req.arg("cursor") or 0), max(1, self.hub.page_size)
        headers = {}
        if start + size < len(items):
            query = {k: v[0] for k, v in req.query.items()} | {"cursor": str(start + size)}
            headers["Link"] = f'<{req.base_url}{req.path}?{urlencode(query)}>; rel="next"'
        return json_response(items[start : start + size], headers=headers)

    # routes
    def whoami(self, req: Request) -> Response:
        user = self._need_user(req)
        token_info = {"displayName": "local", "role": "write"}
        return json_response({"type": "user", "id": user, "name": user, "fullname": user, "orgs": [],
                              "auth": {"type": "access_token", "accessToken": token_info}})

    def _named_repo(self, req: Request) -> tuple[str, str, str]:
        """(user, repo type, repo id) from a create/delete body."""
        user, body = self._need_user(req), req.json()
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES or not body.get("name"):
            raise HubError(400, None, f"Invalid repo type or name: {repo_type!r} {body.get('name')!r}")
        return user, repo_type, f"{body.get('organization') or user}/{body['name']}"

    def create_repo(self, req: Request) -> Response:
        user, repo_type, repo_id = self._named_repo(req)
        body = req.json()
        private = bool(body.get("private")) or body.get("visibility") == "private"
        url = f"{req.base_url}/{URL_PREFIXES[repo_type]}{repo_id}"
        try:
            self.store.create_repo(repo_type, repo_id, private, user)
        except HubError as e:
            raise HubError(e.status, e.code, e.message, url=url) from None
        return json_response({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self, req: Request) -> Response:
        _, repo_type, repo_id = self._named_repo(req)
        self.store.delete_repo(repo_type, repo_id)
        return json_response({})

    def validate_yaml(self, req: Request) -> Response:
        return json_response({"errors": [], "warnings": []})

    def repo_info(self, req: Request) -> Response:
        repo = self._repo(req)
        commit = self._commit(req, repo)
        siblings = [self._file_entry(p, s) for p, s in sorted(commit.tree.items())]
        return json_response({
            "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.id, "private": repo.private,
            "gated": False, "disabled": False, "lastModified": commit.date, "createdAt": repo.created,
            "downloads": 0, "likes": 0, "tags": [], "siblings": [_sibling(e) for e in siblings],
        })

    def tree(self, req: Request) -> Response:
        commit = self._commit(req, self._repo(req))
        recursive = (req.arg("recursive") or "").lower() in ("1", "true")
        return self._paged(req, self._entries(commit.tree, (req.arg("path") or "").strip("/"), recursive))

    def paths_info(self, req: Request) -> Response:
        commit = self._commit(req, self._repo(req))
        is_json = "json" in req.headers.get("Content-Type", "")
        paths = req.json().get("paths", []) if is_json else req.form().get("paths", [])
        out = []
        for path in (p.strip("/") for p in paths):
            if path in commit.tree:
                out.append(self._file_entry(path, commit.tree[path]))
            elif any(p.startswith(path + "/") for p in commit.tree):
                out.append(self._dir_entry(path, commit.tree))
        return json_response(out)

    def refs(self, req: Request) -> Response:
        repo = self._repo(req)
        with self.store.lock:
            def refs_of(kind: str, refs: dict[str, str]) -> list[dict]:
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s} for n, s in sorted(refs.items())]
            return json_response({"branches": refs_of("heads", repo.branches), "tags": refs_of("tags", repo.tags),
                                  "converts": [], "pullRequests": []})

    def list_commits(self, req: Request) -> Response:
        commits = self.store.history(self._repo(req), req.arg("rev") or "main")
        return self._paged(req, [{"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                                  "authors": [{"user": c.author}]} for c in commits])

    def create_branch(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        start = self.store.resolve(repo, req.json().get("startingPoint") or "main")
        self.store.set_ref(repo, "branches", req.arg("name") or "", start.id)
        return json_response({})

    def delete_branch(self, req: Request) -> Response:
        repo, name = self._repo(req, write=True), req.arg("name") or ""
        if name == "main":
            raise HubError(403, None, "Cannot delete the main branch")
        self.store.set_ref(repo, "branches", name, None)
        return json_response({})

    def create_tag(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        target, tag = self._commit(req, repo), req.json().get("tag")
        if not tag:
            raise HubError(400, None, "Missing tag name")
        self.store.set_ref(repo, "tags", tag, target.id)
        return json_response({})

    def delete_tag(self, req: Request) -> Response:
        self.store.set_ref(self._repo(req, write=True), "tags", req.arg("name") or "", None)
        return json_response({})

    def preupload(self, req: Request) -> Response:
        head = self._commit(req, self._repo(req, write=True))
        out = []
        for item in req.json().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            entry = {"path": path, "uploadMode": "lfs" if self._is_lfs(size) else "regular", "shouldIgnore": False}
            if path in head.tree:
                existing = self._file_entry(path, head.tree[path])
                entry["oid"] = existing["lfs"]["oid"] if "lfs" in existing else existing["oid"]
            out.append(entry)
        return json_response({"files": out, "commitOid": head.id})

    def commit(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        if req.arg("create_pr") in ("1", "true", "True"):
            raise HubError(400, None, "LocalHub does not implement pull requests (create_pr)")
        lines = req.ndjson()
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "The commit body must start with a header line")
        header, ops = lines[0]["value"], lines[1:]
        unknown = [op.get("key") for op in ops if op.get("key") not in _OPERATIONS]
        if unknown:
            raise HubError(400, None, f"Unknown commit operations: {unknown}")

        def apply(tree: dict[str, str]) -> None:
            for op in ops:
                try:
                    _OPERATIONS[op["key"]](self.store, tree, op["value"])
                except (KeyError, TypeError, ValueError) as e:
                    raise HubError(400, None, f"Malformed commit operation {op}: {e!r}") from None

        commit = self.store.commit(repo, req.arg("rev") or "main", apply, header.get("summary") or "",
                                   header.get("description") or "", req.user or "", header.get("parentCommit"))
        url = f"{self._repo_url(req, repo)}/commit/{commit.id}"
        return json_response({"commitUrl": url, "commitOid": commit.id, "pullRequestUrl": None})

    def resolve(self, req: Request) -> Response:
        commit = self._commit(req, self._repo(req))
        path = unquote(req.params["path"])
        if path not in commit.tree:
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {commit.id}",
                           {"X-Repo-Commit": commit.id})
        sha = commit.tree[path]
        data = self.store.blob_view(sha)
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        return _ranged(data, req.headers.get("Range"), headers)

    def lfs_batch(self, req: Request) -> Response:
        self._repo(req, write=True)
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(400, None, "LocalHub's LFS batch endpoint only does uploads")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.store.has_blob(oid):
                href = f"{req.base_url}/lfs-upload/{oid}/{self._lfs_sig(oid)}"
                entry["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(entry)
        return json_response({"transfer": "basic", "objects": objects},
                             headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_sig(self, oid: str) -> str:
        return hmac.new(self._lfs_key, oid.encode(), hashlib.sha256).hexdigest()

    def lfs_put(self, req: Request) -> Response:
        oid = req.params["oid"]
        if not hmac.compare_digest(req.params["sig"], self._lfs_sig(oid)):
            raise HubError(403, None, "Invalid LFS upload URL")
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, None, f"Uploaded content does not match sha256 {oid}")
        self.store.put_blob(req.body)
        return Response(200)


def _sibling(entry: dict) -> dict:
    """A ``siblings`` item of repo info, from a tree entry."""
    out = {"rfilename": entry["path"], "size": entry["size"], "blobId": entry["oid"]}
    if "lfs" in entry:
        lfs = entry["lfs"]
        out["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
    return out


def _ranged(data: memoryview, range_header: str | None, headers: dict[str, str]) -> Response:
    """200 with ``data``, or 206 + ``Content-Range`` for one ``bytes=`` range, or 416 past the end."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header or "")
    if not match or match.groups() == ("", ""):
        return Response(200, data, headers)
    first, last, size = match.group(1), match.group(2), len(data)
    start = int(first) if first else max(0, size - int(last))
    end = min(int(last), size - 1) if first and last else size - 1
    if start >= size or end < start:
        return Response(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
    return Response(206, data[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{size}"})


def _put(tree: dict[str, str], path: str, sha: str) -> None:
    """Set ``path`` in ``tree``, refusing bad paths and a file where a folder is (or the reverse)."""
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts):
        raise HubError(400, None, f"Invalid path in repo: {path!r}")
    parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
    if any(parent in tree for parent in parents) or any(p.startswith(path + "/") for p in tree):
        raise HubError(409, None, f"{path} conflicts with an existing file or folder")
    tree[path] = sha


def _op_file(store: HubStore, tree: dict[str, str], value: dict) -> None:
    _put(tree, value["path"], store.put_blob(base64.b64decode(value.get("content", ""), validate=True)))


def _op_lfs_file(store: HubStore, tree: dict[str, str], value: dict) -> None:
    if not store.has_blob(value["oid"]):
        raise HubError(422, None, f"LFS object {value['oid']} for {value['path']} was not uploaded")
    _put(tree, value["path"], value["oid"])


def _op_deleted_file(store: HubStore, tree: dict[str, str], value: dict) -> None:
    if tree.pop(value["path"], None) is None:
        raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")


def _op_deleted_folder(store: HubStore, tree: dict[str, str], value: dict) -> None:
    prefix = value["path"].strip("/") + "/"
    doomed = [p for p in tree if p.startswith(prefix) or prefix == "/"]
    if not doomed:
        raise HubError(404, "EntryNotFound", f"A folder with this name doesn't exist: {value['path']}")
    for path in doomed:
        del tree[path]


_OPERATIONS: dict[str, Callable[[HubStore, dict[str, str], dict], None]] = {
    "file": _op_file, "lfsFile": _op_lfs_file, "deletedFile": _op_deleted_file, "deletedFolder": _op_deleted_folder,
}


# --------------------------------------------------------------------------------------------- faults, transport


class RequestRecord(NamedTuple):
    """One logged request: raw path (with query), ``Range`` header, status (0 = reset), body bytes sent,
    and the seconds an injected fault delayed the answer (0.0 when none did)."""

    method: str
    path: str
    range: str | None
    status: int
    bytes_sent: int
    delay: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    """Reads a whole request, applies any fault, asks the API and writes a keep-alive-safe answer."""

    protocol_version = "HTTP/1.1"
    timeout = 300
    server: "_Server"

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence per-request logging
        pass

    def _serve(self) -> None:
        hub = self.server.hub
        fault = hub.faults.take(self.command, self.path)
        self._delay = fault.delay if fault else 0.0
        if fault and fault.delay:
            time.sleep(fault.delay)
        if fault and fault.reset:
            self._reset()
            return
        body = self._read_body()
        if fault and fault.status:
            response = error_response(HubError(fault.status, None, f"Injected fault: HTTP {fault.status}"))
        else:
            response = self._dispatch(body)
        self._send(response, truncate=bool(fault and fault.truncate))

    def _dispatch(self, body: bytes) -> Response:
        hub = self.server.hub
        split = urlsplit(self.path)
        base = f"http://{self.headers.get('Host') or hub.endpoint.split('://', 1)[1]}"
        req = Request(self.command, split.path, parse_qs(split.query, keep_blank_values=True), self.headers,
                      body, base)
        try:
            return hub._api.dispatch(req)
        except Exception as e:  # a server bug must still answer, and be visible
            traceback.print_exc()
            return error_response(HubError(500, None, f"LocalHub internal error: {e!r}"))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, response: Response, truncate: bool) -> None:
        body = b"" if self.command == "HEAD" else response.body
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if truncate:
            body, self.close_connection = body[: len(body) // 2], True
        self.wfile.write(body)
        self.wfile.flush()
        self._log(response.status, len(body))

    def _reset(self) -> None:
        """Drop the connection with a TCP reset and no answer."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self._log(0, 0)

    def _log(self, status: int, sent: int) -> None:
        hub = self.server.hub
        with hub.requests_lock:
            hub.requests.append(RequestRecord(self.command, self.path, self.headers.get("Range"), status, sent, self._delay))


class _Server(ThreadingHTTPServer):
    """Threaded server that knows its open connections, so stopping it really ends them."""

    daemon_threads = True
    allow_reuse_address = True
    hub: "LocalHub"

    def __init__(self, address: tuple[str, int], hub: "LocalHub"):
        super().__init__(address, _Handler)
        self.hub = hub
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut every open connection (keep-alive ones included)."""
        with self._open_lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# --------------------------------------------------------------------------------------------- public API


class LocalHub:
    """A Hub-compatible server on a background thread: ``with LocalHub() as hub: HfApi(endpoint=hub.endpoint)``.

    ``tokens`` maps valid tokens to user names (default ``{"hf_test_token": "tester"}``). Files of
    ``lfs_threshold`` bytes or more are uploaded through Git LFS (default: none, every file goes inline
    in the commit). ``root`` keeps repos and blobs in a directory instead of memory. ``page_size`` bounds
    tree and commit listings per page.
    """

    def __init__(self, root: str | None = None, tokens: dict[str, str] | None = None,
                 lfs_threshold: int | None = None):
        self.tokens: dict[str, str] = dict(tokens or {"hf_test_token": "tester"})
        self.lfs_threshold = lfs_threshold
        self.page_size = 1000
        self.store = HubStore(root)
        self.requests: list[RequestRecord] = []
        self.requests_lock = threading.Lock()
        self.faults = FaultQueue()
        self._api = HubApi(self)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """``http://HOST:PORT`` once started."""
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def token(self) -> str:
        """A valid token (the first one)."""
        return next(iter(self.tokens))

    def _listen(self, host: str, port: int) -> _Server:
        self._server = _Server((host, port), self)
        return self._server

    def start(self, host: str = "127.0.0.1", port: int = 0) -> "LocalHub":
        """Listen on ``host:port`` (0 = a free port) and serve from a daemon thread."""
        if self._server is None:
            server = self._listen(host, port)
            self._thread = threading.Thread(target=server.serve_forever, name="LocalHub", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
            self._server = None

    def serve_forever(self, host: str = "127.0.0.1", port: int = 0,
                      ready: Callable[["LocalHub"], None] | None = None) -> None:
        """Serve on the calling thread until interrupted; ``ready(self)`` runs once it listens."""
        server = self._listen(host, port)
        try:
            if ready:
                ready(self)
            server.serve_forever()
        finally:
            server.server_close()
            self._server = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # faults and request log
    def inject_fault(self, method: str, path_regex: str, **fault: Any) -> None:
        """Queue a fault (see :meth:`FaultQueue.inject`): ``status``, ``reset``, ``delay``, ``truncate``, ``times``."""
        self.faults.inject(method, path_regex, **fault)

    def clear_faults(self) -> None:
        self.faults.clear()

    def bytes_served(self, path_substring: str | None = None) -> int:
        """Body bytes sent, over all requests or those whose raw path contains ``path_substring``."""
        with self.requests_lock:
            return sum(r.bytes_sent for r in self.requests if path_substring is None or path_substring in r.path)

    def clear_requests(self) -> None:
        with self.requests_lock:
            self.requests.clear()

    # inspection
    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict]:
        """The history of ``revision``, newest first: id, title, message, date, author and files changed."""
        repo = self.store.repo(repo_type, repo_id)
        with self.store.lock:
            return [{"id": c.id, "title": c.title, "message": c.message, "date": c.date, "author": c.author,
                     "files_changed": _changed(c.tree, repo.commits[c.parent].tree if c.parent else {})}
                    for c in self.store.history(repo, revision)]

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """The content of ``path`` at ``revision``; KeyError if it is not there."""
        commit = self.store.resolve(self.store.repo(repo_type, repo_id), revision)
        return self.store.blob(commit.tree[path])


def _changed(tree: dict[str, str], parent: dict[str, str]) -> list[str]:
    """Paths added, modified or deleted between two trees, sorted."""
    return sorted(p for p in tree.keys() | parent.keys() if tree.get(p) != parent.get(p))


def main(argv: list[str] | None = None) -> None:
    """Command line: serve a LocalHub in the foreground and print its endpoint and a token."""
    parser = argparse.ArgumentParser(description="A local Hugging Face Hub-compatible server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--root", help="keep repos and blobs in this directory (default: memory)")
    parser.add_argument("--token", default="hf_test_token", help="the valid token (user 'tester')")
    parser.add_argument("--lfs-threshold", type=int, help="upload files of this many bytes or more via LFS")
    args = parser.parse_args(argv)
    hub = LocalHub(args.root, {args.token: "tester"}, args.lfs_threshold)
    try:
        hub.serve_forever(args.host, args.port, ready=_announce)
    except KeyboardInterrupt:
        pass


def _announce(hub: LocalHub) -> None:
    print(f"LocalHub serving at {hub.endpoint}", flush=True)
    print(f"export HF_ENDPOINT={hub.endpoint} HF_TOKEN={hub.token} HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_XET=1",
          flush=True)


if __name__ == "__main__":
    main()
