"""A tiny HTTP file server on 127.0.0.1 for the download tests (no internet needed).

Serves in-memory files, honours ``Range: bytes=N-`` with 206 answers (unless told to ignore
it), can cut a response short to simulate a dropped connection, and records every request
(path, Range header, status, body bytes sent) so tests can check what was transferred.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        owner: LoopbackServer = self.server.owner
        record = {"path": self.path, "range": self.headers.get("Range"), "status": None, "sent": 0}
        owner.requests.append(record)
        data = owner.files.get(self.path.lstrip("/"))
        if data is None:
            record["status"] = 404
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        requested = self.headers.get("Range")
        if requested and not owner.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", requested.strip())
            if match:
                start = int(match.group(1))
                if start >= len(data):
                    record["status"] = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        body = data[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        record["status"] = status
        if owner.drops:
            cut = owner.drops.pop(0)
            body = body[:cut]
        record["sent"] = len(body)  # recorded first: the client may finish reading before write() returns
        self.wfile.write(body)
        self.wfile.flush()


class LoopbackServer:
    """``with LoopbackServer() as server: server.files['a.bin'] = b'...'; server.url('a.bin')``."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.ignore_range = False
        self.drops: list[int] = []  # for the next responses: send only this many body bytes, then hang up
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{name}"

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def clear_proxy_environment(monkeypatch) -> None:
    """Make urllib talk to 127.0.0.1 directly even where a proxy is configured."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
