"""A loopback Hugging Face Hub for the test suite (standard library only).

It serves the part of the Hub HTTP API that the real ``huggingface_hub``, ``transformers`` and
``datasets`` clients call for model and dataset repos: repo create/delete/info, preupload, ndjson
commits, the Git LFS batch API (basic transfer), tree and paths-info listings, refs, commits,
tags and branches, ``/resolve/`` downloads (HEAD and ranged GET), ``/api/validate-yaml`` and
``/api/whoami-v2``. Errors carry the ``X-Error-Code`` header the clients map to their typed
exceptions (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).

Every commit gets a fresh 40-hex sha and an immutable snapshot of the tree; branches and tags
point at commits, so a file can be fetched at a branch, a tag or a full commit sha. Like the
real Hub, a new repo starts with one commit holding ``.gitattributes``.

Testing aids: :meth:`HubServer.fail_next` makes the next requests fail with a chosen status,
:attr:`HubServer.requests` records every request (method, path, headers) and
:meth:`HubServer.reset` forgets all repos. Note that the clients retry 429 and 5xx answers on
some routes (preupload, LFS, tree listing, downloads) with a backoff of 1 s, 2 s, 4 s, ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

URL_PREFIXES = {"model": "", "dataset": "datasets/"}
API_KINDS = {"models": "model", "datasets": "dataset"}
LFS_SUFFIXES = frozenset(
    {".arrow", ".bin", ".bz2", ".ckpt", ".gguf", ".gz", ".h5", ".jpeg", ".jpg", ".msgpack", ".npy"}
    | {".npz", ".onnx", ".parquet", ".pickle", ".pkl", ".png", ".pt", ".pth", ".safetensors"}
    | {".tar", ".tflite", ".wav", ".webp", ".zip", ".zst"}
)
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in sorted(LFS_SUFFIXES)
)


class HubError(Exception):
    """An HTTP error answer: status, message, and the ``X-Error-Code`` the clients dispatch on."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


