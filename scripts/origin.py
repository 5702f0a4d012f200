"""An HTTP origin on loopback for tests, demos and benchmarks: files from a directory, with Range support.

It counts what it serves (``GET /__stats__`` answers JSON: requests, bytes, per-path bytes) and can be
told to misbehave for a path: ``POST /__fault__?path=/f&status=500`` answers that status,
``&delay=2`` stalls before answering, ``&cut=1000`` drops the connection after that many body bytes,
``&rate=1000000`` sends at most that many bytes per second per request, ``&redirect=URL`` answers
302 with that Location;
``POST /__fault__?path=/f`` with no other parameter clears it.

Usage: ``python scripts/origin.py --dir DIR [--listen 127.0.0.1:0]``; it prints
``origin listening on HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 256 * 1024


class Origin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], root: Path) -> None:
        super().__init__(address, Handler)
        self.root = root.resolve()
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes_served = 0
        self.by_path: dict[str, int] = {}
        self.faults: dict[str, dict[str, str]] = {}

    def count(self, path: str, nbytes: int) -> None:
        with self.lock:
            self.bytes_served += nbytes
            self.by_path[path] = self.by_path.get(path, 0) + nbytes


class Handler(BaseHTTPRequestHandler):
    server: Origin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, data: object, status: int = 200) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != "/__fault__":
            self._json({"error": "not found"}, 404)
            return
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        target = query.pop("path", "")
        with self.server.lock:
            if query:
                self.server.faults[target] = query
            else:
                self.server.faults.pop(target, None)
        self._json({"path": target, "fault": query})

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/__stats__":
            with self.server.lock:
                stats = {
                    "requests": self.server.requests,
                    "bytes": self.server.bytes_served,
                    "by_path": dict(self.server.by_path),
                }
            self._json(stats)
            return
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.server.lock:
            self.server.requests += 1
            fault = dict(self.server.faults.get(path, {}))
        if "delay" in fault:
            time.sleep(float(fault["delay"]))
        if "redirect" in fault:
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", fault["redirect"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "status" in fault:
            self._json({"error": "injected"}, int(fault["status"]))
            return
        file = (self.server.root / path.lstrip("/")).resolve()
        if self.server.root not in file.parents or not file.is_file():
            self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
            return
        size = file.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        header = self.headers.get("Range")
        if header:
            match = _RANGE.match(header.strip())
            if match is None:
                self._json({"error": "bad range"}, HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return
            first, last = match.groups()
            if first == "":
                start, end = max(0, size - int(last)), size - 1
            else:
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
            if start >= size or start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = HTTPStatus.PARTIAL_CONTENT
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{size:x}-{int(file.stat().st_mtime):x}"')
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        cut = int(fault["cut"]) if "cut" in fault else None
        rate = float(fault["rate"]) if "rate" in fault else None
        began = time.monotonic()
        sent = 0
        with file.open("rb") as f:
            f.seek(start)
            while sent < length:
                chunk = f.read(min(_CHUNK if rate is None else 64 * 1024, length - sent))
                if cut is not None and sent + len(chunk) > cut:
                    chunk = chunk[: cut - sent]
                    self.wfile.write(chunk)
                    self.server.count(path, len(chunk))
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(chunk)
                self.server.count(path, len(chunk))
                sent += len(chunk)
                if rate is not None:
                    time.sleep(max(0.0, began + sent / rate - time.monotonic()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="directory whose files are served")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT; port 0 picks a free one")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    server = Origin((host, int(port)), args.dir)
    print(f"origin listening on {host}:{server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
