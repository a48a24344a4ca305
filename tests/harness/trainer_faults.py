"""Trainer faults for the reliability suite (scenario 3): kill the trainer process at a chosen point.

The trainer runs as the operator and ``tuneloop run`` run it: its own process
(``python -m tuneloop_trainer run job.yaml --output … --run N``), here through a few lines of
wrapper (:data:`TRAINER_WRAPPER`) that change nothing in the product and only *report*: every
finished step, every checkpoint save that starts and every progress message, one JSON line each, to
a file the test reads
(:class:`TrainerProcess`). That is what lets a test kill it after a given step and count, after the
resume, how many finished steps were trained again.

To land a kill at an exact point of a checkpoint upload, the trainer talks to S3 through
:class:`HoldingS3Proxy`, a small HTTP proxy in front of the moto server that can hold one chosen
request (a checkpoint's ``state.pt`` PUT, its ``manifest.json`` PUT, part 2 of a multipart upload)
until the test has signalled the trainer: the kill then happens with that request provably in
flight. Held requests are dropped (connection closed) or released (forwarded) by the test.

:func:`checkpoint_listing` judges the checkpoints under a run's prefix independently of the
trainer (manifest present and well-formed, every listed file present with its size and SHA-256),
so a test can tell which checkpoint a resume *must* pick and that no partial one was loaded.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.harness.k8s_fixtures import K8sApi
from tests.manifests import ROOT

if TYPE_CHECKING:
    from tests.harness.s3 import S3Harness

#: Where the wrapper writes its JSON lines (one per finished step, checkpoint save and message).
EVENTS_ENV = "TUNELOOP_TEST_TRAINER_EVENTS"
#: A multipart threshold and part size in MiB for the wrapped trainer (S3's minimum part is 5).
MULTIPART_ENV = "TUNELOOP_TEST_MULTIPART_MIB"

#: The trainer's own entry point, with two reporting hooks and, on request, a smaller multipart
#: threshold (the product's default, 64 MiB, is far above a tiny model's checkpoint).
TRAINER_WRAPPER = """
import json, os, sys
events = os.environ["TUNELOOP_TEST_TRAINER_EVENTS"]

def note(**event):
    with open(events, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\\n")

mib = os.environ.get("TUNELOOP_TEST_MULTIPART_MIB")
if mib:
    from tuneloop.storage import localfiles, s3_config
    s3_config.DEFAULT_MULTIPART_THRESHOLD = s3_config.DEFAULT_MULTIPART_CHUNKSIZE = int(mib) * localfiles.MiB

from tuneloop_trainer import checkpoints, progress
step, save, message = progress.Sinks.step, checkpoints.CheckpointManager.save, progress.Sinks.message

def logged_step(self, report):
    step(self, report)
    note(event="step", step=report.step, loss=report.loss)

def logged_save(self, at, state, **kw):
    note(event="save", step=at)
    return save(self, at, state, **kw)

def logged_message(self, text):
    message(self, text)
    note(event="message", text=text)

progress.Sinks.step, checkpoints.CheckpointManager.save = logged_step, logged_save
progress.Sinks.message = logged_message
from tuneloop_trainer.main import main
sys.exit(main(sys.argv[1:]))
"""


# --- the trainer as a process --------------------------------------------------------------------


@dataclass
class TrainerProcess:
    """One ``tuneloop_trainer run`` process and the events it reported."""

    proc: subprocess.Popen[str]
    events_path: Path

    @classmethod
    def start(
        cls,
        job: Path,
        output_uri: str,
        *,
        scratch: Path,
        env: dict[str, str] | None = None,
        run: int = 1,
        multipart_mib: int | None = None,
    ) -> TrainerProcess:
        scratch.mkdir(parents=True, exist_ok=True)
        events = scratch / "events.jsonl"
        events.write_text("")
        full_env = {
            **os.environ,
            **(env or {}),
            EVENTS_ENV: str(events),
            "TUNELOOP_WORK_DIR": str(scratch / "work"),
            "TUNELOOP_CACHE_DIR": str(scratch / "cache"),
            "TUNELOOP_TERMINATION_LOG": str(scratch / "termination-log"),
        }
        if multipart_mib:
            full_env[MULTIPART_ENV] = str(multipart_mib)
        command = [sys.executable, "-c", TRAINER_WRAPPER, "run", str(job), "--output", output_uri, "--run", str(run)]
        proc = subprocess.Popen(
            command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return cls(proc=proc, events_path=events)

    def events(self) -> list[dict[str, Any]]:
        lines = self.events_path.read_text("utf-8").splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by the kill
                break
        return out

    def steps(self) -> list[int]:
        """The steps this process finished, in order."""
        return [e["step"] for e in self.events() if e["event"] == "step"]

    def saves(self) -> list[int]:
        """The steps at which this process started a checkpoint save."""
        return [e["step"] for e in self.events() if e["event"] == "save"]

    def messages(self) -> list[str]:
        """The progress messages this process wrote, in order."""
        return [e["text"] for e in self.events() if e["event"] == "message"]

    def last_step(self) -> int:
        steps = self.steps()
        return steps[-1] if steps else 0

    def wait_for_step(self, step: int, *, timeout: float = 300.0) -> None:
        def reached() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer ended ({self.proc.returncode}) before step {step}")
            return self.last_step() >= step

        K8sApi.wait_for(reached, timeout=timeout, interval=0.02, message=f"the trainer's step {step}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 300.0) -> tuple[int, str, str]:
        """Wait for the exit; (return code, stdout, stderr). Killed if it outlives ``timeout``."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"trainer still running after {timeout} s:\n{err[-3000:]}") from None
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


# --- a proxy that can hold one S3 request --------------------------------------------------------


@dataclass(frozen=True)
class S3Request:
    method: str
    key: str
    """The object key (path-style: the path less the bucket), percent-decoded."""
    query: dict[str, list[str]]


@dataclass
class Hold:
    """The first request matching ``predicate`` waits here until :meth:`release` or :meth:`drop`."""

    predicate: Callable[[S3Request], bool]
    seen: threading.Event = field(default_factory=threading.Event)
    request: S3Request | None = None
    _gate: threading.Event = field(default_factory=threading.Event)
    _drop: bool = False

    def release(self) -> None:
        """Forward the held request to S3."""
        self._gate.set()

    def drop(self) -> None:
        """Close the held request's connection without an answer."""
        self._drop = True
        self._gate.set()

    def wait_seen(self, timeout: float = 300.0) -> S3Request:
        if not self.seen.wait(timeout):
            raise AssertionError(f"no matching S3 request within {timeout} s")
        assert self.request is not None
        return self.request


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "expect"}
)


