"""Bad data files and broken model directories, for the trainer's side of the reliability suite.

Each generator writes one kind of input a user gets wrong (or a disk or a copy corrupts) and
returns its path; the tests feed it to ``tuneloop run`` and check how the run ends. Every
generator is deterministic: the same arguments write the same bytes (random corruptions take a
seed). Rows are sentiment-style (``text`` + ``label``, two classes), so a file that is only
partly bad still leaves enough good rows to train on.

Large inputs (:func:`one_huge_line`) are written in chunks, so the test never holds them.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

KIB = 1024
MIB = 1024 * KIB

_WORDS = "the cat sat on the mat and a dog ran in the park while a bird sang day night river tree".split()


def good_rows(n: int = 48, seed: int = 0, labels: tuple[Any, ...] = ("pos", "neg")) -> list[dict[str, Any]]:
    """``n`` rows whose label is signalled by a word in the text (``good``/``bad``)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 9))]
        label = labels[i % len(labels)]
        words.insert(rng.randint(0, len(words)), "good" if i % len(labels) == 0 else "bad")
        rows.append({"text": " ".join(words) + f" {i}", "label": label})
    return rows


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_bytes(rows: list[dict[str, Any]], newline: str = "\n") -> bytes:
    lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in rows]
    return (newline.join(lines) + newline).encode()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- data files ------------------------------------------------------------------------------


def invalid_utf8(path: Path, *, every: int = 5, n: int = 48) -> Path:
    """JSONL where every ``every``-th line carries bytes that are not UTF-8 (``every=1``: all lines)."""
    lines = jsonl_bytes(good_rows(n)).splitlines(keepends=True)
    bad = [
        line.replace(b'"text": "', b'"text": "\xff\xfe\xc3(', 1) if i % every == 0 else line
        for i, line in enumerate(lines)
    ]
    return _write(path, b"".join(bad))


def with_bom(path: Path, *, kind: str = "csv", n: int = 48) -> Path:
    """A UTF-8 byte-order mark before the CSV header (or the first JSON line)."""
    body = csv_bytes(good_rows(n)) if kind == "csv" else jsonl_bytes(good_rows(n))
    return _write(path, b"\xef\xbb\xbf" + body)


def utf16(path: Path, n: int = 48) -> Path:
    """A CSV saved as UTF-16 (what some spreadsheet exports write): every other byte is NUL."""
    return _write(path, csv_bytes(good_rows(n)).decode().encode("utf-16"))


def nul_bytes(path: Path, *, every: int = 4, n: int = 48) -> Path:
    """CSV rows with NUL bytes inside the text of every ``every``-th row (``every=1``: all rows)."""
    rows = good_rows(n)
    for i, row in enumerate(rows):
        if i % every == 0:
            row["text"] = row["text"].replace(" ", "\x00", 1)
    return _write(path, csv_bytes(rows))


def crlf(path: Path, n: int = 48) -> Path:
    """A CSV with Windows line ends."""
    return _write(path, csv_bytes(good_rows(n), newline="\r\n"))


def ragged_csv(path: Path, *, every: int = 3, n: int = 48) -> Path:
    """A CSV where every ``every``-th row has an extra field (``every=1``: all rows)."""
    lines = ["text,label"]
    for i, r in enumerate(good_rows(n)):
        lines.append(f"{r['text']},{r['label']}" + (",extra,more" if i % every == 0 else ""))
    return _write(path, ("\n".join(lines) + "\n").encode())


