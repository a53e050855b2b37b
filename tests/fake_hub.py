"""A Hugging Face Hub stand-in on loopback: the four routes `snapshot_download` calls.

It serves repos held in memory ({path: bytes} at one commit) and records every request,
so a test can check what a download asked for. Like the moto server of the S3 tests, it
keeps the download path real without any network.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """`with FakeHub({"org/name": (commit, files)}) as hub:` serves at `hub.url`; `hub.requests` logs."""

    def __init__(self, repos: dict[str, tuple[str, dict[str, bytes]]]) -> None:
        self.repos, self.requests = repos, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, method: str, path: str) -> tuple[int, bytes, dict]:
        self.requests.append((method, path))
        parts = path.split("?")[0].strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo = "/".join(parts[2:4] if api else parts[:2])
        if repo not in self.repos:  # the header is how the Hub says "no such repo" (RepositoryNotFoundError)
            return 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}
        commit, files = self.repos[repo]
        if api and parts[4] == "revision":  # repo_info: resolves the revision to a commit
            return 200, json.dumps({"id": repo, "sha": commit}).encode(), {}
        if api and parts[4] == "tree":  # list_repo_tree
            tree = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for p, b in files.items()]
            return 200, json.dumps(tree).encode(), {}
        body = files.get("/".join(parts[4:]))  # /{repo}/resolve/{commit}/{file}: HEAD for metadata, then GET
        if parts[2] != "resolve" or body is None:
            return 404, b"", {"X-Error-Code": "EntryNotFound"}
        return 200, body, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _reply(self, head: bool) -> None:
            code, body, headers = hub.answer(self.command, self.path)
            self.send_response(code)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._reply(head=False)

        def do_HEAD(self) -> None:
            self._reply(head=True)

    return Handler