class HoldingS3Proxy:
    """An HTTP proxy on 127.0.0.1 forwarding to ``upstream`` (moto), able to hold requests.

    ``requests`` lists every request seen, in order. Use as a context manager."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.requests: list[S3Request] = []
        self._holds: list[Hold] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-holding-proxy", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HoldingS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            holds = list(self._holds)
        for hold in holds:
            hold.drop()
        self.server.shutdown()
        self.server.server_close()

    def hold(self, predicate: Callable[[S3Request], bool]) -> Hold:
        hold = Hold(predicate)
        with self._lock:
            self._holds.append(hold)
        return hold

    def _match(self, request: S3Request) -> Hold | None:
        with self._lock:
            self.requests.append(request)
            for hold in self._holds:
                if hold.request is None and hold.predicate(request):
                    hold.request = request
                    return hold
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        path, _, query = handler.path.partition("?")
        key = unquote(path.lstrip("/").partition("/")[2])
        hold = self._match(S3Request(handler.command, key, parse_qs(query, keep_blank_values=True)))
        if hold is not None:
            hold.seen.set()
            hold._gate.wait(600)
            if hold._drop:
                handler.close_connection = True
                return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            conn.request(handler.command, handler.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        handler.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() in _HOP_BY_HOP or (name.lower() == "content-length" and handler.command != "HEAD"):
                continue
            handler.send_header(name, value)
        if handler.command != "HEAD":
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


# --- what the checkpoints look like from outside -----------------------------------------------

CHECKPOINT_KEY = re.compile(r"(?:^|/)checkpoints/step-(\d{8,})/([^/]+)$")


def checkpoint_file(request: S3Request) -> tuple[int, str] | None:
    """(step, file name) when ``request`` targets a checkpoint object, else ``None``."""
    match = CHECKPOINT_KEY.search(request.key)
    return (int(match.group(1)), match.group(2)) if match else None


@dataclass(frozen=True)
class CheckpointListing:
    complete: list[int]
    """Steps whose manifest exists and whose every listed file exists with its size and SHA-256."""
    partial: list[int]
    """Steps with objects but not complete (no manifest, missing, short or altered files)."""


def checkpoint_listing(s3: S3Harness, run_prefix: str) -> CheckpointListing:
    """Judge every ``checkpoints/step-*`` under ``run_prefix`` (e.g. ``job/runs/1/``) from S3 itself."""
    prefix = run_prefix.rstrip("/") + "/checkpoints/"
    objects: dict[int, dict[str, int]] = {}
    for obj in _list_objects(s3, prefix):
        match = CHECKPOINT_KEY.search(obj["Key"])
        if match:
            objects.setdefault(int(match.group(1)), {})[match.group(2)] = int(obj["Size"])
    complete, partial = [], []
    for step, files in sorted(objects.items()):
        base = f"{prefix}step-{step:08d}/"
        ok = False
        if "manifest.json" in files:
            try:
                manifest = json.loads(s3.get_bytes(base + "manifest.json"))
                ok = bool(manifest["files"]) and all(
                    files.get(f["name"]) == f["size"]
                    and hashlib.sha256(s3.get_bytes(base + f["name"])).hexdigest() == f["sha256"]
                    for f in manifest["files"]
                )
            except (ValueError, KeyError, TypeError):
                ok = False
        (complete if ok else partial).append(step)
    return CheckpointListing(complete=complete, partial=partial)


def _list_objects(s3: S3Harness, prefix: str) -> list[dict[str, Any]]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [dict(obj) for page in pages for obj in page.get("Contents", [])]


def incomplete_multipart_uploads(s3: S3Harness, prefix: str) -> list[str]:
    """Keys of multipart uploads started under ``prefix`` and neither completed nor aborted."""
    answer = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix)
    return sorted(u["Key"] for u in answer.get("Uploads", []))


# --- a model big enough for a multipart checkpoint ------------------------------------------------


def widened_gpt2(tiny_dir: Path, dest: Path, *, n_embd: int = 192, seed: int = 0) -> Path:
    """The tiny GPT-2 (same tokenizer, 2 layers) made ``n_embd`` wide, saved to ``dest``.

    At 192 its optimizer state is about 9 MB: a 5 MiB multipart threshold splits it in parts."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    if (dest / "config.json").exists():
        return dest
    config = AutoConfig.from_pretrained(tiny_dir)
    config.n_embd, config.n_inner = n_embd, 2 * n_embd
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(dest)
    return dest
