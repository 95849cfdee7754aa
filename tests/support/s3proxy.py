"""A faulty HTTP proxy on 127.0.0.1 in front of the S3 test server: 503s, dropped connections, cut bodies, delays.

Two ways to pick the faulted requests: every few of each kind (reads, writes,
listings, HEADs), a fixed pattern; or at random (`rate`, `seed`), at most
`max_per_request` faults per method+path so that a client that retries always gets
through. Counts per (fault, kind) tell the test what was exercised.
"""

from __future__ import annotations

import http.client
import random
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error. Please try again.</Message></Error>")


def kind_of(method: str, path: str) -> str:
    parsed = urlparse(path)
    key = parsed.path.lstrip("/").partition("/")[2]
    if method == "GET" and (not key or "list-type" in parsed.query or "prefix=" in parsed.query):
        return "list"
    return {"GET": "read", "HEAD": "head", "PUT": "write", "POST": "write", "DELETE": "delete"}.get(method, method)


class FaultyProxy:
    def __init__(self, upstream: str, *, every: int = 5, delay_s: float = 0.4, rate: float | None = None,
                 seed: int = 0, max_per_request: int = 2, targeted: tuple[tuple[str, str], ...] = ()):
        self.upstream = urlparse(upstream)
        self.lock = threading.Lock()
        self.every, self.delay_s = every, delay_s
        self.rate, self.rng, self.max_per_request = rate, random.Random(seed), max_per_request
        self.faulted: Counter = Counter()  # faults so far per (method, path), random mode
        self.where: list[tuple[str, str]] = []  # the faulted requests, random mode
        # (regex on "METHOD /path?query", fault): the first request to each matching method+path gets the fault,
        # whatever the thread timing (random draws land on requests in the order threads make them).
        self.targeted = [(re.compile(pattern), fault) for pattern, fault in targeted]
        self.counts: Counter = Counter()
        self.enabled = True
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                kind = kind_of(self.command, self.path)
                fault = proxy.draw(kind, self.command, self.path)
                if fault in ("503", "500"):
                    answer = SLOW_DOWN if fault == "503" else INTERNAL
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(answer)
                    return
                if fault == "drop":  # the connection dies before any answer
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "delay":
                    time.sleep(proxy.delay_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))  # HEAD: the object's size
                self.end_headers()
                if fault == "cut" and self.command == "GET" and len(data) > 16:  # the body breaks off mid-way
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.close()
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def draw(self, kind: str, method: str = "", path: str = "") -> str | None:
        """The fault for this request, or None.

        Fixed pattern (no `rate`): every `every`-th request of each kind, cycling through the fault
        types; deterministic whatever the thread timing, and a retried request is never faulted twice
        in a row. Random (`rate`): each request with probability `rate`, the type drawn too, at most
        `max_per_request` per method+path. Either way a run must succeed through the client's retries.
        """
        with self.lock:
            n = self.counts[("requests", kind)]
            self.counts[("requests", kind)] += 1
            if not self.enabled:
                return None
            for pattern, fault in self.targeted:
                if pattern.search(f"{method} {path}") and not self.faulted[(method, path)]:
                    self.faulted[(method, path)] += 1
                    self.where.append((method, path))
                    self.counts[(fault, kind)] += 1
                    return fault
            if self.rate is not None:
                if self.faulted[(method, path)] >= self.max_per_request or self.rng.random() >= self.rate:
                    return None
                self.faulted[(method, path)] += 1
                self.where.append((method, path))
                name = self.rng.choice(("503", "500", "drop", "delay", "cut") if kind == "read"
                                       else ("503", "500", "drop", "delay"))
                self.counts[(name, kind)] += 1
                return name
            if n % self.every != self.every // 2:
                return None
            cycle = ("503", "drop", "cut", "delay") if kind == "read" else ("503", "drop", "delay")
            name = cycle[(n // self.every) % len(cycle)]
            self.counts[(name, kind)] += 1
            return name

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