def now_iso() -> str:
    """The current UTC time in the Hub's ``%Y-%m-%dT%H:%M:%S.%fZ`` format (milliseconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def user_for_token(token: str) -> str:
    """The fake user name for a token; derived from a hash so it never reveals the token."""
    return "user-" + hashlib.sha256(token.encode()).hexdigest()[:8]


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    """Whether a file goes through LFS: a binary suffix, a large size, or a NUL in its sample."""
    suffix = path[path.rfind(".") :].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return suffix in LFS_SUFFIXES or size >= LFS_MIN_SIZE or b"\0" in sample


class Blob:
    """File content with its git object id (of the LFS pointer for LFS files) and sha256."""

    def __init__(self, data: bytes, lfs: bool) -> None:
        self.data, self.lfs, self.size = data, lfs, len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
        self.git_bytes = f"{pointer}size {self.size}\n".encode() if lfs else data
        header = f"blob {len(self.git_bytes)}\0".encode()
        self.oid = hashlib.sha1(header + self.git_bytes).hexdigest()

    @property
    def etag(self) -> str:
        """The download ETag: the sha256 for LFS files, the git object id otherwise."""
        return self.sha256 if self.lfs else self.oid


@dataclass(frozen=True)
class FileEntry:
    """A file in a commit's tree and the commit that last changed it."""

    blob: Blob
    last_commit: str


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot of a repo tree."""

    oid: str
    title: str
    message: str
    date: str
    author: str
    parent: str | None
    files: dict[str, FileEntry]

    def folders(self) -> set[str]:
        """All folder paths of the tree (not the root)."""
        return {p.rsplit("/", i)[0] for p in self.files for i in range(1, p.count("/") + 1)}


class Repo:
    """A model or dataset repo: commits, branches and tags."""

    def __init__(self, repo_type: str, repo_id: str, author: str, private: bool) -> None:
        self.repo_type, self.repo_id, self.private = repo_type, repo_id, private
        self.author = author
        self.created_at = now_iso()
        self.commits: dict[str, Commit] = {}
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.branches["main"] = self.commit(
            None, "initial commit", "", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}
        ).oid

    def url(self, endpoint: str) -> str:
        """The repo's web URL, as ``create_repo`` returns it."""
        return f"{endpoint}/{URL_PREFIXES[self.repo_type]}{self.repo_id}"

    def resolve(self, revision: str) -> Commit:
        """The commit a branch, a tag, a ``refs/heads|tags/`` ref or a full commit sha points at."""
        name = re.sub(r"^refs/(heads|tags)/", "", revision)
        oid = self.branches.get(name) or self.tags.get(name)
        if oid is None and revision in self.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def commit(
        self, parent: Commit | None, title: str, message: str, changes: dict[str, Blob | None]
    ) -> Commit:
        """Store a new commit: ``parent``'s tree with ``changes`` (``None`` deletes a path)."""
        seed = [parent and parent.oid, title, message, sorted(changes), time.time_ns()]
        oid = hashlib.sha1(json.dumps([*seed, len(self.commits)]).encode()).hexdigest()
        files = dict(parent.files) if parent else {}
        for path, blob in changes.items():
            if blob is None:
                files.pop(path, None)
            else:
                files[path] = FileEntry(blob, oid)
        commit = Commit(oid, title, message, now_iso(), self.author, parent and parent.oid, files)
        self.commits[oid] = commit
        return commit

    def history(self, head: Commit) -> list[Commit]:
        """``head`` and its ancestors, newest first."""
        out = [head]
        while out[-1].parent is not None:
            out.append(self.commits[out[-1].parent])
        return out

    def path_info(self, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        """The tree/paths-info JSON entry of a file or folder of ``commit``."""
        if path in commit.files:
            entry = commit.files[path]
            blob = entry.blob
            info: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": blob.size}
            info["path"] = path
            if blob.lfs:
                info["lfs"] = {"oid": blob.sha256, "size": blob.size}
                info["lfs"]["pointerSize"] = len(blob.git_bytes)
            last = self.commits[entry.last_commit]
        else:
            inside = sorted((p, e) for p, e in commit.files.items() if p.startswith(path + "/"))
            digest = hashlib.sha1(repr([(p, e.blob.oid) for p, e in inside]).encode()).hexdigest()
            info = {"type": "directory", "oid": digest, "size": 0, "path": path}
            order = {oid: i for i, oid in enumerate(self.commits)}
            last = self.commits[max((e.last_commit for _, e in inside), key=order.__getitem__)]
        if expand:
            info["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return info

    def info(self, commit: Commit, with_blobs: bool) -> dict[str, Any]:
        """The ``/api/{models|datasets}/{repo}`` JSON at ``commit``."""
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                blob = commit.files[path].blob
                sibling.update(size=blob.size, blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {
                        "size": blob.size,
                        "sha256": blob.sha256,
                        "pointerSize": len(blob.git_bytes),
                    }
            siblings.append(sibling)
        return {
            "_id": hashlib.md5(self.repo_id.encode()).hexdigest()[:24],
            "id": self.repo_id,
            "author": self.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": self.created_at,
            "private": self.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Fault:
    """Answer the next ``remaining`` requests matching ``match`` with ``status``."""

    status: int
    remaining: int
    match: str | None


@dataclass
class Response:
    """What a route handler answers."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> Response:
        """A JSON answer."""
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


KIND = r"(?P<kind>models|datasets)"
PREFIX = r"(?P<prefix>datasets/)?"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>refs/(?:pr|convert)/[^/]+|[^/]+)"
ROUTES: list[tuple[str, str, str]] = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("GET", rf"/api/{KIND}/{REPO}(?:/revision/{REV})?", "repo_info"),
    ("POST", rf"/api/{KIND}/{REPO}/preupload/{REV}", "preupload"),
    ("POST", rf"/api/{KIND}/{REPO}/commit/{REV}", "commit"),
    ("GET", rf"/api/{KIND}/{REPO}/tree/{REV}(?:/(?P<path>.+))?", "tree"),
    ("POST", rf"/api/{KIND}/{REPO}/paths-info/{REV}", "paths_info"),
    ("GET", rf"/api/{KIND}/{REPO}/refs", "refs"),
    ("GET", rf"/api/{KIND}/{REPO}/commits/{REV}", "commits"),
    ("POST", rf"/api/{KIND}/{REPO}/tag/{REV}", "create_tag"),
    ("DELETE", rf"/api/{KIND}/{REPO}/tag/{REV}", "delete_tag"),
    ("POST", rf"/api/{KIND}/{REPO}/branch/{REV}", "create_branch"),
    ("DELETE", rf"/api/{KIND}/{REPO}/branch/{REV}", "delete_branch"),
    ("POST", rf"/{PREFIX}{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", rf"/{PREFIX}{REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
    ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("GET", rf"/{PREFIX}{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{PREFIX}{REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
]
COMPILED_ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in ROUTES]


class HubHandler(BaseHTTPRequestHandler):
    """Parses a request, applies fault injection, dispatches to a route and writes the answer."""

    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the request log is :attr:`HubServer.requests`."""

    def _dispatch(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body()
        headers = {key.lower(): value for key, value in self.headers.items()}
        hub._record(RecordedRequest(self.command, self.path, headers))
        status = hub._take_fault(f"{self.command} {url.path}")
        if status is not None:
            self._send(Response.json({"error": f"Injected fault ({status})"}, status))
            return
        try:
            for method, pattern, name in COMPILED_ROUTES:
                match = pattern.fullmatch(url.path)
                if method == self.command and match:
                    params = {k: v for k, v in match.groupdict().items() if v is not None}
                    with hub.lock:
                        response = getattr(self, name)(**params)
                    break
            else:
                raise HubError(404, f"No route for {self.command} {url.path}")
        except (KeyError, TypeError, ValueError) as err:  # a payload the clients never send
            response = error_response(HubError(400, f"Malformed request: {err!r}"))
        except HubError as err:
            response = error_response(err)
        self._send(response)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        headers = {"Content-Length": str(len(response.body)), **response.headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    # -- helpers ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{self.headers.get('Host', f'{host}:{port}')}"

    def _user(self, required: bool = True) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:].strip():
            return user_for_token(auth[7:].strip())
        if required:
            raise HubError(401, "Invalid credentials in Authorization header")
        return None

    def _json(self) -> Any:
        return json.loads(self.body or b"{}")

    def _repo(self, repo: str, kind: str | None = None, prefix: str | None = None) -> Repo:
        repo_type = API_KINDS[kind] if kind else ("dataset" if prefix else "model")
        found = self.server.hub.repos.get((repo_type, repo))
        if found is None or (found.private and self._user(required=False) is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return found

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")

    # -- account and repos -----------------------------------------------------------------

    def whoami(self) -> Response:
        name = self._user()
        token = {"displayName": "loopback", "role": "write", "createdAt": now_iso()}
        auth = {"type": "access_token", "accessToken": token}
        return Response.json(
            {"type": "user", "id": name, "name": name, "fullname": name, "orgs": [], "auth": auth}
        )

    def validate_yaml(self) -> Response:
        return Response.json({"errors": [], "warnings": []})

    def _repo_key(self) -> tuple[str, str]:
        payload = self._json()
        namespace = payload.get("organization") or self._user()
        return payload.get("type") or "model", f"{namespace}/{payload['name']}"

    def create_repo(self) -> Response:
        user = self._user()
        key = self._repo_key()
        hub = self.server.hub
        if key in hub.repos:
            url = hub.repos[key].url(self.endpoint)
            return Response.json({"error": "You already created this repo", "url": url}, 409)
        payload = self._json()
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        hub.repos[key] = repo = Repo(key[0], key[1], user, private)
        return Response.json({"url": repo.url(self.endpoint), "name": key[1], "id": key[1]})

    def delete_repo(self) -> Response:
        self._user()
        if self.server.hub.repos.pop(self._repo_key(), None) is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return Response.json({})

    def repo_info(self, kind: str, repo: str, rev: str = "main") -> Response:
        found = self._repo(repo, kind)
        return Response.json(found.info(found.resolve(unquote(rev)), self._flag("blobs")))

    # -- refs ------------------------------------------------------------------------------

    def refs(self, kind: str, repo: str) -> Response:
        found = self._repo(repo, kind)

        def listing(refs: dict[str, str], group: str) -> list[dict[str, str]]:
            items = sorted(refs.items())
            return [{"name": n, "ref": f"refs/{group}/{n}", "targetCommit": c} for n, c in items]

        return Response.json(
            {
                "branches": listing(found.branches, "heads"),
                "tags": listing(found.tags, "tags"),
                "converts": [],
                "pullRequests": [],
            }
        )

    def commits(self, kind: str, repo: str, rev: str) -> Response:
        found = self._repo(repo, kind)
        return Response.json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": c.author}],
                }
                for c in found.history(found.resolve(unquote(rev)))
            ]
        )

    def _create_ref(self, refs: dict[str, str], name: str, target: Commit, what: str) -> Response:
        if name in refs:
            raise HubError(409, f"{what} '{name}' already exists")
        refs[name] = target.oid
        return Response.json({})

    def create_tag(self, kind: str, repo: str, rev: str) -> Response:
        self._user()
        found = self._repo(repo, kind)
        return self._create_ref(found.tags, self._json()["tag"], found.resolve(unquote(rev)), "Tag")

    def create_branch(self, kind: str, repo: str, rev: str) -> Response:
        self._user()
        found = self._repo(repo, kind)
        start = found.resolve(self._json().get("startingPoint") or "main")
        return self._create_ref(found.branches, unquote(rev), start, "Branch")

    def _delete_ref(self, refs: dict[str, str], name: str) -> Response:
        self._user()
        if refs.pop(name, None) is None:
            raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        return Response.json({})

    def delete_tag(self, kind: str, repo: str, rev: str) -> Response:
        return self._delete_ref(self._repo(repo, kind).tags, unquote(rev))

    def delete_branch(self, kind: str, repo: str, rev: str) -> Response:
        return self._delete_ref(self._repo(repo, kind).branches, unquote(rev))

    # -- listings --------------------------------------------------------------------------

    def tree(self, kind: str, repo: str, rev: str, path: str = "") -> Response:
        found = self._repo(repo, kind)
        commit = found.resolve(unquote(rev))
        root = unquote(path).strip("/")
        folders = commit.folders()
        if root and root not in folders:
            raise HubError(404, f"Directory not found: {root}", "EntryNotFound")
        prefix = root + "/" if root else ""
        children = [p for p in [*folders, *commit.files] if p.startswith(prefix)]
        if not self._flag("recursive"):
            children = [p for p in children if "/" not in p[len(prefix) :]]
        expand = self._flag("expand")
        return Response.json([found.path_info(commit, p, expand) for p in sorted(children)])

    def paths_info(self, kind: str, repo: str, rev: str) -> Response:
        found = self._repo(repo, kind)
        commit = found.resolve(unquote(rev))
        if self.headers.get("Content-Type", "").startswith("application/json"):
            payload = self._json()
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode())
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[-1].lower() == "true"
        known = commit.folders() | set(commit.files)
        wanted = [p.strip("/") for p in ([paths] if isinstance(paths, str) else paths)]
        return Response.json([found.path_info(commit, p, expand) for p in wanted if p in known])

    # -- uploads ---------------------------------------------------------------------------

    def preupload(self, kind: str, repo: str, rev: str) -> Response:
        self._user()
        found = self._repo(repo, kind)
        files = found.resolve(unquote(rev)).files
        answer = []
        for item in self._json()["files"]:
            path = item["path"]
            lfs = is_lfs(path, item["size"], base64.b64decode(item.get("sample", "")))
            remote = files.get(path)
            oid = remote and (remote.blob.sha256 if remote.blob.lfs else remote.blob.oid)
            answer.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return Response.json({"files": answer, "commitOid": found.resolve(unquote(rev)).oid})

    def lfs_batch(self, repo: str, prefix: str = "") -> Response:
        self._user()
        found = self._repo(repo, prefix=prefix)
        payload = self._json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported")
        verify = f"{self.endpoint}/{prefix}{found.repo_id}.git/info/lfs/objects/verify"
        objects = []
        for obj in payload["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server.hub.lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-objects/{obj['oid']}", "header": {}},
                    "verify": {"href": verify, "header": {}},
                }
            objects.append(answer)
        return Response.json({"transfer": "basic", "objects": objects})

    def lfs_upload(self, oid: str) -> Response:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match sha256 {oid}")
        self.server.hub.lfs_objects[oid] = self.body
        return Response()

    def lfs_verify(self, repo: str, prefix: str = "") -> Response:
        self._repo(repo, prefix=prefix)
        payload = self._json()
        data = self.server.hub.lfs_objects.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise HubError(404, f"LFS object {payload['oid']} not found")
        return Response.json({})

    def commit(self, kind: str, repo: str, rev: str) -> Response:
        self._user()
        found = self._repo(repo, kind)
        branch = unquote(rev)
        if self._flag("create_pr"):
            raise HubError(400, "create_pr is not supported by the loopback Hub")
        if branch not in found.branches:
            raise HubError(404, f"Invalid rev id: {branch} (not a branch)", "RevisionNotFound")
        head = found.commits[found.branches[branch]]
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        parent = header.get("parentCommit")
        if parent and not head.oid.startswith(parent.lower()):
            raise HubError(412, f"A commit has happened since {parent}: the head is {head.oid}")
        changes = self._commit_changes(head, lines)
        new = found.commit(head, header["summary"], header.get("description", ""), changes)
        found.branches[branch] = new.oid
        return Response.json(
            {
                "commitUrl": f"{found.url(self.endpoint)}/commit/{new.oid}",
                "commitOid": new.oid,
                "pullRequestUrl": None,
                "success": True,
            }
        )

    def _commit_changes(self, head: Commit, lines: list[dict]) -> dict[str, Blob | None]:
        """The path -> blob (``None``: deleted) changes of an ndjson commit body, validated."""
        current = set(head.files)  # the tree's paths after the lines read so far
        changes: dict[str, Blob | None] = {}
        for line in lines:
            key, value = line["key"], line["value"]
            path = value.get("path", "").strip("/") if isinstance(value, dict) else ""
            if key != "header" and (not path or ".." in path.split("/")):
                raise HubError(400, f"Invalid path in commit: {path!r}")
            if key == "file":
                changes[path] = Blob(base64.b64decode(value["content"]), lfs=False)
                current.add(path)
            elif key == "lfsFile":
                data = self.server.hub.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubError(400, f"LFS object {value['oid']} of {path} was never uploaded")
                changes[path] = Blob(data, lfs=True)
                current.add(path)
            elif key in ("deletedFile", "deletedFolder"):
                gone = {p for p in current if p == path or p.startswith(path + "/")}
                if key == "deletedFile":
                    gone &= {path}
                if not gone:
                    message = f"A file with this name doesn't exist: {path}"
                    raise HubError(404, message, "EntryNotFound")
                changes.update(dict.fromkeys(gone))
                current -= gone
            elif key != "header":
                raise HubError(400, f"Unknown commit operation {key!r}")
        return changes

    # -- downloads -------------------------------------------------------------------------

    def resolve(self, repo: str, rev: str, path: str, prefix: str = "") -> Response:
        found = self._repo(repo, prefix=prefix)
        commit = found.resolve(unquote(rev))
        entry = commit.files.get(unquote(path))
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if entry is None:
            raise HubError(404, f"Entry not found: {unquote(path)}", "EntryNotFound", headers)
        blob = entry.blob
        headers.update({"ETag": f'"{blob.etag}"', "Content-Type": "application/octet-stream"})
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        span = parse_range(self.headers.get("Range"), blob.size)
        if span is None:
            return Response(200, blob.data, headers)
        start, stop = span
        if start >= stop:
            headers["Content-Range"] = f"bytes */{blob.size}"
            return Response(416, b"", headers)
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{blob.size}"
        return Response(206, blob.data[start:stop], headers)


def error_response(err: HubError) -> Response:
    """The JSON ``error`` answer of ``err``, with ``X-Error-Code`` and ``X-Error-Message``."""
    response = Response.json({"error": err.message}, err.status)
    response.headers.update(err.headers)
    if err.code:
        response.headers["X-Error-Code"] = err.code
    response.headers["X-Error-Message"] = err.message.encode("ascii", "replace").decode()
    return response


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``[start, stop)`` byte span of a single-range ``Range`` header; ``None``: whole file.

    ``bytes=a-b`` is ``[a, b + 1)``, ``bytes=a-`` is ``[a, size)`` and ``bytes=-n`` the last ``n``
    bytes; ``stop`` is clamped to ``size`` and ``start >= stop`` means unsatisfiable.
    """
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:
        return max(size - int(last), 0), size
    return int(first), min(int(last) + 1 if last else size, size)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class HubServer:
    """The loopback Hub: an HTTP server thread plus in-memory repos and testing aids.

    Args:
        port: Port on 127.0.0.1 to listen on; 0 picks a free one. The socket is bound here, so
            the port is reserved from construction on; :meth:`start` begins serving it.
        token: The token tests are expected to send (``HF_TOKEN``); any bearer token is
            accepted, and the user name derives from it (:func:`user_for_token`).
    """

    def __init__(self, port: int = 0, token: str = "hf_loopback_token") -> None:
        self.token = token
        self.user = user_for_token(token)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[RecordedRequest] = []
        self._faults: list[Fault] = []
        self._httpd = _HubHTTPServer(("127.0.0.1", port), HubHandler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        """The ``HF_ENDPOINT`` of this server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        """Start serving in a daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, n: int = 1, status: int = 500, *, match: str | None = None) -> None:
        """Answer the next ``n`` requests with ``status`` (a JSON ``error`` body, no error code).

        Args:
            n: How many requests to fail.
            status: The HTTP status to answer, e.g. 500 or 401.
            match: Only fail requests whose ``"METHOD /path"`` contains this text
                (e.g. ``"/commit/"`` or ``"HEAD "``); others pass untouched.
        """
        with self.lock:
            self._faults.append(Fault(status, n, match))

    def reset(self) -> None:
        """Forget all repos, LFS objects, pending faults and recorded requests."""
        with self.lock:
            self.repos.clear()
            self.lfs_objects.clear()
            self._faults.clear()
            self.requests.clear()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo, for assertions on its commits, branches and tags."""
        return self.repos[(repo_type, repo_id)]

    def _record(self, request: RecordedRequest) -> None:
        with self.lock:
            self.requests.append(request)

    def _take_fault(self, request_line: str) -> int | None:
        with self.lock:
            for fault in self._faults:
                if fault.match is None or fault.match in request_line:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault.status
        return None
