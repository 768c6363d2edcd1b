"""A small in-process server speaking the part of the Hugging Face Hub HTTP API that huggingface_hub 2.4
uses to publish and download a model, with fault injection. Not a test module.

Endpoints (model repos only), as read from huggingface_hub's hf_api.py, _commit_api.py, lfs.py,
file_download.py and _snapshot_download.py:
    POST /api/repos/create                            create_repo (409 when it exists: exist_ok)
    POST /api/validate-yaml                           create_commit checks README.md front matter first
    GET  /api/models/{repo}[/revision/{rev}]          model_info / repo_info (sha, siblings)
    POST /api/models/{repo}/preupload/{rev}           upload mode per file: "lfs" or "regular"
    POST /{repo}.git/info/lfs/objects/batch           LFS batch: "basic" transfer, one PUT href per object
    PUT  /lfs-upload/{sha256}                         the object's bytes (sha256 checked)
    POST /api/models/{repo}/commit/{rev}              NDJSON commit: header, file, lfsFile, deletedFile
    GET  /api/models/{repo}/commits/{rev}             list_repo_commits
    GET  /api/models/{repo}/refs                      list_repo_refs
    POST /api/models/{repo}/tag/{rev}                 create_tag (409 when it exists)
    GET  /api/models/{repo}/tree/{rev}[/{path}]       list_repo_tree (snapshot_download)
    HEAD/GET /{repo}/resolve/{rev}/{path}             file metadata and download
The server never advertises Xet (no X-Xet-* headers, LFS transfer "basic"), so the client takes the
classic LFS path; the tests also set HF_HUB_DISABLE_XET so an installed hf_xet cannot change that.

A commit is applied atomically (all files or none), `lfsFile` entries must name uploaded objects
(422 otherwise), `deletedFile` / `deletedFolder` entries remove files, and a stale `parentCommit` is
refused with 412, as on the Hub. `HubServer.when(...)` runs an action (e.g. `land_commit`, another
writer publishing) just before a matching request is served: a race at an exact point, without sleeps.

`HubServer.fail(...)` injects faults on any endpoint: an HTTP status, a dropped connection ("drop": no
status line at all) or a server that never answers ("timeout": the request is held, unanswered, for
`hold_s` and then the connection is closed; a client with a shorter timeout sees its own timeout).
`resolve_path(repo, name)` is the pattern of one file's HEAD and GET (`/{repo}/resolve/{rev}/{name}`).
A real "file not found" is a commit without the file (`land_commit(..., delete=...)`): the resolve
endpoint then answers 404 with `X-Error-Code: EntryNotFound`, which the client alone maps to
RemoteEntryNotFoundError.
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
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    title: str
    message: str
    files: dict[str, tuple[bytes, bool]]  # path -> (content, stored in LFS)
    date: str


@dataclass
class Repo:
    private: bool
    commits: list[Commit] = field(default_factory=list)  # oldest first
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def resolve(self, rev: str) -> Commit | None:
        rev = unquote(rev)
        if rev in ("main", "refs/heads/main"):
            return self.head
        if rev in self.tags:
            rev = self.tags[rev]
        return next((c for c in self.commits if c.oid == rev), None)


@dataclass
class Fault:
    """Answer the next `times` requests matching `method` and `path` (a regex) with `status`, drop the
    connection (`status="drop"`), or hold the request unanswered for `hold_s` and then close it
    (`status="timeout"`); `after=True` processes the request first and then fails the reply, which is
    the lost-response case: the commit landed, the client never heard."""

    method: str
    path: str
    status: int | str
    times: int = 1
    after: bool = False
    hold_s: float = 5.0


@dataclass
class Hook:
    """Run `action()` before serving the next `times` requests matching `method` and `path` (a regex)."""

    method: str
    path: str
    action: Callable[[], None]
    times: int = 1


class HubState:
    def __init__(self, tokens: set[str] | None = None):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.tokens = tokens  # None: any or no token accepted; else writes need one of these
        self.faults: list[Fault] = []
        self.hooks: list[Hook] = []
        self.requests: list[tuple[str, str, int | str]] = []  # method, path, status (or "drop")
        self.tokens_seen: set[str] = set()
        self.lock = threading.RLock()
        self.closing = threading.Event()  # set on shutdown: a held ("timeout") request lets go at once
        self._n = 0

    def new_oid(self, *parts: str) -> str:
        self._n += 1
        return hashlib.sha1("|".join((str(self._n), *parts)).encode()).hexdigest()

    def fault_for(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.times > 0 and f.method == method and re.search(f.path, path):
                    f.times -= 1
                    return f
        return None

    def commits_matching(self, repo_id: str, needle: str) -> list[Commit]:
        return [c for c in self.repos[repo_id].commits if needle in c.title or needle in c.message]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every reply sets Content-Length
    server: "HubServer"

    def log_message(self, *args) -> None:  # quiet: pytest shows failures, not access logs
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        st = self.server.state
        url = urlparse(self.path)
        path, query = url.path, parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token:
            st.tokens_seen.add(token)
        with st.lock:
            hooks = [h for h in st.hooks if h.times > 0 and h.method == method and re.search(h.path, path)]
            for h in hooks:
                h.times -= 1
                h.action()
        fault = st.fault_for(method, path)
        if fault and not fault.after:
            return self._fail(method, path, fault)
        try:
            with st.lock:
                status, payload, headers = self._route(method, path, query, body, token)
        except HubError as err:
            status, payload = err.status, {"error": err.message, **err.extra}
            headers = {"X-Error-Message": err.message, **({"X-Error-Code": err.code} if err.code else {})}
        if fault:  # after=True: the work is done, the reply is lost
            return self._fail(method, path, fault)
        st.requests.append((method, path, status))
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _fail(self, method: str, path: str, fault: Fault) -> None:
        self.server.state.requests.append((method, path, fault.status))
        if fault.status == "timeout":
            self.server.state.closing.wait(fault.hold_s)  # never answered while the client waits
        if fault.status in ("drop", "timeout"):
            self.close_connection = True
            try:
                self.connection.shutdown(2)  # no status line at all: the client sees the connection drop
            except OSError:
                pass  # the client gave up first (its timeout) and closed its end
            return
        data = json.dumps({"error": f"injected {fault.status}"}).encode()
        self.send_response(int(fault.status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if fault.status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        if method != "HEAD":  # a HEAD reply has no body: bytes here would be read as the next reply
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- the API --------------------------------------------------------------------------------
    def _repo(self, repo_id: str, token: str | None, write: bool = False) -> Repo:
        st = self.server.state
        repo = st.repos.get(repo_id)
        if not write and repo is not None and repo.private and token is None and st.tokens is not None:
            # As the Hub: a private repo read without a token is "not found" with 401, the same answer
            # as for a repo that does not exist (the client raises RepositoryNotFoundError for both).
            raise HubError(401, "Repository not found", "RepoNotFound")
        if write or (repo is not None and repo.private):
            self._auth(token)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _auth(self, token: str | None) -> None:
        tokens = self.server.state.tokens
        if tokens is not None and token not in tokens:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _commit_of(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return commit

    def _route(self, method: str, path: str, query: dict, body: bytes, token: str | None):
        base = self.server.url
        if method == "POST" and path == "/api/repos/create":
            self._auth(token)
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id in self.server.state.repos:
                # The Hub's 409 carries the url too: create_repo(exist_ok=True) reads it.
                raise HubError(409, "You already created this model repo", url=f"{base}/{repo_id}")
            attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            repo = Repo(private=req.get("visibility") == "private" or bool(req.get("private")))
            repo.commits.append(Commit(self.server.state.new_oid(repo_id), "initial commit", "",
                                       {".gitattributes": (attrs, False)}, _now()))
            self.server.state.repos[repo_id] = repo
            return 200, {"url": f"{base}/{repo_id}", "name": repo_id}, {}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---", content, re.S)
            try:
                meta = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": str(err)}]}, {}
            if not isinstance(meta, dict):
                return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}
            return 200, {"errors": [], "warnings": []}, {}
        if method == "PUT" and (m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)):
            if hashlib.sha256(body).hexdigest() != m.group(1):
                raise HubError(400, "sha256 mismatch")
            self.server.state.lfs[m.group(1)] = body
            return 200, b"", {}
        if method == "POST" and (m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)):
            self._repo(m.group(1), token, write=True)
            req = json.loads(body)
            objects = []
            for obj in req["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.server.state.lfs:
                    entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}, {}
        if (m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)) and method in ("GET", "HEAD"):
            repo = self._repo(m.group(1), token)
            commit = self._commit_of(repo, m.group(2))
            name = unquote(m.group(3))
            if name not in commit.files:
                raise HubError(404, f"Entry not found: {name}", "EntryNotFound")
            data, lfs = commit.files[name]
            etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
            return 200, data, {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"'}
        # datasets share the models' routes (one namespace here): dataset_info reads a dataset's sha
        m = re.fullmatch(r"/api/(?:models|datasets)/([^/]+/[^/]+)(?:/(revision|preupload|commit|commits|refs|tag|tree)(?:/([^/]+)(/.*)?)?)?",
                         path)
        if not m:
            raise HubError(404, f"no route for {method} {path}")
        repo_id, op, rev, rest = m.group(1), m.group(2), m.group(3) or "main", (m.group(4) or "").lstrip("/")
        if op in (None, "revision") and method == "GET":
            repo = self._repo(repo_id, token)
            commit = self._commit_of(repo, rev)
            return 200, {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)], "tags": []}, {}
        if op == "preupload" and method == "POST":
            repo = self._repo(repo_id, token, write=True)
            head = self._commit_of(repo, rev)
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 2**20
                old = head.files.get(f["path"])
                oid = None
                if old is not None:
                    oid = hashlib.sha256(old[0]).hexdigest() if old[1] else git_blob_sha1(old[0])
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            return 200, {"files": files, "commitOid": head.oid}, {}
        if op == "commit" and method == "POST":
            return self._commit(repo_id, rev, body, token)
        if op == "commits" and method == "GET":
            repo = self._repo(repo_id, token)
            tip = self._commit_of(repo, rev)
            history = repo.commits[: repo.commits.index(tip) + 1][::-1]
            return 200, [{"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": "tester"}],
                          "date": c.date} for c in history], {}
        if op == "refs" and method == "GET":
            repo = self._repo(repo_id, token)
            return 200, {"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": repo.head.oid}],
                         "converts": [], "pullRequests": [],
                         "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in repo.tags.items()]}, {}
        if op == "tag" and method == "POST":
            repo = self._repo(repo_id, token, write=True)
            commit = self._commit_of(repo, rev)
            tag = json.loads(body)["tag"]
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit.oid
            return 200, {}, {}
        if op == "tree" and method == "GET":
            repo = self._repo(repo_id, token)
            commit = self._commit_of(repo, rev)
            prefix = unquote(rest).rstrip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return 200, _tree(commit, prefix, recursive), {}
        raise HubError(404, f"no route for {method} {path}")

    def _commit(self, repo_id: str, rev: str, body: bytes, token: str | None):
        st = self.server.state
        repo = self._repo(repo_id, token, write=True)
        if unquote(rev) != "main":
            raise HubError(400, "this test server commits to main only")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "commit header with a summary is required")
        parent = header.get("parentCommit")
        if parent and parent != repo.head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.head.files)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = (base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = st.lfs.get(value["oid"])
                if data is None:  # the Hub refuses a commit that names an object never uploaded
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                files[value["path"]] = (data, True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(prefix)}
        oid = st.new_oid(repo_id, header["summary"])
        repo.commits.append(Commit(oid, header["summary"], header.get("description", ""), files, _now()))
        base = self.server.url
        return 200, {"commitUrl": f"{base}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True,
                     "pullRequestUrl": None}, {}


def resolve_path(repo_id: str, name: str) -> str:
    """The path pattern of one file's HEAD and GET at any revision, for `HubServer.fail`."""
    return rf"^/{re.escape(repo_id)}/resolve/[^/]+/{re.escape(name)}$"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _tree(commit: Commit, prefix: str, recursive: bool) -> list[dict]:
    out, dirs = [], set()
    for path, (data, lfs) in sorted(commit.files.items()):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rel = path[len(prefix) + 1:] if prefix else path
        if "/" in rel and not recursive:
            dirs.add((prefix + "/" if prefix else "") + rel.split("/")[0])
            continue
        for i in range(1, rel.count("/") + 1):
            dirs.add((prefix + "/" if prefix else "") + "/".join(rel.split("/")[:i]))
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if lfs:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        out.append(entry)
    return [{"type": "directory", "path": d, "oid": git_blob_sha1(d.encode()), "size": 0} for d in sorted(dirs)] + out


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tokens: set[str] | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(tokens)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.state.closing.set()
        self.shutdown()
        self.server_close()

    def fail(self, method: str, path: str, status: int | str, times: int = 1, after: bool = False,
             hold_s: float = 5.0) -> None:
        self.state.faults.append(Fault(method, path, status, times, after, hold_s))

    def when(self, method: str, path: str, action: Callable[[], None], times: int = 1) -> None:
        self.state.hooks.append(Hook(method, path, action, times))

    def land_commit(self, repo_id: str, files: dict[str, bytes], title: str = "edited on the Hub",
                    delete: tuple[str, ...] | set[str] = ()) -> str:
        """Another writer's commit on main (a person in the web UI, another deployment); its oid.
        `files` are added or overwritten (LFS for weight-like names), `delete` removed."""
        st = self.state
        with st.lock:
            repo = st.repos[repo_id]
            tree = {p: f for p, f in repo.head.files.items() if p not in delete}
            tree.update({p: (data, p.endswith(LFS_SUFFIXES)) for p, data in files.items()})
            oid = st.new_oid(repo_id, title)
            repo.commits.append(Commit(oid, title, "", tree, _now()))
            return oid

    def calls(self, method: str, pattern: str) -> list[tuple[str, str, int | str]]:
        return [r for r in self.state.requests if r[0] == method and re.search(pattern, r[1])]


if __name__ == "__main__":  # a manual check: `python tests/hub_server.py` and point HF_ENDPOINT at it
    with HubServer() as srv:
        print(srv.url, flush=True)
        while True:
            time.sleep(3600)
