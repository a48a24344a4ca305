"""A fault-injecting HTTP proxy in front of the moto server (:mod:`tests.harness.s3`).

Point a client at :attr:`FaultProxy.endpoint_url` instead of the moto endpoint: every request is
forwarded unchanged, except those that match a :class:`Rule`, which get a fault instead:

``status``          an S3 error answer (``status``/``code``: 500 InternalError, 503 ServiceUnavailable,
                    403 AccessDenied...); the request is not forwarded.
``slowdown``        503 ``SlowDown`` (S3's throttling answer); not forwarded.
``no_such_bucket``  404 ``NoSuchBucket`` naming the bucket (a bucket that disappeared); not forwarded.
``reset_request``   the connection is reset (TCP RST) after ``after_bytes`` bytes of the request body
                    were read; nothing reaches moto.
``reset_response``  the request is forwarded (moto applies it) and the connection is closed after the
                    status line, the headers and ``after_bytes`` bytes of the answer's body: an
                    answer whose body breaks off.
``drop_response``   the request is forwarded (moto applies it) and the connection is reset before any
                    byte of the answer: a lost answer to a request that took effect.
``slow``            the request body is read ``chunk_bytes`` at a time with ``delay`` seconds between
                    chunks (a slow upload link), then forwarded; ``delay`` before the answer too when
                    there is no body.

A rule matches on the method (``None``: any), a regular expression searched in the path
(``/<bucket>/<key>``, path-style addressing) and one searched in the query string; it fires
``count`` times (``None``: forever) and counts its ``hits``. Every request the proxy sees is
recorded in :attr:`FaultProxy.requests` (method, path, query, what happened), so tests count the
attempts a client made. Rules can be added, replaced and cleared while the proxy runs.

Fixture ``s3_faults``: a proxy in front of the session's moto server, on a fresh ``s3`` harness
(whose client keeps talking to moto directly, so set-up and checks are never faulted).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

import pytest

from tests.harness.s3 import S3Harness

FaultKind = Literal["status", "slowdown", "no_such_bucket", "reset_request", "reset_response", "drop_response", "slow"]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
)
_DEFAULT_CODES = {
    400: "BadRequest",
    403: "AccessDenied",
    404: "NoSuchKey",
    500: "InternalError",
    503: "ServiceUnavailable",
}


@dataclass
class Rule:
    """One fault: what it does, which requests it hits, and how often (see the module docstring)."""

    kind: FaultKind
    method: str | None = None
    path: str = ""
    query: str = ""
    count: int | None = 1
    status: int = 500
    code: str | None = None
    after_bytes: int = 0
    delay: float = 0.0
    chunk_bytes: int = 16 * 1024
    hits: int = 0

    def __post_init__(self) -> None:
        self._path_re = re.compile(self.path)
        self._query_re = re.compile(self.query)

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.count is not None and self.hits >= self.count:
            return False
        if self.method is not None and method.upper() != self.method.upper():
            return False
        return bool(self._path_re.search(path)) and bool(self._query_re.search(query))

    @property
    def spent(self) -> bool:
        return self.count is not None and self.hits >= self.count


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it: ``outcome`` is the upstream status (``forwarded``) or the fault."""

    method: str
    path: str
    query: str
    outcome: str
    fault: FaultKind | None
    at: float

    @property
    def key(self) -> str:
        """The object key (path without the bucket); ``""`` for bucket-level requests."""
        return self.path.lstrip("/").partition("/")[2]


@dataclass
class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 forwarding to ``upstream`` with injected faults."""

    upstream: str
    rules: list[Rule] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        self._upstream_host = parts.hostname or "127.0.0.1"
        self._upstream_port = parts.port or 80
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Forget every rule and every recorded request."""
        with self._lock:
            self.rules.clear()
            self.requests.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- what tests ask --

    def seen(self, *, method: str | None = None, path: str = "", faulted: bool | None = None) -> list[Seen]:
        """Recorded requests, filtered by method, a path regex, and whether a fault hit them."""
        pattern = re.compile(path)
        with self._lock:
            entries = list(self.requests)
        return [
            s
            for s in entries
            if (method is None or s.method == method.upper())
            and pattern.search(s.path)
            and (faulted is None or (s.fault is not None) == faulted)
        ]

    def injected(self) -> int:
        """How many faults fired so far (all rules)."""
        with self._lock:
            return sum(rule.hits for rule in self.rules)

    # -- used by the handler --

    def _pick(self, method: str, path: str, query: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path, query):
                    rule.hits += 1
                    return rule
        return None

    def _record(self, method: str, path: str, query: str, outcome: str, fault: FaultKind | None) -> None:
        with self._lock:
            self.requests.append(Seen(method, path, query, outcome, fault, time.monotonic()))


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        return  # a connection the proxy reset on purpose, or a client that went away


