"""A stand-in for the Hugging Face Hub's HTTP API on loopback (127.0.0.1 only; never the real Hub), for tests.

Upload side (what ``create_repo`` and ``upload_folder`` call): ``POST /api/repos/create``, ``/api/validate-yaml``
(the card's metadata), ``preupload`` (every file is answered "regular", so its bytes travel base64-encoded in the
commit) and ``commit`` (an NDJSON stream: a header line, then one line per file).

Read side (what ``from_pretrained`` calls through ``HF_ENDPOINT``): model info with and without a revision
(``/api/models/<repo>[/revision/<rev>]``), the recursive tree listing, and ``HEAD``/``GET`` on
``/<repo>/resolve/<rev>/<path>`` with the headers huggingface_hub checks (``X-Repo-Commit``, ``ETag``,
``Content-Length``). Every repository has one commit, whose hash is derived from its files.

The server runs in a daemon thread, is stopped by the ``with`` block, and stops by itself after ``lifetime`` seconds.
"""

import base64
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def commit_hash(files: dict) -> str:
    digest = hashlib.sha1()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
    return digest.hexdigest()


def blob_id(content: bytes) -> str:
    """The git blob id, which the Hub sends as a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def hub_environment(endpoint: str) -> dict:
    """Environment variables that point huggingface_hub at the stand-in (online, no proxy, short timeouts)."""
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "10",
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }


class FakeHub:
    """A loopback Hub holding ``repos`` (``{repo_id: {path: bytes}}``); ``fail=True`` answers 500 to everything.

    ``requests`` records ``(method, path)`` of every request, ``repos_created`` the ``(repo_id, visibility)`` of
    ``create_repo`` calls and ``validated`` the metadata headers checked before a commit. ``accounts`` maps the
    tokens ``whoami`` accepts to their account names (any other token gets the Hub's 401).
    """

    def __init__(self, fail=False, lifetime=300.0):
        self.fail = fail
        self.repos: dict[str, dict[str, bytes]] = {}
        self.repos_created, self.requests, self.validated = [], [], []
        self.accounts = {"hf_fake": "tester"}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime, self.server.shutdown)
        self.timer.daemon = True

    def publish(self, repo_id: str, folder) -> None:
        """Serve every file under ``folder`` as ``repo_id`` (as if it had been uploaded)."""
        files = {}
        for directory, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(directory, name)
                with open(path, "rb") as handle:
                    files[os.path.relpath(path, folder).replace(os.sep, "/")] = handle.read()
        self.repos[repo_id] = files

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body=b"", content_type="application/json", headers=(), head=False):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, status, payload, headers=()):
                self._send(status, json.dumps(payload).encode(), headers=headers)

            def _not_found(self, what, head=False):
                self._send(
                    404, json.dumps({"error": what}).encode(), headers=[("X-Error-Code", "EntryNotFound")], head=head
                )

            def _read(self, head):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(("HEAD" if head else "GET", self.path))
                if hub.fail:
                    return self._send(500, b'{"error": "internal error (stand-in told to fail)"}', head=head)
                if path == "/api/whoami-v2":
                    return self._whoami()
                if path.startswith("/api/models/"):
                    return self._api(path[len("/api/models/") :])
                if "/resolve/" in path:
                    repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                    return self._resolve(repo_id, rest.split("/", 1)[1] if "/" in rest else "", head)
                return self._not_found(f"unknown endpoint {path}", head)

            def _whoami(self):
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if token not in hub.accounts:
                    return self._json(401, {"error": "Invalid credentials in Authorization header"})
                return self._json(200, {"type": "user", "name": hub.accounts[token]})

            def _api(self, rest):
                parts = rest.split("/")
                repo_id = "/".join(parts[:2])
                files = hub.repos.get(repo_id)
                if files is None:
                    return self._json(404, {"error": "Repository not found"}, [("X-Error-Code", "RepoNotFound")])
                sha = commit_hash(files)
                if len(parts) == 2 or parts[2] == "revision":
                    siblings = [{"rfilename": path} for path in sorted(files)]
                    return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings})
                if parts[2] == "tree":
                    prefix = "/".join(parts[4:])
                    entries = [
                        {"type": "file", "path": path, "size": len(content), "oid": blob_id(content)}
                        for path, content in sorted(files.items())
                        if not prefix or path.startswith(prefix.rstrip("/") + "/")
                    ]
                    return self._json(200, entries)
                return self._not_found(f"unknown endpoint /api/models/{rest}")

            def _resolve(self, repo_id, path, head):
                files = hub.repos.get(repo_id)
                if files is None or path not in files:
                    return self._not_found(f"{repo_id}: no file {path}", head)
                content = files[path]
                headers = [("X-Repo-Commit", commit_hash(files)), ("ETag", f'"{blob_id(content)}"')]
                self._send(200, content, "application/octet-stream", headers, head)

            def do_HEAD(self):
                self._read(head=True)

            def do_GET(self):
                self._read(head=False)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path))
                if hub.fail:
                    return self._json(500, {"error": "internal error (stand-in told to fail)"})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    hub.repos_created.append((repo_id, payload.get("visibility")))
                    hub.repos.setdefault(repo_id, {})
                    return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if self.path == "/api/validate-yaml":
                    hub.validated.append(json.loads(body)["content"])
                    return self._json(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._json(200, {"files": modes})
                if "/commit/" in self.path:
                    repo_id = self.path.split("/api/models/")[1].split("/commit/")[0]
                    files = hub.repos.setdefault(repo_id, {})
                    for line in body.decode().splitlines():
                        entry = json.loads(line)
                        if entry["key"] == "file":
                            files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                    sha = commit_hash(files)
                    return self._json(
                        200, {"success": True, "commitOid": sha, "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}"}
                    )
                return self._not_found(f"unknown endpoint {self.path}")

        return Handler
