"""Scenario 5 of the reliability suite: S3 faults through a fault-injecting proxy in front of moto.

Every S3 request of the product code under test goes through :class:`tests.harness.faults_s3.FaultProxy`
(``AWS_ENDPOINT_URL_S3`` points at it); set-up and checks talk to moto directly. Injected: 500 and
503 answers, 503 SlowDown, connection resets mid-request and mid-answer, answers lost after the
request took effect, a slow upload link, a bucket that disappears (404 NoSuchBucket) and 403.
Asserted, each time:

* a transient fault fewer times than the attempts allowed is retried: the operation succeeds, the
  proxy counts exactly the injected failures plus one successful attempt, the time stays within
  botocore's largest back-off plus a per-attempt allowance;
* a transient fault on every attempt ends in a retryable error (trainer exit 1) after exactly
  ``max_attempts`` attempts, within the same bound;
* a permanent error (bucket gone, 403) is not retried (one attempt) and ends with exit 10 and a
  message naming the bucket and the key;
* a checkpoint is never half-visible: whatever upload fails, a reader finds only checkpoints whose
  manifest lists objects that are all there and verify.

Seeds are fixed (``SEED``, printed); botocore's back-off jitter uses the global ``random``, seeded too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from boto3.s3.transfer import TransferConfig

from tests.harness.faults_s3 import FaultKind, FaultProxy, Rule
from tests.harness.reliability import Figure, is_full, sample
from tests.harness.s3 import S3Harness
from tests.harness.trainer_jobs import manifest, rows_for, run_job, run_recipe, write_jsonl
from tuneloop.api import FineTuneJob
from tuneloop.contract import ExitCode, Layout
from tuneloop.ownership import JobIdentity, claim_next_run
from tuneloop.storage import PreconditionFailedError, S3Storage, Storage, StorageError
from tuneloop.storage.localfiles import MiB
from tuneloop.storage.s3_config import DEFAULT_S3_MAX_ATTEMPTS
from tuneloop_operator.datawatch import DataWatch
from tuneloop_operator.heartbeat import HeartbeatError, HeartbeatReader
from tuneloop_operator.outputs import JobStorage, OutputAccess
from tuneloop_operator.planner import OutputClaim
from tuneloop_trainer.checkpoints import MANIFEST_NAME, CheckpointManager, CheckpointState
from tuneloop_trainer.errors import failure_of

SCENARIO = "5. S3 faults"
SEED = 5005
ATTEMPTS = DEFAULT_S3_MAX_ATTEMPTS
#: Time allowed per attempt on top of botocore's back-off (a loaded 2-core CI machine, moto in-process).
PER_ATTEMPT_S = 1.0
#: Fixed allowance per operation (client set-up, the first connection).
OVERHEAD_S = 3.0


def backoff_bound(retries: int, *, throttling: bool) -> float:
    """botocore's standard mode waits at most min(scale × 2^(i-1), 20) s before retry i (scale: 1 s for
    throttling, 0.05 s otherwise); our re-read of a broken answer waits 0.1 × 2^(i-1) s (at most 2 s)."""
    scale = 1.0 if throttling else 0.1
    return sum(min(scale * 2.0 ** (i - 1), 20.0) for i in range(1, retries + 1))


def time_bound(retries: int, *, throttling: bool, extra: float = 0.0) -> float:
    return backoff_bound(retries, throttling=throttling) + PER_ATTEMPT_S * (retries + 1) + OVERHEAD_S + extra


@pytest.fixture
def rng() -> random.Random:
    print(f"seed {SEED}")
    random.seed(SEED)  # botocore's back-off jitter
    return random.Random(SEED)


@pytest.fixture
def via_proxy(s3: S3Harness, s3_faults: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> FaultProxy:
    """Product code in this process reaches S3 only through the proxy."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_faults.endpoint_url)
    return s3_faults


def faulty_storage(**kw: Any) -> S3Storage:
    """A fresh client (its own retry quota) on the proxy, multipart from 5 MiB (S3's smallest part)."""
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)
    return S3Storage(transfer_config=config, **kw)


# --- storage operations under faults -------------------------------------------------------------


@dataclass
class Op:
    """One storage operation: the request a fault hits (method, path and query patterns) and a check."""

    name: str
    method: str
    key: str
    prepare: Callable[[S3Harness, Path], Any]
    run: Callable[[S3Storage, S3Harness, Path, Any], Any]
    check: Callable[[S3Harness, Path, Any, Any], None]
    query: str = ""
    has_body: bool = False  # the answer has a body a reset can cut
    named: str = ""  # what an error message must name (default: the key)

    def rule(self, s3: S3Harness, kind: FaultKind, count: int | None, **kw: Any) -> Rule:
        path = "^/" + re.escape(s3.bucket) + ("/" + re.escape(self.key) + "$" if self.key else "$")
        return Rule(kind, method=self.method, path=path, query=self.query, count=count, **kw)

    def requests(self, proxy: FaultProxy, s3: S3Harness) -> list[Any]:
        return [
            r
            for r in proxy.seen(method=self.method, path=self.rule(s3, "status", None).path)
            if re.search(self.query, r.query)
        ]


