"""An HTTP reverse proxy in front of an S3 server that counts the bytes of every response body, per
request (method and object key): how tests and benches measure what a trainer really downloaded."""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Traffic:
    """What went through the proxy: response body bytes and request counts per (method, path)."""

    body_bytes: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method: str, path: str, size: int) -> None:
        with self.lock:
            self.body_bytes[(method, path)] += size
            self.requests[(method, path)] += 1

    def downloaded(self, path_prefix: str) -> int:
        """Bytes of object bodies fetched (GET) under `/bucket/key-prefix`."""
        with self.lock:
            return sum(size for (method, path), size in self.body_bytes.items()
                       if method == "GET" and path.startswith(path_prefix))

    def gets(self, path_prefix: str) -> int:
        with self.lock:
            return sum(n for (method, path), n in self.requests.items()
                       if method == "GET" and path.startswith(path_prefix))

    def reset(self) -> None:
        with self.lock:
            self.body_bytes.clear()
            self.requests.clear()


class CountingProxy:
    """`CountingProxy(upstream_endpoint)`: serves on `endpoint` (loopback) until `stop()`.

    Requests are forwarded unchanged, Host header included, so S3 signatures made for the proxy's
    address still verify upstream (SigV4 signs the Host the client sent)."""

    def __init__(self, upstream: str):
        self.traffic = Traffic()
        target = urlsplit(upstream)
        handler = type("Handler", (_Forwarder,), {"upstream": (target.hostname, target.port),
                                                   "traffic": self.traffic})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Forwarder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects
    upstream: tuple[str, int]
    traffic: Traffic

    def log_message(self, *args) -> None:  # quiet: tests read the counters, not a log
        pass

    def _forward(self) -> None:
        body = self._request_body()
        connection = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        self.traffic.record(self.command, unquote(urlsplit(self.path).path), len(payload))
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", response.getheader("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _request_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward
