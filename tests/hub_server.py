"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for testing real huggingface_hub clients offline.

It serves what ``create_repo``, ``create_branch``, ``upload_folder``, ``hf_hub_download`` and ``snapshot_download`` (and so timm's
``hf-hub:`` loading) request; files live in memory, one commit per upload. Run it in a thread with
``HubServer().start()`` (the URL goes into ``HF_ENDPOINT`` of a client process) or as ``python hub_server.py``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


class Repo:
    """Commits of one model repo: sha -> {path: bytes}, and branch -> sha."""

    def __init__(self, private: bool = False) -> None:
        self.commits: dict[str, dict[str, bytes]] = {}
        self.branches: dict[str, str] = {}
        self.private = private
        self.tokens: list[str] = []  # Authorization headers of the commits
        self.commit({}, "main", "initial commit")

    def commit(self, files: dict[str, bytes], branch: str, message: str) -> str:
        sha = hashlib.sha1(f"{len(self.commits)}{message}{sorted(files)}".encode()).hexdigest()
        self.commits[sha] = files
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> Optional[str]:
        return self.branches.get(revision) or (revision if revision in self.commits else None)


class Handler(BaseHTTPRequestHandler):
    """Routes the requests of the huggingface_hub client (see integration-facts §4)."""

    server: "HubServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, repo_id: str) -> Optional[Repo]:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return repo

    # ------------------------------------------------------------------ routes
    def do_POST(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        body = self._body()
        if path == "/api/repos/create":
            payload = json.loads(body or b"{}")
            name = payload["name"] if "/" in payload["name"] or not payload.get("organization") else \
                f"{payload['organization']}/{payload['name']}"
            url = f"{self.server.url}/{name}"
            with self.server.lock:
                if name in self.server.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": url})
                private = payload.get("visibility") == "private" or bool(payload.get("private"))
                self.server.repos[name] = Repo(private=private)
            return self._json(200, {"url": url, "name": name})
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if path.startswith("/api/models/") and "/preupload/" in path:
            repo_id = path[len("/api/models/"):].split("/preupload/")[0]
            if self._repo(repo_id) is None:
                return
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if path.startswith("/api/models/") and "/branch/" in path:
            repo_id, branch = path[len("/api/models/"):].split("/branch/")
            repo = self._repo(repo_id)
            if repo is None:
                return
            with self.server.lock:
                if branch in repo.branches:
                    return self._json(409, {"error": f"branch {branch} already exists"})
                repo.branches[branch] = repo.branches["main"]
            return self._json(200, {})
        if path.startswith("/api/models/") and "/commit/" in path:
            repo_id, revision = path[len("/api/models/"):].split("/commit/")
            repo = self._repo(repo_id)
            if repo is None:
                return
            return self._commit(repo, repo_id, revision, body)
        self._json(404, {"error": f"unknown endpoint POST {path}"})

    def _commit(self, repo: Repo, repo_id: str, revision: str, body: bytes) -> None:
        with self.server.lock:
            repo.tokens.append(self.headers.get("Authorization", ""))
            parent = repo.resolve(revision)
            if parent is None:
                return self._json(404, {"error": f"revision {revision} not found"}, {"X-Error-Code": "RevisionNotFound"})
            files = dict(repo.commits[parent])
            message = ""
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    message = value.get("summary", "")
                elif item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
            sha = repo.commit(files, revision, message)
        self._json(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "success": True})

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def _get(self, head: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        if path.startswith("/api/models/") and "/revision/" in path:
            repo_id, revision = path[len("/api/models/"):].split("/revision/")
            repo = self._repo(repo_id)
            if repo is None:
                return
            sha = repo.resolve(revision)
            if sha is None:
                return self._json(404, {"error": "revision not found"}, {"X-Error-Code": "RevisionNotFound"})
            return self._json(200, {"id": repo_id, "sha": sha,
                                    "siblings": [{"rfilename": name} for name in sorted(repo.commits[sha])]})
        if path.startswith("/api/models/") and "/tree/" in path:
            repo_id, rest = path[len("/api/models/"):].split("/tree/")
            repo = self._repo(repo_id)
            if repo is None:
                return
            sha = repo.resolve(rest.split("/")[0])
            if sha is None:
                return self._json(404, {"error": "revision not found"}, {"X-Error-Code": "RevisionNotFound"})
            files = repo.commits[sha]
            return self._json(200, [{"type": "file", "path": name, "size": len(data),
                                     "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(files.items())])
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/")
            repo = self.server.repos.get(repo_id)
            if repo is None:
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)
            revision, _, filename = rest.partition("/")
            sha = repo.resolve(revision)
            if sha is None:
                return self._send(404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
            data = repo.commits[sha].get(filename)
            if data is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, head)
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            return self._send(200, data, {"X-Repo-Commit": sha, "ETag": etag,
                                          "Content-Type": "application/octet-stream"}, head)
        self._json(404, {"error": f"unknown endpoint GET {path}"})


class HubServer(ThreadingHTTPServer):
    """In-memory hub on 127.0.0.1 (an ephemeral port unless given)."""

    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "HubServer":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


if __name__ == "__main__":
    server = HubServer(8765)
    print(f"serving a test hub at {server.url} (HF_ENDPOINT={server.url})", flush=True)
    server.serve_forever()