def _payload(n: int, tag: str) -> bytes:
    return (tag.encode() * (n // max(1, len(tag)) + 1))[:n]


def _put_prepare(s3: S3Harness, tmp: Path) -> bytes:
    return _payload(200_000, f"put-{time.monotonic_ns()}")


def _get_prepare(s3: S3Harness, tmp: Path) -> bytes:
    data = _payload(300_000, f"get-{time.monotonic_ns()}")
    s3.put_bytes("ops/get.bin", data)
    return data


def _list_prepare(s3: S3Harness, tmp: Path) -> list[str]:
    names = [f"part-{i}.jsonl" for i in range(3)]
    for name in names:
        s3.put_bytes(f"ops/list/{name}", b"{}\n")
    return names


def _upload_prepare(s3: S3Harness, tmp: Path) -> Path:
    path = tmp / "upload.bin"
    path.write_bytes(_payload(6 * MiB, f"upload-{time.monotonic_ns()}"))
    return path


def _download_prepare(s3: S3Harness, tmp: Path) -> bytes:
    data = _payload(700_000, f"download-{time.monotonic_ns()}")
    metadata = {"sha256": hashlib.sha256(data).hexdigest()}  # what S3Storage records; downloads check it
    s3.client.put_object(Bucket=s3.bucket, Key="ops/download.bin", Body=data, Metadata=metadata)
    return data


def _dir_prepare(s3: S3Harness, tmp: Path) -> Path:
    folder = tmp / f"model-{time.monotonic_ns()}"
    folder.mkdir()
    for name, size in (("config.json", 300), ("model.safetensors", 400_000), ("tokenizer.json", 20_000)):
        (folder / name).write_bytes(_payload(size, f"{folder.name}-{name}"))
    return folder


def _dir_check(s3: S3Harness, folder: Path) -> None:
    for path in folder.iterdir():
        _assert_equal(s3.get_bytes(f"ops/model/{path.name}"), path.read_bytes())


def _create_prepare(s3: S3Harness, tmp: Path) -> bytes:
    s3.client.delete_object(Bucket=s3.bucket, Key="ops/claim.json")
    return json.dumps({"claimed": time.monotonic_ns()}).encode()


OPS: dict[str, Op] = {
    "put": Op(
        "put",
        "PUT",
        "ops/put.bin",
        _put_prepare,
        lambda st, s3, tmp, data: st.write_bytes(s3.uri("ops/put.bin"), data),
        lambda s3, tmp, data, _: _assert_equal(s3.get_bytes("ops/put.bin"), data),
    ),
    "get": Op(
        "get",
        "GET",
        "ops/get.bin",
        _get_prepare,
        lambda st, s3, tmp, data: st.read_bytes(s3.uri("ops/get.bin")),
        lambda s3, tmp, data, got: _assert_equal(got, data),
        has_body=True,
    ),
    "list": Op(
        "list",
        "GET",
        "",
        _list_prepare,
        lambda st, s3, tmp, names: [i.key for i in st.list(s3.uri("ops/list/"))],
        lambda s3, tmp, names, got: _assert_equal(got, names),
        query=r"list-type=2",
        has_body=True,
        named="ops/list/",
    ),
    "upload": Op(
        "upload",
        "PUT",
        "ops/upload.bin",
        _upload_prepare,
        lambda st, s3, tmp, path: st.upload_file(path, s3.uri("ops/upload.bin")),
        lambda s3, tmp, path, _: _assert_equal(s3.get_bytes("ops/upload.bin"), path.read_bytes()),
        query=r"partNumber=2",  # the second part of the multipart upload
    ),
    "download": Op(
        "download",
        "GET",
        "ops/download.bin",
        _download_prepare,
        lambda st, s3, tmp, data: st.download_file(s3.uri("ops/download.bin"), tmp / "download.out"),
        lambda s3, tmp, data, _: _assert_equal((tmp / "download.out").read_bytes(), data),
        has_body=True,
    ),
    "upload_dir": Op(  # what the trainer does with the final model
        "upload_dir",
        "PUT",
        "ops/model/model.safetensors",
        _dir_prepare,
        lambda st, s3, tmp, folder: st.upload_dir(folder, s3.uri("ops/model/")),
        lambda s3, tmp, folder, _: _dir_check(s3, folder),
        named="ops/model/",  # with the bucket gone, whichever file failed first
    ),
    "create": Op(
        "create",
        "PUT",
        "ops/claim.json",
        _create_prepare,
        lambda st, s3, tmp, data: st.create_bytes(s3.uri("ops/claim.json"), data),
        lambda s3, tmp, data, _: _assert_equal(s3.get_bytes("ops/claim.json"), data),
    ),
}


def _assert_equal(got: Any, want: Any) -> None:
    if got != want:
        shown = lambda v: hashlib.sha256(v).hexdigest()[:12] if isinstance(v, bytes) else v  # noqa: E731
        raise AssertionError(f"got {shown(got)}, want {shown(want)}")


#: Transient faults and the operations each applies to (a reset mid-answer needs an answer with a body;
#: a slow link is on uploads).
TRANSIENT: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "HTTP 500": ({"kind": "status", "status": 500}, tuple(OPS)),
    "HTTP 503": ({"kind": "status", "status": 503, "code": "ServiceUnavailable"}, tuple(OPS)),
    "503 SlowDown": ({"kind": "slowdown"}, tuple(OPS)),
    "reset mid-request": ({"kind": "reset_request", "after_bytes": 4096}, tuple(OPS)),
    "reset mid-answer": ({"kind": "reset_response", "after_bytes": 100}, ("get", "list", "download")),
    "answer lost after the write": ({"kind": "drop_response"}, ("put", "upload", "upload_dir", "create")),
}
#: The quick sample: one operation per fault kind, every operation but the 6 MiB multipart upload once.
QUICK_WALK = {
    "HTTP 500": "put",
    "HTTP 503": "get",
    "503 SlowDown": "list",
    "reset mid-request": "upload_dir",
    "reset mid-answer": "download",
    "answer lost after the write": "create",
}
THROTTLING = {"503 SlowDown", "HTTP 503"}


def test_transient_faults_are_retried_with_bounded_backoff(
    s3: S3Harness, via_proxy: FaultProxy, tmp_path: Path, rng: random.Random, figure: Figure
) -> None:
    per_kind = sample(quick=1, full=20)
    proxy = via_proxy
    # botocore's standard mode spends a client-wide retry quota (500; 5 per retry, 10 after a connection
    # error) and gives back only the last retry's cost when a request succeeds: a client that meets
    # hundreds of faults stops retrying. The quick sample shares one client (clients take ~0.3 s to
    # make); the full count gives each injection its own, as the quota is not what is measured here.
    storage = faulty_storage()
    outcomes: dict[str, list[tuple[str, int, int, float, float]]] = {}
    for label, (fault, ops) in TRANSIENT.items():
        for _ in range(per_kind):
            op = OPS[rng.choice(ops)] if is_full() else OPS[QUICK_WALK[label]]
            retries = 1 if not is_full() else rng.randint(1, ATTEMPTS - 1)
            proxy.clear()
            prepared = op.prepare(s3, tmp_path)
            storage = faulty_storage() if is_full() else storage
            rule = proxy.add(op.rule(s3, count=retries, **fault))
            started = time.monotonic()
            got = op.run(storage, s3, tmp_path, prepared)
            took = time.monotonic() - started
            op.check(s3, tmp_path, prepared, got)
            seen = op.requests(proxy, s3)
            bound = time_bound(retries, throttling=label in THROTTLING or label == "HTTP 500")
            assert rule.hits == retries, f"{label} on {op.name}: {rule.hits} of {retries} faults fired"
            assert len(seen) == retries + 1, f"{label} on {op.name}: {[(r.outcome, r.fault) for r in seen]}"
            assert took <= bound, f"{label} on {op.name}: {took:.2f} s > {bound:.2f} s"
            outcomes.setdefault(label, []).append((op.name, retries, len(seen), took, bound))
    # A slow upload link (every chunk of the body delayed) is not a fault to retry: one attempt, data intact.
    # The quick sample slows a 200 kB PUT; the full count a 6 MiB multipart upload too.
    slow = []
    for i in range(per_kind):
        proxy.clear()
        if i % 2:
            source = _upload_prepare(s3, tmp_path)
            # The rule slows one PUT: either part (5 MiB or 1 MiB, sent in parallel); bound by the smaller.
            key, size, chunk = "ops/upload.bin", 1 * MiB, 256 * 1024

            def send(storage: S3Storage, key: str = "ops/upload.bin", source: Path = source) -> None:
                storage.upload_file(source, s3.uri(key))
        else:
            source = tmp_path / "slow.bin"
            source.write_bytes(_put_prepare(s3, tmp_path))
            key, size, chunk = "ops/slow.bin", 200_000, 16 * 1024

            def send(storage: S3Storage, key: str = "ops/slow.bin", source: Path = source) -> None:
                storage.write_bytes(s3.uri(key), source.read_bytes())

        path_re = "^/" + re.escape(f"{s3.bucket}/{key}") + "$"
        rule = proxy.add(Rule("slow", method="PUT", path=path_re, count=1, delay=0.01, chunk_bytes=chunk))
        started = time.monotonic()
        send(storage)
        took = time.monotonic() - started
        assert s3.get_bytes(key) == source.read_bytes()
        assert rule.hits == 1 and len(proxy.seen(method="PUT", path=re.escape(key))) == -(
            -source.stat().st_size // (5 * MiB)
        )
        assert took >= 0.01 * (size // chunk - 1), f"the slow link did not slow the upload ({took:.2f} s)"
        slow.append(took)
    total = sum(len(v) for v in outcomes.values()) + len(slow)
    worst = max((took / bound for v in outcomes.values() for *_, took, bound in v), default=0.0)
    attempts = {label: sorted({n for _, _, n, _, _ in v}) for label, v in outcomes.items()}
    figure(
        scenario=SCENARIO,
        injection=f"transient faults on S3 requests ({', '.join(TRANSIENT)}, slow link), 1-3 per request",
        count=total,
        invariant="each retried until it succeeds, attempts = faults + 1, time within the back-off bound",
        result=(
            f"{total - len(slow)}/{total - len(slow)} operations succeeded after their faults; attempts seen "
            f"{attempts}; slowest {100 * worst:.0f} % of its bound; slow link: {len(slow)} uploads intact in "
            f"{max(slow, default=0):.1f} s max"
        ),
        notes="S3Storage through a proxy in front of moto; put/get/list/multipart upload/download/conditional create",
    )


EXHAUSTING: dict[str, dict[str, Any]] = {
    "HTTP 500": {"kind": "status", "status": 500},
    "reset mid-answer": {"kind": "reset_response", "after_bytes": 100},
    "503 SlowDown": {"kind": "slowdown"},
    "reset mid-request": {"kind": "reset_request", "after_bytes": 1024},
    "answer lost": {"kind": "drop_response"},
}


def test_a_fault_on_every_attempt_is_a_retryable_error_after_all_attempts(
    s3: S3Harness, via_proxy: FaultProxy, tmp_path: Path, rng: random.Random, figure: Figure
) -> None:
    cases = [
        (label, name) for label in EXHAUSTING for name in ("put", "get") if (label, name) != ("reset mid-answer", "put")
    ]
    cases = cases if is_full() else [("HTTP 500", "put"), ("reset mid-answer", "get")]
    took_max = 0.0
    for label, name in cases:
        op, fault = OPS[name], EXHAUSTING[label]
        via_proxy.clear()
        prepared = op.prepare(s3, tmp_path)
        rule = via_proxy.add(op.rule(s3, count=None, **fault))
        storage = faulty_storage()  # a fresh retry quota for each exhausting case
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            op.run(storage, s3, tmp_path, prepared)
        took = time.monotonic() - started
        failure = failure_of(caught.value)
        assert failure.exit_code == 1 and not failure.permanent, failure
        assert s3.uri(op.key) in failure.message, failure.message
        assert rule.hits == ATTEMPTS == len(op.requests(via_proxy, s3)), (label, name, rule.hits)
        bound = time_bound(ATTEMPTS - 1, throttling=True)
        assert took <= bound, f"{label} on {name}: {took:.2f} s > {bound:.2f} s"
        took_max = max(took_max, took)
    figure(
        scenario=SCENARIO,
        injection=f"a transient fault on every attempt ({', '.join(EXHAUSTING)}) of a PUT or GET",
        count=len(cases),
        invariant=f"exactly {ATTEMPTS} attempts, then a retryable error (exit 1) naming the object, within "
        f"{time_bound(ATTEMPTS - 1, throttling=True):.0f} s",
        result=f"{len(cases)}/{len(cases)} gave up after {ATTEMPTS} attempts with exit 1 naming the object, "
        f"in {took_max:.1f} s max",
    )


PERMANENT: dict[str, dict[str, Any]] = {
    "bucket gone (404 NoSuchBucket)": {"kind": "no_such_bucket"},
    "403 AccessDenied": {"kind": "status", "status": 403, "code": "AccessDenied"},
}


def test_permanent_errors_are_not_retried_and_name_the_bucket_and_key(
    s3: S3Harness, via_proxy: FaultProxy, tmp_path: Path, figure: Figure
) -> None:
    rounds = sample(quick=1, full=20 // len(OPS) + 1)
    results: list[tuple[str, str, int, float]] = []
    storage = faulty_storage()
    for k, (label, fault) in enumerate(PERMANENT.items()):
        for _ in range(rounds):
            # the quick sample gives each operation one of the two errors; the full count both, many times
            for op in list(OPS.values())[0 if is_full() else k :: 1 if is_full() else len(PERMANENT)]:
                via_proxy.clear()
                prepared = op.prepare(s3, tmp_path)
                # The bucket disappears for every request; 403 answers the operation's own request.
                rule = via_proxy.add(
                    Rule(count=None, **fault) if fault["kind"] == "no_such_bucket" else op.rule(s3, count=None, **fault)
                )
                started = time.monotonic()
                with pytest.raises(StorageError) as caught:
                    op.run(storage, s3, tmp_path, prepared)
                took = time.monotonic() - started
                failure = failure_of(caught.value)
                assert failure.exit_code == ExitCode.INVALID_CONFIG and failure.permanent, (label, op.name, failure)
                assert s3.bucket in failure.message, failure.message
                assert (op.named or op.key) in failure.message, failure.message
                faulted = via_proxy.seen(faulted=True)
                assert len({(r.method, r.path, r.query) for r in faulted}) == len(faulted), "a request was retried"
                assert rule.hits >= 1 and took <= OVERHEAD_S, (label, op.name, took)
                results.append((label, op.name, len(faulted), took))
    figure(
        scenario=SCENARIO,
        injection="permanent errors: the bucket disappears (404 NoSuchBucket), 403 AccessDenied",
        count=len(results),
        invariant="no retry; exit 10 (InvalidConfig) with a message naming bucket and key, fast",
        result=(
            f"{len(results)}/{len(results)} ended with exit 10 naming bucket and key; 0 requests repeated "
            f"(at most {max(n for *_, n, _ in results)} distinct ones: a folder upload sends its files at once); "
            f"{max(t for *_, t in results):.2f} s max"
        ),
        notes="same six operations as the transient row",
    )


# --- regressions: defects these injections found -------------------------------------------------------


def test_a_lost_answer_to_a_conditional_write_is_not_someone_elses_write(s3: S3Harness, via_proxy: FaultProxy) -> None:
    """The answer to ``If-None-Match: *`` / ``If-Match`` PUT lost after the store applied it: botocore
    retries, the retry loses the condition to the first attempt. That used to read as "already exists"
    (``tuneloop run`` then claimed run 2 and left runs/1/run.json behind) or "changed since it was read"."""
    storage = S3Storage()
    via_proxy.add(Rule("drop_response", method="PUT", path=r"/out/runs/1/run\.json$", count=1))
    claim = claim_next_run(storage, s3.uri("out/"), JobIdentity(name="local"), spec_hash="h", by="tuneloop run")
    assert claim.run == 1 and s3.list_keys("out/") == ["out/runs/1/run.json"]
    assert via_proxy.injected() == 1
    # A real conflict stays one, lost answer or not.
    s3.put_bytes("taken.json", b"theirs")
    via_proxy.add(Rule("drop_response", method="PUT", path=r"/taken\.json$", count=1))
    with pytest.raises(PreconditionFailedError):
        storage.create_bytes(s3.uri("taken.json"), b"mine")
    assert s3.get_bytes("taken.json") == b"theirs"
    version = storage.read_versioned(s3.uri("taken.json"))
    via_proxy.add(Rule("drop_response", method="PUT", path=r"/taken\.json$", count=1))
    storage.replace_bytes(s3.uri("taken.json"), b"mine", etag=version.etag)
    assert s3.get_bytes("taken.json") == b"mine"
    with pytest.raises(PreconditionFailedError):
        storage.replace_bytes(s3.uri("taken.json"), b"again", etag=version.etag)


def test_an_answer_cut_off_mid_body_is_read_again(s3: S3Harness, via_proxy: FaultProxy) -> None:
    """botocore retries requests, not the reading of their answers: a connection broken mid-body used to
    fail read_bytes / read_versioned / read_range at once (reported as "cannot reach" the store), and
    open_read streams (the operator's row counts of new data) too."""
    data = _payload(100_000, "cut")
    s3.put_bytes("cut.bin", data)
    storage = S3Storage()
    via_proxy.add(Rule("reset_response", method="GET", path=r"/cut\.bin$", count=2, after_bytes=500))
    assert storage.read_bytes(s3.uri("cut.bin")) == data
    via_proxy.add(Rule("reset_response", method="GET", path=r"/cut\.bin$", count=1, after_bytes=500))
    assert storage.read_versioned(s3.uri("cut.bin")).data == data
    via_proxy.add(Rule("reset_response", method="GET", path=r"/cut\.bin$", count=1, after_bytes=500))
    assert storage.read_range(s3.uri("cut.bin"), 10, 90_000) == data[10:90_000]
    via_proxy.add(Rule("reset_response", method="GET", path=r"/cut\.bin$", count=2, after_bytes=30_000))
    with storage.open_read(s3.uri("cut.bin")) as stream:  # a stream resumes where it broke off
        assert stream.read() == data
    resumed = via_proxy.seen(method="GET")[-2:]
    assert [r.fault for r in resumed] == ["reset_response", None], resumed
    assert via_proxy.injected() == 6 and len(via_proxy.seen(method="GET")) == 10


# --- checkpoints are never half-visible ---------------------------------------------------------


def _state(step: int) -> CheckpointState:
    gen = torch.Generator().manual_seed(SEED + step)
    return CheckpointState(
        tensors={"w": torch.randn(64, 64, generator=gen), "b": torch.full((64,), float(step))},
        objects={"note": [step]},
        meta={"step": step, "epoch": step / 10, "metrics": {"loss": 1.0 / (step + 1)}},
    )


def _half_visible(reader: CheckpointManager, tmp: Path) -> list[str]:
    """Steps a reader would take as complete whose objects do not all verify against the manifest."""
    bad = []
    for info in reader.complete():
        for entry in info.manifest["files"]:
            dest = tmp / f"verify-{info.step}-{entry['name']}"
            try:
                reader.storage.download_file(f"{info.uri}/{entry['name']}", dest, expected_sha256=entry["sha256"])
            except StorageError as exc:
                bad.append(f"step {info.step} {entry['name']}: {exc}")
    return bad


CHECKPOINT_FAULTS: dict[str, dict[str, Any]] = {
    "HTTP 500 on every attempt": {"kind": "status", "status": 500},
    "reset mid-request on every attempt": {"kind": "reset_request", "after_bytes": 2048},
    "403": {"kind": "status", "status": 403, "code": "AccessDenied"},
    "bucket gone": {"kind": "no_such_bucket"},
    "SlowDown on every attempt": {"kind": "slowdown"},
}


def test_a_failed_checkpoint_upload_is_never_half_visible(
    s3: S3Harness, via_proxy: FaultProxy, tmp_path: Path, rng: random.Random, figure: Figure
) -> None:
    n = sample(quick=2, full=20)
    base = s3.uri("jobs/ckpt/runs/1/checkpoints")
    writer = CheckpointManager(S3Storage(max_attempts=2), base, tmp_path / "local", keep=3)
    # The reader talks to moto directly: it is never faulted, it only looks.
    reader = CheckpointManager(S3Storage(env=dict(s3.env)), base, tmp_path / "reader", keep=3)
    names = [MANIFEST_NAME, "model.safetensors", "state.pt", "meta.json"]
    failed = half = leftovers = 0
    labels = list(CHECKPOINT_FAULTS)
    step = 0
    for i in range(n):
        step += 1
        writer.save(step, _state(step), blocking=True)  # a good one to fall back to
        good = step
        step += 1
        label = labels[i % len(labels)] if not is_full() else rng.choice(labels)
        name = names[i % len(names)] if not is_full() else rng.choice(names)
        fault = CHECKPOINT_FAULTS[label]
        key = re.escape(f"/checkpoints/step-{step:08d}/{name}") + "$"
        via_proxy.clear()
        via_proxy.add(Rule(count=None, method="PUT", path=key, **fault))
        # A reader polls while the upload fails; it must never take the failing step as complete.
        seen_complete: set[int] = set()
        stop = threading.Event()

        def poll(stop: threading.Event = stop, seen: set[int] = seen_complete) -> None:
            while not stop.wait(0.02):
                seen.update(info.step for info in reader.complete())

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        with pytest.raises(StorageError) as caught:
            writer.save(step, _state(step), blocking=True)
        stop.set()
        poller.join(30)
        failed += 1
        assert f"step-{step:08d}/{name}" in str(caught.value), str(caught.value)
        latest = reader.latest_complete()
        assert latest is not None and latest.step == good, f"{label} on {name}: latest {latest}"
        assert step not in seen_complete, f"{label} on {name}: step {step} was visible as complete"
        problems = _half_visible(reader, tmp_path)
        half += len(problems)
        assert not problems, problems
    # Faults gone: the next save succeeds and retention removes the incomplete leftovers.
    via_proxy.clear()
    step += 1
    writer.save(step, _state(step), blocking=True)
    writer.close()
    dirs = {k.split("/")[5] for k in s3.list_keys("jobs/ckpt/runs/1/checkpoints/")}
    complete = {f"step-{info.step:08d}" for info in reader.complete()}
    leftovers = len(dirs - complete)
    assert leftovers == 0, sorted(dirs - complete)
    assert not _half_visible(reader, tmp_path)
    figure(
        scenario=SCENARIO,
        injection="a checkpoint object (data files or manifest) fails to upload: 500, SlowDown or a reset on "
        "every attempt, 403, bucket gone",
        count=n,
        invariant="a checkpoint is never half-visible: the reader sees only checkpoints whose objects all verify",
        result=(
            f"{failed}/{n} uploads failed with an error naming the object; 0 failing steps seen complete by a "
            f"polling reader; {half} half-visible checkpoints; {leftovers} incomplete leftovers after the next save"
        ),
        notes="CheckpointManager (trainer) writing through the proxy, a second manager reading moto directly",
    )


# --- the operator's S3 reads and writes -------------------------------------------------------------


class _NoKube:
    """JobStorage only asks the API for a Secret when the job names one; these jobs do not."""

    async def get_secret_data(self, namespace: str, name: str) -> None:
        raise AssertionError("no Secret expected")


def _job(s3: S3Harness) -> FineTuneJob:
    m = manifest("sequence-classification", Path("/m"), Path("/d.jsonl"), Path("/o"))
    m["metadata"] = {"name": "faults", "namespace": "team", "uid": "uid-5"}
    m["spec"]["model"]["uri"] = s3.uri("models/m/")
    m["spec"]["dataset"]["uri"] = s3.uri("data/")
    m["spec"]["output"]["uri"] = s3.uri("jobs/op/")
    return FineTuneJob.from_manifest(m)


def _heartbeat(run: int, step: int) -> bytes:
    body = {"run": run, "jobUid": "uid-5", "phase": "training", "step": step, "totalSteps": 10}
    body["lastUpdatedTime"] = datetime.now(UTC).isoformat()
    return json.dumps(body).encode()


OPERATOR_TRANSIENT: dict[str, dict[str, Any]] = {
    "HTTP 500": {"kind": "status", "status": 500},
    "503 SlowDown": {"kind": "slowdown"},
    "reset mid-request": {"kind": "reset_request"},
    "reset mid-answer": {"kind": "reset_response", "after_bytes": 20},
    "answer lost": {"kind": "drop_response"},
}


QUICK_OPERATOR_FAULTS = ("HTTP 500", "reset mid-answer", "answer lost")


def test_the_operator_reads_and_claims_through_faults(
    s3: S3Harness, via_proxy: FaultProxy, rng: random.Random, figure: Figure
) -> None:
    n = sample(quick=1, full=4)  # rounds; each injects one fault of every kind into each of 5 calls
    job = _job(s3)
    for i in range(3):
        s3.put_bytes(f"data/part-{i}.jsonl", b"".join(b'{"text": "t", "label": "a"}\n' for _ in range(5 + i)))
    injected = 0
    took_max = 0.0

    async def scenario(round_: int) -> None:
        nonlocal injected, took_max
        run = round_ + 1
        s3.put_bytes(f"jobs/op/{Layout.status(run)}", _heartbeat(run, 3 + run))
        kinds = OPERATOR_TRANSIENT if is_full() else {k: OPERATOR_TRANSIENT[k] for k in QUICK_OPERATOR_FAULTS}
        for label, fault in kinds.items():
            retries = 1 if not is_full() else rng.randint(1, ATTEMPTS - 1)
            # fresh clients per fault kind: the retry quota of one client is not what is measured here
            storages = JobStorage(_NoKube())  # type: ignore[arg-type]
            beats, outputs, watch = HeartbeatReader(_NoKube(), storages), OutputAccess(storages), DataWatch()  # type: ignore[arg-type]
            await storages.for_job(job)
            via_proxy.clear()
            # every call below meets `retries` faults of this kind on each object it touches
            for path, method in (
                (r"/jobs/op/runs/\d+/status\.json$", "GET"),
                (r"/jobs/op/owner\.json$", None),
                (r"/jobs/op/runs/\d+/run\.json$", "PUT"),
                (r"/jobs/op/runs/index\.json$", None),
                (r"/data/part-1\.jsonl$", "GET"),
            ):
                if fault["kind"] in ("reset_response",) and method == "PUT":
                    continue
                via_proxy.add(Rule(method=method, path=path, count=retries, **fault))
            started = time.monotonic()
            beat = await beats.read(job, run)
            assert beat is not None and beat.step == 3 + run, beat
            view = await outputs.observe(job)
            assert view.error is None, view.error
            identity = JobIdentity(name="faults", namespace="team", uid="uid-5")
            await outputs.claim(job, OutputClaim(identity=identity, run=run, spec_hash="h", continue_lineage=False))
            await outputs.append_index(job, [{"run": run, "label": label}])
            listing = await watch.listing(storages_for := await storages.for_job(job), s3.uri("data/"), max_age=0)
            count = await watch.count_new_rows(storages_for, s3.uri("data/"), listing, None, limit_bytes=1 << 20)
            took = time.monotonic() - started
            took_max = max(took_max, took)
            assert count.rows == 5 + 6 + 7 and count.exact, (label, count.detail)
            owner = json.loads(s3.get_bytes("jobs/op/owner.json"))
            assert owner["owner"]["uid"] == "uid-5", owner
            assert json.loads(s3.get_bytes(f"jobs/op/{Layout.run_claim(run)}"))["job"]["uid"] == "uid-5"
            records = json.loads(s3.get_bytes("jobs/op/runs/index.json"))["records"]
            assert records.count({"run": run, "label": label}) == 1, records
            injected += via_proxy.injected()
            bound = 5 * time_bound(retries, throttling=True)
            assert took <= bound, f"{label}: {took:.2f} s > {bound:.2f} s"

    for round_ in range(n):
        asyncio.run(scenario(round_))

    # The bucket disappears: every reader says so, naming the bucket and the key, without retrying.
    async def gone() -> tuple[str, str, float]:
        storages = JobStorage(_NoKube())  # type: ignore[arg-type]
        via_proxy.clear()
        via_proxy.add(Rule("no_such_bucket", count=None))
        started = time.monotonic()
        with pytest.raises(HeartbeatError) as beat_error:
            await HeartbeatReader(_NoKube(), storages).read(job, 1)  # type: ignore[arg-type]
        view = await OutputAccess(storages).observe(job)
        with pytest.raises(StorageError) as watch_error:
            await DataWatch().listing(await storages.for_job(job), s3.uri("data/"), max_age=0)
        took = time.monotonic() - started
        for message in (str(beat_error.value), view.error or "", str(watch_error.value)):
            assert f"bucket {s3.bucket} does not exist" in message, message
        assert "jobs/op/runs/1/status.json" in str(beat_error.value) and "data/" in str(watch_error.value)
        return str(beat_error.value), view.error or "", took

    sequences = n * (len(OPERATOR_TRANSIENT) if is_full() else len(QUICK_OPERATOR_FAULTS))
    _, _, gone_took = asyncio.run(gone())
    assert len(via_proxy.seen()) == len({(r.method, r.path, r.query) for r in via_proxy.seen()}), "retried"
    assert gone_took <= OVERHEAD_S + 1.0
    figure(
        scenario=SCENARIO,
        injection="operator S3 calls (heartbeat read, output owner/runs read, claims, index append, dataset "
        "listing and row count) under 500, SlowDown, resets, lost answers; then the bucket disappears",
        count=injected,
        invariant="same result as without faults, claims and index records exactly once; a gone bucket is "
        "reported by name without retries",
        result=(
            f"{injected} faults injected over {sequences} call sequences: all results exact, "
            f"0 duplicate index records, slowest sequence {took_max:.1f} s; bucket gone: named by all 3 readers "
            f"in {gone_took:.2f} s"
        ),
        notes="tuneloop_operator heartbeat/outputs/datawatch called directly",
    )


# --- the trainer: checkpoint and final model upload ---------------------------------------------------


def _trainer_job(tiny_model_dir: Any, tmp_path: Path, s3: S3Harness, prefix: str) -> dict[str, Any]:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text", n=40))
    m = manifest(
        "sequence-classification", tiny_model_dir("bert"), data, tmp_path / "unused", hyperparameters={"epochs": 1}
    )
    m["spec"]["output"]["uri"] = s3.uri(prefix)
    m["spec"]["output"]["checkpoint"] = {"everySteps": 2, "keep": 2}
    return m


#: Transient faults in a trainer run: each fires fewer times than the attempts allowed.
TRAINER_TRANSIENT: list[dict[str, Any]] = [
    {"kind": "slowdown", "method": "PUT", "path": r"/checkpoints/step-\d+/model\.safetensors$", "count": 1},
    {"kind": "reset_request", "method": "PUT", "path": r"/checkpoints/step-\d+/state\.pt$", "count": 2},
    {"kind": "status", "status": 500, "method": "PUT", "path": r"/checkpoints/step-\d+/manifest\.json$", "count": 2},
    {"kind": "status", "status": 503, "method": "PUT", "path": r"/runs/1/model/[^/]+\.safetensors$", "count": 3},
    {"kind": "reset_request", "method": "PUT", "path": r"/runs/1/model/", "count": 2, "after_bytes": 100},
    {"kind": "drop_response", "method": "PUT", "path": r"/runs/1/model-card\.json$", "count": 1},
    {"kind": "reset_response", "method": "GET", "path": r"/checkpoints/step-\d+/manifest\.json$", "count": 1},
    {"kind": "slow", "method": "PUT", "path": r"/runs/1/report/", "count": 3, "delay": 0.01, "chunk_bytes": 4096},
]


def _check_outputs(s3: S3Harness, prefix: str, tmp_path: Path) -> list[str]:
    """The run's model downloads and verifies (SHA-256 of every object); every checkpoint it left verifies."""
    direct = Storage.for_uri(s3.uri())
    files = direct.download_prefix(s3.uri(f"{prefix}runs/1/model/"), tmp_path / "model-check")
    names = sorted(p.name for p in files)
    assert any(n.endswith(".safetensors") for n in names) and "adapter_config.json" in names, names
    card = json.loads(s3.get_bytes(f"{prefix}runs/1/model-card.json"))
    assert card, "empty model card"
    reader = CheckpointManager(direct, s3.uri(f"{prefix}runs/1/checkpoints"), tmp_path / "r", keep=2)
    assert not _half_visible(reader, tmp_path)
    return names


@pytest.mark.slow  # ~15 s per run on 2 cores (most of it the report's plots): `make reliability` runs it
def test_the_trainer_survives_transient_faults_and_names_permanent_ones(
    tiny_model_dir: Any, s3: S3Harness, via_proxy: FaultProxy, tmp_path: Path, figure: Figure
) -> None:
    for spec in TRAINER_TRANSIENT:
        via_proxy.add(Rule(**spec))
    m = _trainer_job(tiny_model_dir, tmp_path, s3, "jobs/ok/")
    started = time.monotonic()
    result = run_recipe(m, tmp_path / "ok")
    took_ok = time.monotonic() - started
    fired = {f"{r.kind}:{r.path}": r.hits for r in via_proxy.rules}
    assert all(r.spent for r in via_proxy.rules), fired
    assert result.model_uri == s3.uri("jobs/ok/runs/1/model/")
    _check_outputs(s3, "jobs/ok/", tmp_path / "ok")
    transient_faults = via_proxy.injected()

    # Permanent: the bucket disappears when the model is uploaded; a 403 on a checkpoint's manifest.
    permanent = [
        ("bucket gone at the model upload", Rule("no_such_bucket", method="PUT", path=r"/runs/1/model/", count=None)),
        ("403 on a checkpoint manifest", Rule("status", status=403, method="PUT", path=MANIFEST_NAME, count=None)),
    ]
    exits = []
    for i, (label, rule) in enumerate(permanent):
        via_proxy.clear()
        via_proxy.add(rule)
        prefix = f"jobs/bad{i}/"
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            run_recipe(_trainer_job(tiny_model_dir, tmp_path, s3, prefix), tmp_path / f"bad{i}")
        took = time.monotonic() - started
        failure = failure_of(caught.value)
        assert failure.exit_code == ExitCode.INVALID_CONFIG, (label, failure)
        assert s3.bucket in failure.message and f"{prefix}runs/1/" in failure.message, failure.message
        faulted = via_proxy.seen(faulted=True)
        assert len({(r.method, r.path) for r in faulted}) == len(faulted) == rule.hits, f"{label}: retried"
        assert took <= took_ok + 30, f"{label}: {took:.1f} s"
        reader = CheckpointManager(Storage.for_uri(s3.uri()), s3.uri(f"{prefix}runs/1/checkpoints"), tmp_path, keep=2)
        assert not _half_visible(reader, tmp_path / f"bad{i}")
        exits.append((label, failure.exit_code, took))

    cli = ""
    if is_full():
        cli = _cli_runs(tiny_model_dir, s3, via_proxy, tmp_path)
    figure(
        scenario=SCENARIO,
        injection=f"a tiny `tuneloop run` to s3:// with {len(TRAINER_TRANSIENT)} transient fault rules on checkpoint "
        "and model uploads; then permanent ones (bucket gone at the model upload, 403 on a checkpoint manifest)",
        count=1 + len(exits) + (2 if cli else 0),
        invariant="transient: the run succeeds with a model and checkpoints that verify; permanent: exit 10 "
        "naming bucket and key, no retry, no half-visible checkpoint",
        result=(
            f"{transient_faults} transient faults absorbed, run succeeded in {took_ok:.1f} s, outputs verified; "
            + "; ".join(f"{label}: exit {code} in {took:.1f} s, 1 attempt per object" for label, code, took in exits)
            + (f"; CLI: {cli}" if cli else "")
        ),
        notes="recipe in-process (the CLI's exit mapping, tuneloop_trainer.errors.failure_of); full count adds "
        "`tuneloop run` subprocesses",
    )


def _cli_runs(tiny_model_dir: Any, s3: S3Harness, proxy: FaultProxy, tmp_path: Path) -> str:
    """`tuneloop run` as a user types it: with transient faults (claims' answers lost, heartbeats failing),
    then with the bucket gone at the model upload."""
    env = {"AWS_ENDPOINT_URL_S3": proxy.endpoint_url}
    proxy.clear()
    proxy.add(Rule("drop_response", method="PUT", path=r"/jobs/cli/runs/1/run\.json$", count=1))
    proxy.add(Rule("drop_response", method="PUT", path=r"/jobs/cli/owner\.json$", count=1))
    proxy.add(Rule("slowdown", method="PUT", path=r"/runs/1/status\.json$", count=2))
    for spec in TRAINER_TRANSIENT:
        proxy.add(Rule(**spec))
    ok = run_job(_trainer_job(tiny_model_dir, tmp_path / "cli-ok", s3, "jobs/cli/"), tmp_path / "cli-ok", env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert not [k for k in s3.list_keys("jobs/cli/runs/") if k.startswith("jobs/cli/runs/2/")], "a second run"
    _check_outputs(s3, "jobs/cli/", tmp_path / "cli-ok")
    proxy.clear()
    proxy.add(Rule("no_such_bucket", method="PUT", path=r"/jobs/cli-bad/runs/1/model/", count=None))
    started = time.monotonic()
    bad = run_job(
        _trainer_job(tiny_model_dir, tmp_path / "cli-bad", s3, "jobs/cli-bad/"), tmp_path / "cli-bad", env=env
    )
    took = time.monotonic() - started
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == ExitCode.INVALID_CONFIG, bad.stderr[-3000:]
    assert last.startswith("error (InvalidConfig, exit 10, permanent):"), last
    assert f"bucket {s3.bucket} does not exist" in last and "jobs/cli-bad/runs/1/model/" in last, last
    return f"transient run exit 0 in runs/1; bucket gone: exit 10 in {took:.0f} s, last line names bucket and key"
