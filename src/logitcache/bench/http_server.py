"""A static HTTP server on 127.0.0.1 for ``logitcache bench remote`` (the tests reuse it).

In: a directory. Out: a server (on a background thread) that serves it with byte ranges
(``Range: bytes=a-b``, as object stores and nginx do), directory listings, an injected
delay before every response (a far-away store) and a log of the requests it answered.
``fault`` is where a subclass injects failures (the tests' ``FaultyServer``).
"""

from __future__ import annotations

import html
import os
import re
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["StaticServer"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class StaticServer:
    """``with StaticServer(root, latency=0.05) as server: ... server.url ...``

    ``requests``: (method, path, Range header or None) of every request, in order.
    """

    def __init__(self, root: str | os.PathLike, latency: float = 0.0) -> None:
        self.root = Path(root).absolute()
        self.latency = latency
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> StaticServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> StaticServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def paths(self, method: str = "GET") -> list[str]:
        """Paths requested with ``method`` (GET, HEAD), in order."""
        with self._lock:
            return [p for m, p, _ in self.requests if m == method]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _log(self, method: str, path: str, rng: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, rng))

    def fault(self, path: str) -> tuple[int | None, bool]:
        """(status to answer instead of the file, whether to send half the body and hang up)
        for a request of ``path``: none here."""
        return None, False


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real store

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the owner keeps its own log

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner: StaticServer = self.server.owner  # type: ignore[attr-defined]
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        owner._log(self.command, path, self.headers.get("Range"))
        if owner.latency:
            time.sleep(owner.latency)
        status, cut = owner.fault(path)
        if status is not None:
            return self._empty(status)
        target = (owner.root / path.lstrip("/")).resolve()
        if owner.root not in (target, *target.parents) or not target.exists():
            return self._empty(404)
        if target.is_dir():
            return self._listing(target, path, body)
        data = target.read_bytes()
        start, end, code = 0, len(data), 200
        header = self.headers.get("Range")
        if header:
            match = _RANGE.match(header.strip())
            if not match or not (match.group(1) or match.group(2)):
                return self._empty(416)
            a, b = match.groups()
            start, end = (len(data) - int(b), len(data)) if not a else (int(a), len(data))
            if a and b:
                end = min(int(b) + 1, len(data))
            start = max(0, start)
            if start >= len(data) or start >= end:
                return self._empty(416)
            code = 206
        self.send_response(code)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        payload = data[start:end]
        if cut:  # half the promised body, then hang up: a transfer interrupted mid-way
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def _listing(self, target: Path, path: str, body: bool) -> None:
        if not path.endswith("/"):
            self.send_response(301)
            self.send_header("Location", path + "/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        links = []
        for child in sorted(target.iterdir()):
            name = child.name + ("/" if child.is_dir() else "")
            links.append(f'<a href="{urllib.parse.quote(name)}">{html.escape(name)}</a>')
        page = ("<html><body>\n" + "\n".join(links) + "\n</body></html>\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        if body:
            self.wfile.write(page)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
