"""S3Storage against endpoints that stall, refuse or reset: bounded timeouts and retries, one
WARNING per retry, and a clear :class:`StorageError` well within the documented bound.

The servers here are real TCP servers on 127.0.0.1. The bounds asserted are generous (3× the bound
computed from the settings): these tests prove that nothing hangs, they do not time anything.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ReadTimeoutError
from botocore.retries.standard import ExponentialBackoff, RetryContext

from tests.harness.s3 import S3Harness, isolate_aws_environment
from tuneloop.storage import S3Storage, StorageError, s3_request_time_bound
from tuneloop.storage.s3_config import (
    DEFAULT_S3_CONNECT_TIMEOUT,
    DEFAULT_S3_MAX_ATTEMPTS,
    DEFAULT_S3_READ_TIMEOUT,
    S3_CONNECT_TIMEOUT_ENV,
    S3_MAX_ATTEMPTS_ENV,
    S3_READ_TIMEOUT_ENV,
)

pytestmark = pytest.mark.integration

KNOBS = (S3_CONNECT_TIMEOUT_ENV, S3_READ_TIMEOUT_ENV, S3_MAX_ATTEMPTS_ENV)
CANARY_SECRET = "CanarySecret-4b1d-timeouts-DO-NOT-LOG"
CANARY_TOKEN = "CanaryToken-IQoJb3JpZ2luX2VjE-timeouts-DO-NOT-LOG"
#: Small settings for the tests: 3 attempts of at most 0.5 s connect + 1 s "100 Continue" + 0.5 s read.
SMALL = {S3_CONNECT_TIMEOUT_ENV: "0.5", S3_READ_TIMEOUT_ENV: "0.5", S3_MAX_ATTEMPTS_ENV: "3"}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws_environment(monkeypatch, tmp_path)
    for name in KNOBS:
        monkeypatch.delenv(name, raising=False)


# --- the misbehaving servers ------------------------------------------------------------------


class _Server:
    """A TCP server on 127.0.0.1 that hands each connection to ``serve`` in a thread."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self.received = bytearray()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._sockets.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def _record(self, data: bytes) -> None:
        with self._lock:
            self.received += data

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for conn in self._sockets:
                with contextlib.suppress(OSError):
                    conn.close()


class StalledServer(_Server):
    """Accepts connections and reads requests, but never answers (a hung store or proxy)."""

    def serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                self._record(data)


class ResettingServer(_Server):
    """Accepts a connection, reads the start of the request, then resets the connection."""

    def serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._record(conn.recv(65536))
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()


class ThrottlingServer(_Server):
    """Answers every request with 503 SlowDown, as S3 does when asked too fast."""

    ANSWER = (
        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    )
    BODY = (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
    )

    def serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            request = b""
            while b"\r\n\r\n" not in request and (data := conn.recv(65536)):
                request += data
            self._record(request)
            conn.sendall(self.ANSWER % (len(self.BODY), self.BODY))
            conn.close()


class TrickleProxy(_Server):
    """Relays to ``upstream``, passing the answers on ``chunk`` bytes every ``pause`` seconds (a slow link)."""

    def __init__(self, upstream_port: int, chunk: int, pause: float) -> None:
        self.upstream_port, self.chunk, self.pause = upstream_port, chunk, pause
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        with self._lock:
            self._sockets.append(upstream)

        def requests() -> None:
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    upstream.sendall(data)
                upstream.shutdown(socket.SHUT_WR)

        threading.Thread(target=requests, daemon=True).start()
        with contextlib.suppress(OSError):
            while data := upstream.recv(self.chunk):
                conn.sendall(data)
                time.sleep(self.pause)
            conn.shutdown(socket.SHUT_WR)


@pytest.fixture
def stalled() -> Iterator[StalledServer]:
    server = StalledServer()
    yield server
    server.close()


@pytest.fixture
def resetting() -> Iterator[ResettingServer]:
    server = ResettingServer()
    yield server
    server.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(endpoint: str, **knobs: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "AKIATIMEOUTTEST00000",
        "AWS_SECRET_ACCESS_KEY": CANARY_SECRET,
        "AWS_SESSION_TOKEN": CANARY_TOKEN,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        **(knobs or SMALL),
    }


