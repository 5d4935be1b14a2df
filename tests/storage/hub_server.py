"""A stand-in for the Hugging Face Hub's read API on 127.0.0.1, for ``HfFileSystem``.

It serves one dataset repository (``team/cache``, revision ``main``) from a local directory:
repository info, tree listings, paths-info and file downloads with byte ranges, the few
endpoints ``HfFileSystem`` reads through (as huggingface_hub 2.4 calls them). ``fail`` queues
answers (status, headers) for requests whose path contains a given text, to play a busy,
broken or refusing Hub. It is not the Hub: it checks no token and knows no LFS or Xet.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

REPO = "team/cache"
COMMIT = "c0ffee" + "0" * 34


class FakeHubServer:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.fail: list[tuple[str, int, dict[str, str]]] = []
        """(path text, status, headers): the next request whose path contains the text gets
        this answer instead (each entry is used once)."""
        self.requests: list[tuple[str, str]] = []
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHubServer:
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def take_failure(self, path: str) -> tuple[int, dict[str, str]] | None:
        for i, (text, status, headers) in enumerate(self.fail):
            if text in path:
                del self.fail[i]
                return status, headers
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: FakeHubServer

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: object) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _entry(self, rel: str) -> dict:
        path = self.hub.root / rel
        if path.is_dir():
            return {"type": "directory", "path": rel, "oid": "0" * 40, "size": 0}
        data = path.read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return {"type": "file", "path": rel, "size": len(data), "oid": blob}

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = unquote(urlparse(self.path).path)
        self.hub.requests.append((self.command, path))
        failure = self.hub.take_failure(path)
        if failure is not None:
            status, headers = failure
            return self._send(status, b'{"error": "injected"}', headers)
        api = f"/api/datasets/{REPO}"
        if path in (api, f"{api}/revision/main"):
            return self._json({"id": REPO, "sha": COMMIT, "private": False})
        if path.startswith(f"{api}/paths-info/"):
            if self.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(body).get("paths", [])
            else:
                paths = parse_qs(body.decode()).get("paths", [])
            return self._json([self._entry(p) for p in paths if (self.hub.root / p).exists()])
        if path.startswith(f"{api}/tree/main"):
            base = self.hub.root / path[len(f"{api}/tree/main") :].lstrip("/")
            if not base.is_dir():
                return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})
            recursive = "recursive=true" in self.path.lower()
            items = sorted(base.rglob("*") if recursive else base.iterdir())
            return self._json([self._entry(p.relative_to(self.hub.root).as_posix()) for p in items])
        if path.startswith(f"/datasets/{REPO}/resolve/main/"):
            return self._file(self.hub.root / path[len(f"/datasets/{REPO}/resolve/main/") :])
        if path.startswith("/api/datasets/") or path.startswith("/datasets/"):
            return self._send(401, b"{}", {"X-Error-Code": "RepoNotFound"})  # as the Hub does
        return self._send(404, b"{}")

    def _file(self, path: Path) -> None:
        if not path.is_file():
            return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})
        data = path.read_bytes()
        headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": COMMIT}
        ranged = self.headers.get("Range")
        if not ranged:
            return self._send(200, data, headers)
        first, last = ranged.split("=", 1)[1].split("-")
        start, end = int(first), int(last) if last else len(data) - 1
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return self._send(206, data[start : end + 1], headers)

    do_GET = do_POST = do_HEAD = _any
