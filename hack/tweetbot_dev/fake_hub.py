"""A local HTTP server speaking the subset of the Hugging Face Hub protocol that `huggingface_hub` (2.x) and
`transformers` use to create a model repo, commit files to it and download them back, so the real clients
run unchanged against it with `HF_ENDPOINT` pointing here (and `HF_HUB_DISABLE_XET=1`, for good measure).

Every file is a regular git file held in memory: the server answers "regular" to every preupload request, so
the client sends contents base64-encoded inside the commit itself and never tries LFS or Xet storage, and no
download response carries Xet headers. Branches are created from `main` (or a `startingPoint`), commits go to a
branch, and downloads, listings and commits may name a branch or (reads) any commit id. A model's info lists
its files' sizes and blob ids with `blobs=true` (`files_metadata=True`), as the Hub does. Files in `dripping`
are sent a byte every 0.1 s, for clients' deadlines.
Not served: tags, pull requests, deleting branches, LFS, Range requests, pagination; `parentCommit` is not checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

INVALID_TOKEN = "Invalid credentials in Authorization header"  # the client recognises this exact message


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob: what the Hub uses as a regular file's ETag and `oid`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeCommit:
    id: str
    message: str
    description: str
    files: dict[str, bytes]  # the whole tree after this commit
    parent: str = ""


@dataclass
class FakeRepo:
    id: str  # namespace/name
    private: bool
    commits: list[FakeCommit] = field(default_factory=list)  # of every branch, oldest first
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> the id of its head commit

    def by_id(self, commit_id: str) -> FakeCommit | None:
        return next((commit for commit in self.commits if commit.id == commit_id), None)

    def branch(self, name: str) -> FakeCommit:
        return self.by_id(self.branches[name])

    @property
    def head(self) -> FakeCommit:
        """The head of `main`."""
        return self.branch("main")

    def history(self, branch: str) -> list[FakeCommit]:
        """The commits of a branch, oldest first."""
        commits, commit = [], self.branch(branch)
        while commit is not None:
            commits.insert(0, commit)
            commit = self.by_id(commit.parent) if commit.parent else None
        return commits


class HubError(Exception):
    """An error answer: status, message and optionally the X-Error-Code the client dispatches on."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}  # extra: more fields of the JSON body


