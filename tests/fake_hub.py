"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1: the few routes huggingface_hub's snapshot_download
uses (repo info, tree listing, file resolve), serving files from memory, recording what was asked; and those
HfApi.create_repo, create_branch and upload_folder use (repo create, branch, YAML check, preupload, commit).
Preupload answers "regular" for every file, so files arrive inline (base64 in the ndjson commit), never by LFS.

Point a process at it with HF_ENDPOINT=`FakeHub.url` (set before huggingface_hub is imported: it reads the
endpoint once, at import).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_WRITE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>preupload|commit|branch)/(?P<rev>[^/]+)$")


class FakeHub:
    """Repositories {id: {commit: {path: bytes}}} with refs {id: {name: commit}}; `requests` logs
    (method, path) and `revisions` every revision a client named."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.refs: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str]] = []
        self.revisions: list[str] = []
        self.private: dict[str, bool] = {}  # repositories created through the API -> their visibility
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}} per commit
        self.cards: list[str] = []  # README.md texts sent to validate-yaml
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_POST(self):
                hub._write(self)

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo: str, commit: str, folder: str | Path, refs: tuple[str, ...] = (), extra: dict | None = None):
        """Commit `commit` of `repo` holds the files of `folder` (plus `extra` {path: bytes}); `refs` name it."""
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
        self.repos.setdefault(repo, {})[commit] = {**files, **(extra or {})}
        for ref in refs:
            self.refs.setdefault(repo, {})[ref] = commit

    def files_fetched(self) -> set[str]:
        return {m.group("path") for method, path in self.requests if method == "GET" and (m := _RESOLVE.match(path))}

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- routes ------------------------------------------------------------------------------
    def _commit(self, repo: str, rev: str | None) -> str | None:
        rev = rev or "main"
        self.revisions.append(rev)
        return rev if rev in self.repos[repo] else self.refs.get(repo, {}).get(rev)

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        for pattern, route in ((_TREE, self._tree), (_INFO, self._info), (_RESOLVE, self._resolve)):
            match = pattern.match(path)
            if match:
                repo = match.group("repo")
                if repo not in self.repos:
                    return _send(handler, 404, b'{"error": "Repository not found"}', body, {"X-Error-Code": "RepoNotFound"})
                commit = self._commit(repo, match.group("rev"))
                if commit is None:
                    return _send(handler, 404, b'{"error": "Invalid rev id"}', body, {"X-Error-Code": "RevisionNotFound"})
                return route(handler, repo, commit, match, body)
        _send(handler, 404, b'{"error": "no such route"}', body)

    def _info(self, handler, repo, commit, _match, body):
        files = self.repos[repo][commit]
        data = {"id": repo, "modelId": repo, "sha": commit, "siblings": [{"rfilename": p} for p in sorted(files)]}
        _send(handler, 200, json.dumps(data).encode(), body, {"Content-Type": "application/json"})

    def _tree(self, handler, repo, commit, _match, body):
        files = self.repos[repo][commit]
        listing = [{"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                   for p, data in sorted(files.items())]
        _send(handler, 200, json.dumps(listing).encode(), body, {"Content-Type": "application/json"})

    def _resolve(self, handler, repo, commit, match, body):
        data = self.repos[repo][commit].get(match.group("path"))
        if data is None:
            return _send(handler, 404, b'{"error": "Entry not found"}', body, {"X-Error-Code": "EntryNotFound"})
        _send(handler, 200, data, body, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                         "Content-Type": "application/octet-stream"})

    # --- writes (create_repo, create_branch, upload_folder) ------------------------------------
    def _write(self, handler: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        data = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        if path == "/api/repos/create":
            return self._create(handler, json.loads(data))
        if path == "/api/validate-yaml":
            self.cards.append(json.loads(data)["content"])
            return _json(handler, 200, {"errors": [], "warnings": []})
        match = _WRITE.match(path)
        if match is None:
            return _send(handler, 404, b'{"error": "no such route"}', True)
        repo, kind, rev = match.group("repo", "kind", "rev")
        if repo not in self.repos:
            return _json(handler, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if kind == "branch":
            if rev in self.refs.get(repo, {}):
                return _json(handler, 409, {"error": f"branch {rev} already exists"})
            self.refs.setdefault(repo, {})[rev] = self.refs.get(repo, {}).get("main", "")
            return _json(handler, 200, {})
        if self.refs.get(repo, {}).get(rev) is None:
            return _json(handler, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        if kind == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in json.loads(data)["files"]]
            return _json(handler, 200, {"files": files})
        self._commit_files(handler, repo, rev, [json.loads(line) for line in data.splitlines() if line.strip()])

    def _create(self, handler, payload: dict) -> None:
        repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo in self.repos:
            # the Hub's 409 carries the url too: create_repo(exist_ok=True) reads it
            return _json(handler, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"})
        empty = hashlib.sha1(repo.encode()).hexdigest()
        self.repos[repo], self.refs[repo] = {empty: {}}, {"main": empty}
        self.private[repo] = payload.get("visibility") == "private"
        _json(handler, 200, {"url": f"{self.url}/{repo}", "name": repo})

    def _commit_files(self, handler, repo: str, rev: str, items: list[dict]) -> None:
        header = next(i["value"] for i in items if i["key"] == "header")
        if any(i["key"] not in ("header", "file") for i in items):  # lfsFile, deletions: not served here
            return _json(handler, 400, {"error": f"fake hub: unsupported commit items {[i['key'] for i in items]}"})
        added = {i["value"]["path"]: base64.b64decode(i["value"]["content"]) for i in items if i["key"] == "file"}
        files = {**self.repos[repo][self.refs[repo][rev]], **added}
        commit = hashlib.sha1(json.dumps(sorted((p, hashlib.sha1(d).hexdigest()) for p, d in files.items())).encode()
                              + rev.encode()).hexdigest()
        self.repos[repo][commit], self.refs[repo][rev] = files, commit
        self.commits.append({"repo": repo, "revision": rev, "summary": header["summary"], "files": added})
        _json(handler, 200, {"commitUrl": f"{self.url}/{repo}/commit/{commit}", "commitOid": commit})


def _json(handler, status: int, payload, headers: dict | None = None) -> None:
    _send(handler, status, json.dumps(payload).encode(), True, {"Content-Type": "application/json", **(headers or {})})


def _send(handler, status: int, data: bytes, body: bool, headers: dict | None = None) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if body:
        handler.wfile.write(data)