def _error_body(code: str, message: str, *, bucket: str | None, key: str | None) -> bytes:
    extra = f"<BucketName>{escape(bucket)}</BucketName>" if bucket else ""
    extra += f"<Key>{escape(key)}</Key>" if key else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code><Message>{escape(message)}'
        f"</Message>{extra}<RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def _dispatch(self) -> None:
        method = self.command
        path, _, query = self.path.partition("?")
        rule = self.owner._pick(method, path, query)
        kind = rule.kind if rule is not None else None
        if rule is not None and rule.kind == "reset_request":
            self._read_body(limit=rule.after_bytes)
            self.owner._record(method, path, query, "reset", kind)
            self._reset()
            return
        body = self._read_body(rule=rule if rule is not None and rule.kind == "slow" else None)
        if rule is not None and rule.kind in ("status", "slowdown", "no_such_bucket"):
            # recorded before the answer goes out: a client may act on it (and a test count) at once
            self.owner._record(method, path, query, str(self._fault_status(rule)), kind)
            self._answer_fault(rule, method, path)
            return
        try:
            status, headers, payload = self._forward(method, body)
        except OSError as exc:
            self.owner._record(method, path, query, f"upstream {type(exc).__name__}", kind)
            self._reset()
            return
        if rule is not None and rule.kind == "drop_response":
            self.owner._record(method, path, query, f"{status} dropped", kind)
            self._reset()
            return
        if rule is not None and rule.kind == "reset_response":
            self.owner._record(method, path, query, f"{status} reset", kind)
            self._send_head(status, headers, len(payload), method)
            with contextlib.suppress(OSError):
                self.wfile.write(payload[: rule.after_bytes])
                self.wfile.flush()
            self._cut()
            return
        self.owner._record(method, path, query, str(status), kind)
        self._send_head(status, headers, len(payload), method)
        if method != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _dispatch

    # -- request side --

    def _read_body(self, *, limit: int | None = None, rule: Rule | None = None) -> bytes:
        """The raw request body (chunked framing kept as is), at most ``limit`` bytes."""
        length = self.headers.get("Content-Length")
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if length is None and not chunked:
            if rule is not None:
                time.sleep(rule.delay)
            return b""
        out = bytearray()
        if chunked:
            while True:
                line = self.rfile.readline()
                out += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = self.rfile.readline()
                        out += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(out)
                out += self._read_exact(size + 2, rule)
                if limit is not None and len(out) >= limit:
                    return bytes(out)
        remaining = int(length or 0)
        if limit is not None:
            remaining = min(remaining, limit)
        out += self._read_exact(remaining, rule)
        return bytes(out)

    def _read_exact(self, n: int, rule: Rule | None) -> bytes:
        out = bytearray()
        step = rule.chunk_bytes if rule is not None else 1 << 20
        while len(out) < n:
            piece = self.rfile.read(min(step, n - len(out)))
            if not piece:
                break
            out += piece
            if rule is not None and len(out) < n:
                time.sleep(rule.delay)
        return bytes(out)

    # -- answers --

    @staticmethod
    def _fault_status(rule: Rule) -> int:
        if rule.kind == "slowdown":
            return 503
        if rule.kind == "no_such_bucket":
            return 404
        return rule.status

    def _answer_fault(self, rule: Rule, method: str, path: str) -> None:
        bucket, _, key = path.lstrip("/").partition("/")
        status = self._fault_status(rule)
        if rule.kind == "slowdown":
            code, message = "SlowDown", "Please reduce your request rate."
        elif rule.kind == "no_such_bucket":
            code, message = "NoSuchBucket", "The specified bucket does not exist"
        else:
            code = rule.code or _DEFAULT_CODES.get(status, "InternalError")
            message = f"injected {status} {code}"
        body = b"" if method == "HEAD" else _error_body(code, message, bucket=bucket or None, key=key or None)
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16])
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _forward(self, method: str, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.owner._upstream_host, self.owner._upstream_port, timeout=60)
        try:
            conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() in ("connection", "expect", "proxy-connection", "keep-alive"):
                    continue
                conn.putheader(name, value)
            conn.endheaders()
            if body:
                conn.send(body)
            response = conn.getresponse()
            payload = response.read()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            if method == "HEAD":
                length = response.getheader("Content-Length")
                if length is not None:
                    headers.append(("Content-Length", length))
            return response.status, headers, payload
        finally:
            conn.close()

    def _send_head(self, status: int, headers: list[tuple[str, str]], length: int, method: str) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        if method != "HEAD":
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.flush()

    def _cut(self) -> None:
        """End the answer early with a clean close (FIN), so that the client surely reads what was sent
        before it finds the rest missing (an RST could discard the unread bytes on the client's side)."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(5)
            while self.connection.recv(65536):  # until the client gives up on the answer and closes
                pass
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()

    def _reset(self) -> None:
        """Close the connection with a TCP RST (not a clean FIN): what a dying load balancer does."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()


@pytest.fixture
def s3_faults(s3: S3Harness) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the ``s3`` harness's moto server (no rules yet)."""
    proxy = FaultProxy(s3.endpoint_url)
    try:
        yield proxy
    finally:
        proxy.close()