@dataclass
class FakeHub:
    tokens: dict[str, str]  # token -> user name
    orgs: dict[str, list[str]] = field(default_factory=dict)  # user name -> organisations they can write to
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # "METHOD /path?query" of every request, for debugging
    callers: list[tuple[str | None, str]] = field(default_factory=list)  # (user, "METHOD /path?query"): who sent what
    # "<repo>@<revision>/<path>" of every file whose contents were sent (a GET of /resolve/ answered 200; a HEAD,
    # which huggingface_hub sends to check a cached file, is not one): what a cache saves.
    downloads: list[str] = field(default_factory=list)
    failing: int | None = None  # a status every request is answered with (an outage), None: serving
    dripping: set[str] = field(default_factory=set)  # "<repo>/<path>" of files whose contents are sent slowly
    host: str = "127.0.0.1"  # the real node's pods reach the host at node.NODE_IP

    def __post_init__(self):
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server._handle(self)

            do_HEAD = do_POST = do_GET

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._stopped = threading.Event()  # ends dripping answers

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- plumbing ------------------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(request.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        segments = [unquote(s) for s in parts.path.strip("/").split("/")]
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        drip = (request.command == "GET" and len(segments) >= 5 and segments[2] == "resolve"
                and "/".join(segments[:2] + segments[4:]) in self.dripping)
        with self._lock:
            self.requests.append(f"{request.command} {request.path}")
            try:
                if self.failing:
                    raise HubError(self.failing, "Internal Error")
                user = self._user(request)
                self.callers.append((user, f"{request.command} {request.path}"))
                status, payload, headers = self._route(request.command, segments, query, body, user)
            except HubError as error:
                headers = {"X-Error-Message": error.message, **error.headers}
                if error.code:
                    headers["X-Error-Code"] = error.code
                status, payload = error.status, {"error": error.message, **error.extra}
        self._send(request, status, payload, headers, drip and status == 200)

    def _send(self, request, status: int, payload, headers: dict, drip: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request.send_response(status)
        if not isinstance(payload, bytes):
            request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            request.send_header(name, value)
        request.end_headers()
        if request.command == "HEAD":
            return
        if not drip:
            request.wfile.write(data)
            return
        try:
            for index in range(len(data)):
                if self._stopped.wait(0.1):
                    return
                request.wfile.write(data[index:index + 1])
                request.wfile.flush()
        except OSError:  # the client hung up
            pass

    def _user(self, request) -> str | None:
        """The caller's user name, None if anonymous. The Hub rejects an unknown token on every route, even
        public reads: a wrong token never silently degrades to anonymous access."""
        authorization = request.headers.get("Authorization")
        if authorization is None:
            return None
        user = self.tokens.get(authorization.removeprefix("Bearer "))
        if user is None:
            raise HubError(401, INVALID_TOKEN)
        return user

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))

    def _readable_repo(self, repo_id: str, user: str | None) -> FakeRepo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._can_write(user, repo_id.split("/")[0])):
            # Like the Hub, a private repo looks missing to others: 401 when anonymous, 404 otherwise.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str, user: str | None) -> FakeRepo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        repo = self._readable_repo(repo_id, user)
        if not self._can_write(user, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _commit(repo: FakeRepo, revision: str) -> FakeCommit:
        commit = repo.branch(revision) if revision in repo.branches else repo.by_id(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _new_commit(self, repo: FakeRepo, branch: str, message: str, description: str,
                    files: dict[str, bytes]) -> FakeCommit:
        parent = repo.branches.get(branch, "")
        digest = hashlib.sha1(json.dumps([parent, message, description, sorted(
            (path, git_blob_sha1(data)) for path, data in files.items())]).encode())
        commit = FakeCommit(digest.hexdigest(), message, description, files, parent)
        repo.commits.append(commit)
        repo.branches[branch] = commit.id
        return commit

    # --- routes ----------------------------------------------------------------------------------------

    def _route(self, method: str, segments: list[str], query: dict, body: bytes, user: str | None):
        if method == "GET" and segments == ["api", "whoami-v2"]:
            if user is None:
                raise HubError(401, INVALID_TOKEN)
            return 200, {"type": "user", "name": user,
                         "orgs": [{"type": "org", "name": org} for org in self.orgs.get(user, [])]}, {}
        if method == "POST" and segments == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body), user)
        if method == "POST" and segments == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body)["content"])
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            repo_id, rest = "/".join(segments[2:4]), segments[4:]
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(self._writable_repo(repo_id, user), rest[1], json.loads(body))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit_files(self._writable_repo(repo_id, user), rest[1], body, query)
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._create_branch(self._writable_repo(repo_id, user), rest[1], json.loads(body or b"{}"))
            if method == "GET" and rest == ["refs"]:
                return 200, self._refs(self._readable_repo(repo_id, user)), {}
            if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                repo = self._readable_repo(repo_id, user)
                return 200, self._model_info(repo, self._commit(repo, rest[1] if rest else "main"),
                                             query.get("blobs") in ("true", "True", "1")), {}
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                repo = self._readable_repo(repo_id, user)
                return 200, self._tree(self._commit(repo, rest[1]), "/".join(rest[2:]),
                                       query.get("recursive") in ("true", "True", "1")), {}
        if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve":
            repo = self._readable_repo("/".join(segments[:2]), user)
            answer = self._resolve(repo, segments[3], "/".join(segments[4:]))
            if method == "GET":
                self.downloads.append(f"{repo.id}@{segments[3]}/{'/'.join(segments[4:])}")
            return answer
        return 404, {"error": f"Not implemented by FakeHub: {method} /{'/'.join(segments)}"}, {}

    @staticmethod
    def _validate_yaml(card: str):
        """What upload_folder asks before committing a README.md: is its front matter a YAML mapping?"""
        if not card.startswith("---\n"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}, {}
        try:
            metadata = yaml.safe_load(card.split("---\n", 2)[1])
        except (yaml.YAMLError, IndexError) as error:
            return 400, {"errors": [{"message": f"invalid YAML: {error}"}]}, {}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "the metadata must be a YAML mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _create_repo(self, payload: dict, user: str | None):
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        if payload.get("type", "model") != "model":
            raise HubError(400, "FakeHub only hosts model repositories")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if not self._can_write(user, namespace):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in self.repos:
            # exist_ok=True turns this 409 into success, and then reads the repo's url from the error body.
            raise HubError(409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"})
        repo = self.repos[repo_id] = FakeRepo(repo_id, private=payload.get("visibility") == "private")
        self._new_commit(repo, "main", "initial commit", "", {})  # the Hub starts every repo with one commit
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def _preupload(self, repo: FakeRepo, revision: str, payload: dict):
        head = self._commit(repo, revision)
        # `oid` lets the client skip files whose content did not change; `shouldIgnore` is read unconditionally.
        return 200, {"files": [{
            "path": file["path"], "uploadMode": "regular", "shouldIgnore": False,
            "oid": git_blob_sha1(head.files[file["path"]]) if file["path"] in head.files else None,
        } for file in payload["files"]]}, {}

    def _create_branch(self, repo: FakeRepo, branch: str, payload: dict):
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        start = self._commit(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.id
        return 200, {}, {}

    @staticmethod
    def _refs(repo: FakeRepo) -> dict:
        return {"branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit_id}
                             for name, commit_id in sorted(repo.branches.items())],
                "converts": [], "tags": []}

    def _commit_files(self, repo: FakeRepo, revision: str, body: bytes, query: dict):
        if revision not in repo.branches:  # the Hub commits to a branch, never to a bare commit id
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if query.get("create_pr"):
            raise HubError(400, "FakeHub does not support pull requests")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = dict(repo.branch(revision).files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            elif key != "header":  # lfsFile: never asked for, since preupload answers "regular"
                raise HubError(400, f"FakeHub does not accept {key} operations")
        commit = self._new_commit(repo, revision, header["summary"], header.get("description", ""), files)
        return 200, {"success": True, "commitOid": commit.id, "commitUrl": f"{self.url}/{repo.id}/commit/{commit.id}",
                     "hookOutput": ""}, {}

    def _model_info(self, repo: FakeRepo, commit: FakeCommit, blobs: bool = False) -> dict:
        """With `blobs`, each sibling's size and blob id too (an LFS file would also have `lfs`: none here)."""
        siblings = [{"rfilename": path, **({"blobId": git_blob_sha1(data), "size": len(data)} if blobs else {})}
                    for path, data in sorted(commit.files.items())]
        return {"id": repo.id, "modelId": repo.id, "author": repo.id.split("/")[0], "sha": commit.id,
                "private": repo.private, "siblings": siblings}

    @staticmethod
    def _tree(commit: FakeCommit, path: str, recursive: bool) -> list[dict]:
        """The entries under `path` (the whole subtree if recursive), as one page: no Link header, no next page."""
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for name, data in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        return list(entries.values())

    def _resolve(self, repo: FakeRepo, revision: str, path: str):
        commit = self._commit(repo, revision)
        # X-Repo-Commit is what the client caches the file (or its absence) under, for branch names too.
        headers = {"X-Repo-Commit": commit.id}
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        data = commit.files[path]
        return 200, data, {**headers, "ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "application/octet-stream"}