def _scan(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


URI = "s3://tuneloop-timeouts/runs/1/status.json"
PREFIX = "s3://tuneloop-timeouts/runs/"
#: operation → (the S3 request, what the error says was being done, the call)
OPERATIONS: dict[str, tuple[str, str, Callable[[S3Storage], object]]] = {
    "read_bytes": (f"GetObject {URI}", f"(reading {URI})", lambda s: s.read_bytes(URI)),
    "write_bytes": (f"PutObject {URI}", f"(writing {URI})", lambda s: s.write_bytes(URI, b"{}")),
    "list": (f"ListObjectsV2 {PREFIX}", f"(listing {PREFIX})", lambda s: s.list(PREFIX)),
}


def _fail(storage: S3Storage, operation: str) -> tuple[StorageError, float]:
    call = OPERATIONS[operation][2]
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        call(storage)
    return caught.value, time.monotonic() - started


def _retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tuneloop.storage" and r.levelno == logging.WARNING]


def _assert_nothing_leaked(caplog: pytest.LogCaptureFixture, error: StorageError) -> None:
    for secret in (CANARY_SECRET, CANARY_TOKEN):
        assert secret not in _scan(error)
        leaks = [(r.name, r.getMessage()[:200]) for r in caplog.records if secret in r.getMessage()]
        assert leaks == []


# --- the defaults -----------------------------------------------------------------------------


def _botocore_max_backoff(attempt: int) -> float:
    """botocore's own longest back-off after ``attempt`` (jitter at its maximum), for a timeout and
    for a throttling error, whichever is longer."""
    timeout = RetryContext(attempt_number=attempt, caught_exception=ReadTimeoutError(endpoint_url="http://x"))

    class Throttled:
        @staticmethod
        def is_throttling_error_from_context(context: Any) -> bool:
            return True

    delays = [
        ExponentialBackoff(random=lambda: 1.0, service_name="s3").delay_amount(timeout),
        ExponentialBackoff(random=lambda: 1.0, service_name="s3", throttling_detector=Throttled()).delay_amount(
            timeout
        ),
    ]
    return float(max(delays))


def test_the_defaults_fail_a_stalled_request_within_two_minutes() -> None:
    storage = S3Storage(env={})
    config = storage.client.meta.config
    attempts = config.retries["total_max_attempts"]
    assert (config.connect_timeout, config.read_timeout, attempts) == (
        DEFAULT_S3_CONNECT_TIMEOUT,
        DEFAULT_S3_READ_TIMEOUT,
        DEFAULT_S3_MAX_ATTEMPTS,
    )
    # Per attempt: connect, botocore's 1 s wait for "100 Continue" (uploads), the read timeout;
    # between attempts, botocore's back-off at its longest.
    worst = attempts * (config.connect_timeout + 1.0 + config.read_timeout) + sum(
        _botocore_max_backoff(i) for i in range(1, attempts)
    )
    assert worst <= 120
    assert worst <= storage.request_time_bound <= 120  # the documented bound is not an underestimate
    assert storage.request_time_bound == s3_request_time_bound(
        DEFAULT_S3_CONNECT_TIMEOUT, DEFAULT_S3_READ_TIMEOUT, DEFAULT_S3_MAX_ATTEMPTS
    )
    assert storage.request_time_bound == 4 * (5 + 1 + 20) + (1 + 2 + 4)


def test_the_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = S3Storage(env=_env("http://127.0.0.1:1", **{S3_READ_TIMEOUT_ENV: "45", S3_MAX_ATTEMPTS_ENV: " 2 "}))
    config = storage.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (DEFAULT_S3_CONNECT_TIMEOUT, 45.0)
    assert config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert storage.request_time_bound == 2 * (5 + 1 + 45) + 1

    # Blank is unset; arguments win over the environment.
    blank = S3Storage(env={S3_CONNECT_TIMEOUT_ENV: "", S3_MAX_ATTEMPTS_ENV: "9"}, max_attempts=1, read_timeout=3)
    config = blank.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (DEFAULT_S3_CONNECT_TIMEOUT, 3)
    assert config.retries["total_max_attempts"] == 1

    # The process environment applies to a client built with an explicit env (e.g. a job's
    # credentials, in the operator) that does not set them.
    monkeypatch.setenv(S3_CONNECT_TIMEOUT_ENV, "2.5")
    monkeypatch.setenv(S3_READ_TIMEOUT_ENV, "7")
    operator_side = S3Storage(env={"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "x", S3_READ_TIMEOUT_ENV: "8"})
    config = operator_side.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (2.5, 8.0)
    config = S3Storage().client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (2.5, 7.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (S3_CONNECT_TIMEOUT_ENV, "0"),
        (S3_CONNECT_TIMEOUT_ENV, "5s"),
        (S3_READ_TIMEOUT_ENV, "-1"),
        (S3_READ_TIMEOUT_ENV, "nan"),
        (S3_READ_TIMEOUT_ENV, "inf"),
        (S3_READ_TIMEOUT_ENV, "3601"),
        (S3_MAX_ATTEMPTS_ENV, "0"),
        (S3_MAX_ATTEMPTS_ENV, "2.5"),
        (S3_MAX_ATTEMPTS_ENV, "four"),
        (S3_MAX_ATTEMPTS_ENV, "21"),
        (S3_MAX_ATTEMPTS_ENV, "-3"),
    ],
)
def test_a_bad_setting_is_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(StorageError) as caught:
        S3Storage(env={name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}={value!r} is not valid: expected a ")
    expected = "a whole number of attempts from 1 to 20" if name == S3_MAX_ATTEMPTS_ENV else "a number of seconds"
    assert expected in message
    assert caught.value.code == "config"


# --- endpoints that misbehave -----------------------------------------------------------------


@pytest.mark.timeout(90)  # before the fix: 11 attempts of 60 s each
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_a_stalled_endpoint_fails_within_the_bound(
    stalled: StalledServer, operation: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # everything, botocore's request dumps included
    storage = S3Storage(env=_env(stalled.endpoint))
    assert (storage.max_attempts, storage.connect_timeout, storage.read_timeout) == (3, 0.5, 0.5)
    error, elapsed = _fail(storage, operation)

    assert elapsed <= 3 * storage.request_time_bound, f"took {elapsed:.1f} s"
    assert elapsed >= 3 * 0.5 * 0.9  # it did wait for each of the 3 attempts
    assert stalled.accepted == 3  # one connection per attempt: each timed out one was dropped
    assert CANARY_TOKEN.encode() in stalled.received  # the token did go over the wire
    message = str(error)
    assert error.code == "connection"
    assert message.startswith(f"{stalled.endpoint} is not answering {OPERATIONS[operation][1]}: ")
    assert "ReadTimeoutError on each of up to 3 attempts (timeouts: connect 0.5 s, read 0.5 s)" in message
    assert "check that the store is up" in message and S3_READ_TIMEOUT_ENV in message

    target = OPERATIONS[operation][0]
    lines = _retry_lines(caplog)
    assert len(lines) == 2, lines  # one per retry
    for attempt, line in enumerate(lines, start=2):
        assert line.startswith(f"S3 {stalled.endpoint} is not answering (ReadTimeoutError after ")
        assert f") for {target}; retrying: attempt {attempt} of 3, after a " in line
        assert line.endswith("s back-off (timeouts: connect 0.5 s, read 0.5 s)")
    _assert_nothing_leaked(caplog, error)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("kind", ["refused", "reset"])
def test_a_refusing_or_resetting_endpoint_fails_within_the_bound(
    resetting: ResettingServer, kind: str, operation: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = resetting.endpoint if kind == "reset" else f"http://127.0.0.1:{_closed_port()}"
    storage = S3Storage(env=_env(endpoint))
    error, elapsed = _fail(storage, operation)

    assert elapsed <= 3 * storage.request_time_bound, f"took {elapsed:.1f} s"
    if kind == "reset":
        assert resetting.accepted == 3
    assert error.code == "connection"
    assert str(error).startswith(f"cannot reach {endpoint} {OPERATIONS[operation][1]}: ")
    lines = _retry_lines(caplog)
    assert len(lines) == 2, lines
    for attempt, line in enumerate(lines, start=2):
        assert line.startswith(f"S3 {endpoint} failed (")
        assert f" for {OPERATIONS[operation][0]}; retrying: attempt {attempt} of 3, after a " in line
    _assert_nothing_leaked(caplog, error)


@pytest.mark.timeout(60)
def test_a_throttling_endpoint_is_reported_per_retry(caplog: pytest.LogCaptureFixture) -> None:
    server = ThrottlingServer()
    try:
        storage = S3Storage(env=_env(server.endpoint))
        error, elapsed = _fail(storage, "read_bytes")
    finally:
        server.close()
    assert elapsed <= 3 * storage.request_time_bound, f"took {elapsed:.1f} s"
    assert server.accepted == 3
    assert error.code == "SlowDown"
    assert str(error).startswith(
        f"{server.endpoint} is throttling or unavailable (SlowDown) (reading {URI}) after 3 attempts"
    )
    lines = _retry_lines(caplog)
    assert len(lines) == 2, lines
    for attempt, line in enumerate(lines, start=2):
        assert line.startswith(f"S3 {server.endpoint} answered (HTTP 503 SlowDown after ")
        assert f") for GetObject {URI}; retrying: attempt {attempt} of 3, after a " in line
    _assert_nothing_leaked(caplog, error)


@pytest.mark.timeout(60)
def test_the_read_timeout_bounds_each_wait_not_the_transfer(s3: S3Harness, caplog: pytest.LogCaptureFixture) -> None:
    """An answer that keeps coming, slowly, takes several read timeouts in all and still succeeds."""
    data = bytes(range(256)) * 3072  # 768 KiB
    s3.put_bytes("slow/blob.bin", data)
    proxy = TrickleProxy(int(s3.endpoint_url.rsplit(":", 1)[1]), chunk=32 * 1024, pause=0.1)  # ~320 KiB/s
    try:
        env = {**s3.env, "AWS_ENDPOINT_URL_S3": proxy.endpoint, S3_READ_TIMEOUT_ENV: "1", S3_MAX_ATTEMPTS_ENV: "1"}
        storage = S3Storage(env=env)
        started = time.monotonic()
        assert storage.read_bytes(s3.uri("slow/blob.bin")) == data
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    assert elapsed > 2 * storage.read_timeout, f"the transfer took {elapsed:.1f} s: not slower than the timeout"
    assert _retry_lines(caplog) == []
