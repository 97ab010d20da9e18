"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1: the few routes huggingface_hub's snapshot_download
uses (repo info, tree listing, file resolve), serving files from memory, recording what was asked.

Point a process at it with HF_ENDPOINT=`FakeHub.url` (set before huggingface_hub is imported: it reads the
endpoint once, at import).
"""

from __future__ import annotations

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


class FakeHub:
    """Repositories {id: {commit: {path: bytes}}} with refs {id: {name: commit}}; `requests` logs
    (method, path) and `revisions` every revision a client named."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.refs: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str]] = []
        self.revisions: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

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


def _send(handler, status: int, data: bytes, body: bool, headers: dict | None = None) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if body:
        handler.wfile.write(data)