def one_huge_line(path: Path, *, size: int = 50 * MIB, n: int = 48) -> Path:
    """JSONL with one line of about ``size`` bytes (no newline inside) among good rows."""
    lines = jsonl_bytes(good_rows(n)).splitlines(keepends=True)
    chunk = b"lorem ipsum " * (64 * KIB // 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(b"".join(lines[: n // 2]))
        fh.write(b'{"text": "')
        for _ in range(size // len(chunk)):
            fh.write(chunk)
        fh.write(b'", "label": "pos"}\n')
        fh.write(b"".join(lines[n // 2 :]))
    return path


def messy_csv(path: Path, n: int = 48) -> Path:
    """All the everyday faults of an exported CSV at once: a byte-order mark, Windows line ends,
    NUL bytes in some texts, invalid UTF-8 in every 6th row and an extra field in every 8th
    (rows 0 and 24 have both): 8 + 6 - 2 = 12 rows of 48 that cannot be read."""
    lines = [b"text,label"]
    for i, r in enumerate(good_rows(n)):
        text = r["text"].encode()
        if i % 5 == 0:
            text = text.replace(b" ", b"\x00", 1)
        if i % 6 == 0:
            text += b" \xff\xfe"
        lines.append(text + b"," + r["label"].encode() + (b",extra" if i % 8 == 0 else b""))
    return _write(path, b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")


def only_huge_line(path: Path, *, size: int = 2 * MIB) -> Path:
    """A JSONL file whose only row is larger than the default ``maxRowBytes`` (1 MiB)."""
    return _write(path, b'{"text": "' + b"x" * size + b'", "label": "pos"}\n')


def empty(path: Path) -> Path:
    return _write(path, b"")


def blank_lines(path: Path) -> Path:
    """A file of only whitespace and line ends."""
    return _write(path, b"\n\r\n   \n\t\n")


def header_only(path: Path) -> Path:
    return _write(path, b"text,label\n")


def one_class(path: Path, n: int = 48) -> Path:
    return _write(path, jsonl_bytes(good_rows(n, labels=("pos",))))


def odd_labels(path: Path, label: Any, *, n: int = 48) -> Path:
    """Every row's label is ``label`` (NaN, a float, a bool, a dict...), written as JSON
    (``float('nan')`` as the non-standard ``NaN`` token Python's json writes)."""
    rows = [{**r, "label": label} for r in good_rows(n)]
    return _write(path, jsonl_bytes(rows))


def mixed_odd_labels(path: Path, n: int = 48) -> Path:
    """Two good classes, and a row of each odd label type among them."""
    rows = good_rows(n)
    odd: list[Any] = [float("nan"), 0.5, True, {"name": "pos"}, ["pos"], None, float("inf")]
    for i, label in enumerate(odd):
        rows[i * 3]["label"] = label
    return _write(path, jsonl_bytes(rows))


def symlink_out(folder: Path, outside: Path) -> Path:
    """A dataset folder with good data and a link to a file outside it; returns the folder."""
    _write(folder / "a.jsonl", jsonl_bytes(good_rows()))
    _write(outside, b'{"text": "private words", "label": "pos"}\n')
    (folder / "b.jsonl").symlink_to(outside)
    return folder


def binary_junk(path: Path, *, size: int = 64 * KIB, seed: int = 0) -> Path:
    """Random bytes under a data file's name (a wrong file, a failed download)."""
    return _write(path, random.Random(seed).randbytes(size))


def corrupt_bytes(path: Path, *, seed: int, flips: int = 8, start: int = 0, end: int | None = None) -> list[int]:
    """Overwrite ``flips`` random bytes of ``path`` at offsets in [``start``, ``end``) (seeded;
    ``end`` defaults to the file's size); returns the offsets."""
    rng = random.Random(seed)
    data = bytearray(path.read_bytes())
    offsets = sorted(rng.randrange(start, len(data) if end is None else end) for _ in range(flips))
    for offset in offsets:
        data[offset] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return offsets


# --- model directories -----------------------------------------------------------------------


def copy_model(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def safetensors_header_size(path: Path) -> int:
    """Bytes before the tensor data: the 8-byte length and the JSON header."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return 8 + n


def corrupt_safetensors_header(model_dir: Path) -> Path:
    """Garble the JSON header of ``model.safetensors`` (its size stays the same)."""
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    end = safetensors_header_size(weights)
    data[8:end] = b"#" * (end - 8)
    weights.write_bytes(bytes(data))
    return model_dir


def huge_header_length(model_dir: Path) -> Path:
    """A safetensors file whose length prefix claims a header larger than the file."""
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    weights.write_bytes(bytes(data))
    return model_dir


def nan_weights(model_dir: Path) -> Path:
    """Every float of ``model.safetensors`` set to NaN (a file that loads, but whose model cannot learn)."""
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    save_file(
        {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in tensors.items()},
        weights,
        metadata={"format": "pt"},
    )
    return model_dir


def without(model_dir: Path, name: str) -> Path:
    (model_dir / name).unlink()
    return model_dir


def config_not_json(model_dir: Path) -> Path:
    (model_dir / "config.json").write_text("{ this is not json")
    return model_dir


def config_without_model_type(model_dir: Path) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("model_type", None)
    config.pop("architectures", None)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


#: A model corruption: takes a copied model directory and damages it in place.
ModelDamage = Callable[[Path], Path]


# --- an S3 endpoint that never answers ---------------------------------------------------------


class SilentEndpoint:
    """A TCP server that accepts connections and never sends a byte: an S3 endpoint behind a
    broken network path (the request is sent, no answer ever comes). ``with SilentEndpoint() as url``."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)  # the accept loop notices close() within this
        self._held: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def __enter__(self) -> str:
        self._thread.start()
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __exit__(self, *_: object) -> None:
        self._closed.set()
        self._sock.close()
        for conn in self._held:
            conn.close()
        self._thread.join(timeout=5)
