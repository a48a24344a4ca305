"""Storage.open_read and Storage.read_range (streaming and ranged reads) on moto S3 and file://,
and a store that drops the connection in the middle of an object."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.s3 import S3Harness
from tuneloop.storage import FileStorage, NotFoundError, PreconditionFailedError, S3Storage, Storage, StorageError

pytestmark = pytest.mark.integration

CONTENT = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: more than one buffer


@pytest.fixture(params=["s3", "file"])
def stored(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str, str | None]:
    """(storage, URI of an object holding CONTENT, its ETag or None)."""
    if request.param == "s3":
        s3: S3Harness = request.getfixturevalue("s3")
        s3.put_bytes("data/blob.bin", CONTENT)
        uri = s3.uri("data/blob.bin")
        storage = Storage.for_uri(uri)
        etag = storage.list(uri)[0].etag
        return storage, uri, etag
    path = tmp_path / "data" / "blob.bin"
    path.parent.mkdir()
    path.write_bytes(CONTENT)
    return FileStorage(), f"file://{path}", None


def test_open_read_streams_the_whole_object(stored: tuple[Storage, str, str | None]) -> None:
    storage, uri, etag = stored
    with storage.open_read(uri, etag=etag) as stream:
        first = stream.read(10)
        rest = stream.read()
    assert first + rest == CONTENT


def test_read_range_reads_slices_and_stops_at_the_end(stored: tuple[Storage, str, str | None]) -> None:
    storage, uri, etag = stored
    size = len(CONTENT)
    assert storage.read_range(uri, 0, 8, etag=etag) == CONTENT[:8]
    assert storage.read_range(uri, size - 8, size, etag=etag) == CONTENT[-8:]
    assert storage.read_range(uri, size - 4, size + 100) == b"tail"
    assert storage.read_range(uri, size + 10, size + 20) == b""
    assert storage.read_range(uri, 5, 5) == b""
    with pytest.raises(ValueError, match="offsets >= 0"):
        storage.read_range(uri, -1, 4)


def test_reading_a_missing_object_is_not_found(stored: tuple[Storage, str, str | None]) -> None:
    storage, uri, _ = stored
    missing = uri.replace("blob.bin", "gone.bin")
    with pytest.raises(NotFoundError, match=r"gone\.bin does not exist"):
        storage.open_read(missing)
    with pytest.raises(NotFoundError, match=r"gone\.bin does not exist"):
        storage.read_range(missing, 0, 10)


def test_s3_reads_refuse_an_object_replaced_since_it_was_listed(s3: S3Harness) -> None:
    s3.put_bytes("data/a.jsonl", b'{"x": 1}\n')
    uri = s3.uri("data/a.jsonl")
    storage = Storage.for_uri(uri)
    old_etag = storage.list(uri)[0].etag
    assert old_etag is not None
    s3.put_bytes("data/a.jsonl", b'{"x": 2}\n{"x": 3}\n')
    with pytest.raises(PreconditionFailedError, match="changed since it was listed"):
        storage.open_read(uri, etag=old_etag)
    with pytest.raises(PreconditionFailedError, match="changed since it was listed"):
        storage.read_range(uri, 0, 4, etag=old_etag)
    new_etag = storage.list(uri)[0].etag
    with storage.open_read(uri, etag=new_etag) as stream:
        assert stream.read() == b'{"x": 2}\n{"x": 3}\n'


@pytest.fixture
def cut_short_server() -> Iterator[str]:
    """An "S3" endpoint that answers every GET with 200, promises 1 MB and sends 10 bytes, then
    closes the connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)  # a blocked accept() does not notice the socket closing
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b'HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nETag: "abc"\r\n'
                    b"Content-Type: application/octet-stream\r\n\r\n0123456789"
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_a_connection_dropped_mid_object_is_a_storage_error_naming_the_uri(cut_short_server: str) -> None:
    env = {"AWS_ENDPOINT_URL_S3": cut_short_server, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    storage = S3Storage(env=env, max_attempts=1, connect_timeout=2, read_timeout=2)
    uri = "s3://bucket/data/a.jsonl"
    with storage.open_read(uri) as stream, pytest.raises(StorageError) as caught:
        stream.read()
    assert type(caught.value) is StorageError  # not a botocore or urllib3 exception
    message = str(caught.value)
    assert message.startswith(f"the connection to {cut_short_server} broke while reading {uri} (")
    assert message.endswith("); retry, and check the store and the network path if it persists")
    assert (caught.value.uri, caught.value.code) == (uri, "connection")
