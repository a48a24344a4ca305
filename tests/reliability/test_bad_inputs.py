"""Scenario 7 of issue #13: bad data and bad models through ``tuneloop run``.

Each case of :data:`CASES` writes one bad input (``tests/harness/bad_inputs.py``), runs the
trainer's ``run`` command on it and checks how the run ends: the documented exit code, one line
naming the file or field and what to do, no Python traceback, and never a ``runs/<n>/`` that
looks complete (a model card, a ``model/`` folder or a ``succeeded`` heartbeat) unless the run
succeeded. The table runs the trainer's entry point in this process (``main(["run", ...])``, the
code ``tuneloop run`` starts as a child after validating the manifest, which every case here
passes); the cases about processes (Ctrl-C, two runs at once, S3 that does not answer) start
``tuneloop run`` itself.

Already covered elsewhere, not repeated here: a truncated weights file and a head with other
labels (tests/integration/test_trainer_inputs.py, tests/unit/trainer/test_input_safety.py),
oversize rows in every format, broken tokenizers and configs (test_input_safety.py), unsafe S3
keys (test_trainer_inputs.py), Ctrl-C and SIGTERM in the middle of training and missing S3
credentials (tests/integration/test_trainer_exits.py), a single training class
(tests/unit/trainer/test_data_prepare.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import bad_inputs as bad
from tests.harness.reliability import Figure, is_full, sample
from tests.harness.s3 import S3Harness
from tests.harness.trainer_jobs import manifest
from tests.manifests import ROOT
from tuneloop.contract import ExitCode

SCENARIO = "7. Bad data and bad models"
#: Longest a bad-input case may take in this process before it counts as a hang.
CASE_TIMEOUT_S = 120.0
SEED = 13

DataMaker = Callable[[Path], Path]
ModelMaker = Callable[[Path, Path], Path]  # (tiny bert dir, case dir) -> model dir


@dataclass(frozen=True)
class Case:
    name: str
    data: DataMaker
    code: int
    fragments: tuple[str, ...] = ()
    """Each must be in the last line of stderr and in the termination message (failures) or in
    the run's validation report / card (successes: what was dropped and why)."""
    model: ModelMaker | None = None
    quick: bool = True
    dropped: dict[str, int] = field(default_factory=dict)
    """Successes: rows the validation report must count as dropped, per reason."""


def _good(d: Path) -> Path:
    return bad._write(d / "d.jsonl", bad.jsonl_bytes(bad.good_rows()))


def _model(damage: Callable[[Path], Path]) -> ModelMaker:
    return lambda bert, d: damage(bad.copy_model(bert, d / "model"))


DATA = int(ExitCode.INVALID_DATA)
MODEL = int(ExitCode.UNSUPPORTED_MODEL)
CASES = [
    # --- encodings and line ends: the good rows train, the bad ones are counted ---------------
    Case("bom-crlf-nul-bad-utf8-ragged-csv", lambda d: bad.messy_csv(d / "d.csv"), 0, dropped={"undecodable": 12}),
    Case(
        "invalid-utf8-some-rows", lambda d: bad.invalid_utf8(d / "d.jsonl"), 0, dropped={"undecodable": 10}, quick=False
    ),
    Case(
        "invalid-utf8-every-row",
        lambda d: bad.invalid_utf8(d / "d.jsonl", every=1),
        DATA,
        ("no training rows left", "48 undecodable", "d.jsonl:1 (invalid UTF-8)"),
    ),
    Case("bom-csv", lambda d: bad.with_bom(d / "d.csv"), 0, dropped={}, quick=False),
    Case("bom-jsonl", lambda d: bad.with_bom(d / "d.jsonl", kind="jsonl"), 0, quick=False),
    Case("crlf-csv", lambda d: bad.crlf(d / "d.csv"), 0, dropped={}, quick=False),
    Case("nul-bytes-in-text", lambda d: bad.nul_bytes(d / "d.csv", every=1), 0, quick=False),
    Case(
        "utf16-csv",
        lambda d: bad.utf16(d / "d.csv"),
        DATA,
        ("d.csv is UTF-16 or UTF-32 encoded", "save it again as UTF-8"),  # was: "does not look like a header"
    ),
    # --- shapes -------------------------------------------------------------------------------
    Case("ragged-csv-some-rows", lambda d: bad.ragged_csv(d / "d.csv"), 0, dropped={"undecodable": 16}, quick=False),
    Case(
        "ragged-csv-every-row",
        lambda d: bad.ragged_csv(d / "d.csv", every=1),
        DATA,
        ("no training rows left", "d.csv:2 (4 fields where the header has 2)"),
    ),
    Case(
        "one-50MB-line",
        lambda d: bad.one_huge_line(d / "d.jsonl"),
        0,
        quick=False,
        dropped={"too_large": 1},
    ),
    Case(
        "only-an-oversize-row",
        lambda d: bad.only_huge_line(d / "d.jsonl"),
        DATA,
        ("1 too_large", "over dataset.cleaning.maxRowBytes 1,048,576"),
    ),
    Case("empty-jsonl", lambda d: bad.empty(d / "d.jsonl"), DATA, ("no rows in file://", "d.jsonl")),
    Case("empty-csv", lambda d: bad.empty(d / "d.csv"), DATA, ("no rows in file://", "d.csv")),
    Case("blank-lines-only", lambda d: bad.blank_lines(d / "d.jsonl"), DATA, ("no rows in file://",)),
    Case("csv-header-only", lambda d: bad.header_only(d / "d.csv"), DATA, ("no rows in file://", "d.csv")),
    Case("random-bytes-as-jsonl", lambda d: bad.binary_junk(d / "d.jsonl"), DATA, ("undecodable", "d.jsonl:1")),
    Case(
        "random-bytes-as-parquet",
        lambda d: bad.binary_junk(d / "d.parquet"),
        DATA,
        ("cannot read d.parquet as Parquet",),
    ),
    # --- labels -------------------------------------------------------------------------------
    Case(
        "one-class",
        lambda d: bad.one_class(d / "d.jsonl"),
        DATA,
        ("only one label in the training split (pos:", "dataset.columns.label"),
    ),
    Case(
        "nan-labels",
        lambda d: bad.odd_labels(d / "d.jsonl", float("nan")),
        DATA,
        ("48 unknown_label", "d.jsonl:1 (no label)"),
    ),
    Case(
        "float-labels",
        lambda d: bad.odd_labels(d / "d.jsonl", 0.5),
        DATA,
        ("48 unknown_label", "label 0.5 is not a class"),
    ),
    Case(
        "bool-labels",
        lambda d: bad.odd_labels(d / "d.jsonl", True),
        DATA,
        ("only one label in the training split (true:",),
    ),
    Case(
        "dict-labels",
        lambda d: bad.odd_labels(d / "d.jsonl", {"name": "pos"}),
        DATA,
        ("48 unknown_label", "label is a dict, not a class"),
    ),
    Case(
        "one-row-of-each-odd-label",  # the bool row makes a third class "true"; the others are dropped
        lambda d: bad.mixed_odd_labels(d / "d.jsonl"),
        MODEL,
        ("with 2 labels, but the data has 3 labels",),
    ),
    # --- files and folders --------------------------------------------------------------------
    Case(
        "symlink-out-of-the-dataset-folder",
        lambda d: bad.symlink_out(d / "data", d / "private" / "keys.jsonl"),
        DATA,
        ("spec.dataset.uri: 'b.jsonl' in file://", "a link to a file outside that folder"),
    ),
    # --- models -------------------------------------------------------------------------------
    Case(
        "safetensors-header-garbled",
        _good,
        MODEL,
        ("weights file model.safetensors of file://", "truncated or corrupt", "spec.model.uri"),
        model=_model(bad.corrupt_safetensors_header),
    ),
    Case(
        "safetensors-header-length-past-the-end",
        _good,
        MODEL,
        ("model.safetensors", "truncated or corrupt"),
        model=_model(bad.huge_header_length),
    ),
    Case(
        "safetensors-nan-weights",  # defect fixed: was a crash (exit 1, traceback) in a baseline
        _good,
        MODEL,
        ("hold NaN or infinite values", "spec.model.uri"),
        model=_model(bad.nan_weights),
    ),
    Case(
        "model-without-config",
        _good,
        MODEL,
        ("holds no config.json", "spec.model.uri"),
        model=_model(lambda m: bad.without(m, "config.json")),
    ),
    Case(
        "model-without-weights",  # defect fixed: was a crash (exit 1, traceback, retried)
        _good,
        MODEL,
        ("holds no weights", "save_pretrained", "spec.model.uri"),
        model=_model(lambda m: bad.without(m, "model.safetensors")),
    ),
    Case(
        "model-config-without-model-type",
        _good,
        MODEL,
        ("cannot read the model config of file://", "model_type"),
        model=_model(bad.config_without_model_type),
        quick=False,
    ),
]


# --- running the trainer's `run` command in this process ---------------------------------------


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    out: Path
    summary: dict[str, Any] | None

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def job_file(d: Path, model_dir: Path, data: Path, **spec: Any) -> Path:
    """A classification job on ``data`` (two steps unless ``hyperparameters`` says otherwise; a
    ``None`` there leaves that setting out)."""
    hp = {"epochs": 1, "maxSteps": 2, "batchSize": 8, "maxSeqLength": 32, "seed": 1, **spec.pop("hyperparameters", {})}
    hp = {k: v for k, v in hp.items() if v is not None}
    m = manifest("sequence-classification", model_dir, data, d / "out", hyperparameters=hp, **spec)
    path = d / "job.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


@contextlib.contextmanager
def _restored_signal_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def run_in_process(
    job: Path, d: Path, *args: str, monkeypatch: pytest.MonkeyPatch, argv: list[str] | None = None
) -> Outcome:
    """``python -m tuneloop_trainer run job.yaml`` in this process (what ``tuneloop run`` starts);
    ``argv`` replaces ``run job.yaml *args`` (``--config job.json``: as in a pod)."""
    from tuneloop_trainer.main import main

    monkeypatch.setenv("TUNELOOP_TERMINATION_LOG", str(d / "termination-log"))
    monkeypatch.setenv("TUNELOOP_CACHE_DIR", str(d / "cache"))
    # main() quiets libraries through the environment and their loggers: undone after this test.
    quiet = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for name, value in quiet.items():
        monkeypatch.setenv(name, os.environ.get(name, value))
    for name in ("transformers", "peft", "accelerate", "botocore", "urllib3", "httpx", "huggingface_hub"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    with _restored_signal_handlers(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--work-dir", str(d / "work"), *(argv if argv is not None else ["run", str(job), *args])])
    seconds = time.monotonic() - started
    log = d / "termination-log"
    summary = json.loads(log.read_text()) if log.exists() else None
    return Outcome(code, out.getvalue(), err.getvalue(), seconds, d / "out", summary)


def looks_complete(out: Path) -> list[str]:
    """What under ``out/runs/`` says a run finished: its model card (uploaded last), its model
    folder, or a ``succeeded`` heartbeat."""
    found: list[str] = []
    for run in sorted((out / "runs").glob("*")):
        for name in ("model-card.json", "model-card.md", "model"):
            if (run / name).exists():
                found.append(f"{run.name}/{name}")
        status = run / "status.json"
        if status.exists() and json.loads(status.read_text()).get("phase") == "succeeded":
            found.append(f"{run.name}/status.json: succeeded")
    return found


def check_failure(o: Outcome, code: int, fragments: tuple[str, ...] = ()) -> str:
    """A clear permanent failure: returns "" when it is, else what is wrong with it."""
    problems = []
    if o.code != code:
        problems.append(f"exit {o.code}, expected {code}")
    if "Traceback" in o.stderr:
        problems.append("a traceback")
    if not o.last_line.startswith("error (") or f"exit {code}, permanent" not in o.last_line:
        problems.append(f"last line {o.last_line[:300]!r}")
    if o.summary is None or "\n" in str(o.summary.get("message", "\n")):
        problems.append(f"termination message {o.summary!r}")
    for fragment in fragments:
        if fragment not in o.last_line or fragment not in str((o.summary or {}).get("message", "")):
            problems.append(f"{fragment!r} not said")
    if complete := looks_complete(o.out):
        problems.append(f"looks complete: {complete}")
    status = o.out / "runs" / "1" / "status.json"
    if status.exists() and json.loads(status.read_text())["phase"] != "failed":
        problems.append("status.json does not say failed")
    return "; ".join(problems)


def check_success(o: Outcome, dropped: dict[str, int] | None) -> str:
    """A run that trained on what was left: returns "" when it did (and counted ``dropped``: rows
    dropped per reason; ``None``: not checked), else what is wrong with it."""
    problems = []
    if o.code != 0:
        problems.append(f"exit {o.code}: {o.last_line[:300]}")
        return "; ".join(problems)
    if "Traceback" in o.stderr:
        problems.append("a traceback")
    card = json.loads((o.out / "runs" / "1" / "model-card.json").read_text())
    report = card["validationReport"]
    if dropped is not None and (report["dropped"] or {}) != dropped:
        problems.append(f"dropped {report['dropped']}, expected {dropped}")
    if json.loads((o.out / "runs" / "1" / "status.json").read_text())["phase"] != "succeeded":
        problems.append("status.json does not say succeeded")
    return "; ".join(problems)


def run_case(case: Case, d: Path, bert: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Outcome, str]:
    d.mkdir(parents=True)
    data = case.data(d)
    model_dir = case.model(bert, d) if case.model else bert
    o = run_in_process(job_file(d, model_dir, data), d, monkeypatch=monkeypatch)
    problem = check_success(o, case.dropped) if case.code == 0 else check_failure(o, case.code, case.fragments)
    if o.seconds > CASE_TIMEOUT_S:
        problem += f"; took {o.seconds:.0f} s"
    return o, problem


def test_bad_data_and_bad_models_end_with_a_documented_code_and_a_clear_line(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, figure: Figure
) -> None:
    cases = CASES if is_full() else [c for c in CASES if c.quick]
    bert = tiny_model_dir("bert")
    problems: dict[str, str] = {}
    codes: Counter[int] = Counter()
    slowest = 0.0
    for case in cases:
        o, problem = run_case(case, tmp_path / case.name, bert, monkeypatch)
        codes[o.code] += 1
        print(f"{case.name}: exit {o.code} in {o.seconds:.1f} s")
        slowest = max(slowest, o.seconds)
        if problem:
            problems[case.name] = problem
    assert not problems, json.dumps(problems, indent=1)
    figure(
        scenario=SCENARIO,
        injection=f"{len(cases)} bad inputs (encodings, shapes, labels, links, broken model files)",
        count=len(cases),
        invariant="documented exit code, one line naming file/field and what to do, no traceback, "
        "no complete-looking run unless it succeeded",
        result=f"{len(cases) - len(problems)}/{len(cases)} as expected; exits "
        + ", ".join(f"{code}: {n}" for code, n in sorted(codes.items()))
        + f"; slowest {slowest:.1f} s",
        notes="trainer entry point in-process; tiny BERT",
    )


# --- seeded random byte corruptions -------------------------------------------------------------


def test_random_byte_corruptions_of_data_and_weights_never_crash(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, figure: Figure
) -> None:
    n = sample(quick=2, full=20)
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    bert = tiny_model_dir("bert")
    outcomes: Counter[str] = Counter()
    problems: dict[str, str] = {}
    for i in range(n):
        seed = rng.randrange(2**32)
        d = tmp_path / f"c{i}"
        d.mkdir()
        target = "weights" if i % 2 else ["jsonl", "csv"][i // 2 % 2]
        if target == "weights":
            model_dir = bad.copy_model(bert, d / "model")
            weights = model_dir / "model.safetensors"
            header = bad.safetensors_header_size(weights)
            # Half in the JSON header (names, dtypes, shapes, offsets), half in the tensor data.
            span = (8, header) if i % 4 == 1 else (header, weights.stat().st_size)
            target = "weights header" if i % 4 == 1 else "weights data"
            bad.corrupt_bytes(weights, seed=seed, flips=4, start=span[0], end=span[1])
            data = _good(d)
            allowed = {0, MODEL}
        else:
            model_dir = bert
            rows = bad.good_rows()
            data = bad._write(d / f"d.{target}", bad.jsonl_bytes(rows) if target == "jsonl" else bad.csv_bytes(rows))
            bad.corrupt_bytes(data, seed=seed, flips=12)
            allowed = {0, DATA, MODEL}  # a corrupted label can add a class the 2-label head lacks
        o = run_in_process(job_file(d, model_dir, data), d, monkeypatch=monkeypatch)
        outcomes[f"{target} exit {o.code}"] += 1
        name = f"{target} seed {seed}"
        if o.code not in allowed:
            problems[name] = f"exit {o.code}: {o.last_line[:300]}"
        elif o.code == 0:
            if problem := check_success(o, None):
                problems[name] = problem
        elif problem := check_failure(o, o.code):
            problems[name] = problem
    assert not problems, json.dumps(problems, indent=1)
    figure(
        scenario=SCENARIO,
        injection="seeded random byte overwrites: 12 bytes of a JSONL/CSV file, or 4 bytes of model.safetensors "
        "(header or tensor data)",
        count=n,
        invariant="exit 0, 11 or 12 only; no traceback; a failed run never looks complete",
        result=f"{n - len(problems)}/{n} as expected; " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())),
        notes=f"seed {SEED}",
    )


# --- two runs on one output at once -------------------------------------------------------------


def test_a_second_process_on_a_run_being_written_is_refused_before_it_writes(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: ``tuneloop run job.yaml --run 1`` twice at once both trained into ``runs/1``
    (the claim lets a job take its own run again, to resume), and the card of one described the
    model of the other. The lock a running process holds is taken here by this test process."""
    from tuneloop_trainer.main import _RUN_LOCKS, lock_local_run

    d = tmp_path / "busy"
    d.mkdir()
    job = job_file(d, tiny_model_dir("bert"), bad.one_class(d / "d.jsonl"))  # fails fast, after the claim
    first = run_in_process(job, d, monkeypatch=monkeypatch)
    assert first.code == ExitCode.INVALID_DATA, first.stderr[-2000:]
    status = (d / "out/runs/1/status.json").read_bytes()
    lock_local_run(f"file://{d / 'out'}/", 1)  # as a process still writing run 1 would
    try:
        second = run_in_process(job, d, "--run", "1", monkeypatch=monkeypatch)
    finally:
        while _RUN_LOCKS:
            _RUN_LOCKS.pop().close()
    assert second.code == ExitCode.INVALID_CONFIG, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert second.last_line.startswith("error (OutputOwned, exit 10, permanent): run 1 under file://")
    assert "being written by another process" in second.last_line and "--run" in second.last_line
    assert (d / "out/runs/1/status.json").read_bytes() == status  # nothing of run 1 was touched
    third = run_in_process(job, d, "--run", "1", monkeypatch=monkeypatch)  # lock released: run 1 again
    assert third.code == ExitCode.INVALID_DATA, third.stderr[-2000:]


def start_cli(job: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``tuneloop run job.yaml`` as a user starts it from a shell (its own process group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tuneloop", "run", str(job), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.skipif(not is_full(), reason="two trainer processes: full run only (about 30 s on 2 cores)")
def _two_at_once(job: Path, *args: str, env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """Start two ``tuneloop run`` of ``job`` at once; their (exit code, last stderr line), sorted."""
    procs = [start_cli(job, *args, env=env) for _ in range(2)]
    ended = []
    for p in procs:
        _stdout, stderr = p.communicate(timeout=CASE_TIMEOUT_S * 2)
        assert "Traceback" not in stderr, stderr[-3000:]
        ended.append((p.returncode, (stderr.strip().splitlines() or [""])[-1]))
    return sorted(ended)


def test_two_tuneloop_runs_on_one_run_at_once(tiny_model_dir, tmp_path: Path, figure: Figure) -> None:
    """Both ``--run 1`` at once: one writes the run, the other is refused. (Without ``--run`` they
    take different runs: tests/integration/test_trainer_ownership.py.)"""
    d = tmp_path / "two"
    d.mkdir()
    job = job_file(d, tiny_model_dir("bert"), _good(d))
    ended = _two_at_once(job, "--run", "1")
    assert [code for code, _ in ended] == [0, int(ExitCode.INVALID_CONFIG)], ended
    assert ended[1][1].startswith("error (OutputOwned, exit 10, permanent): run 1 under file://"), ended
    assert "being written by another process" in ended[1][1]
    card = json.loads((d / "out/runs/1/model-card.json").read_text())
    assert card["run"] == 1 and json.loads((d / "out/runs/1/status.json").read_text())["phase"] == "succeeded"
    figure(
        scenario=SCENARIO,
        injection="two `tuneloop run job.yaml --run 1` on one output at once",
        count=1,
        invariant="never two writers of one run; the second exits 10 before writing",
        result=f"exits {[code for code, _ in ended]}; run 1 written once (card and status of the run that trained)",
        notes="local output (flock on runs/<n>/run.json); S3: test_two_tuneloop_runs_on_one_s3_run_at_once",
    )


# --- two writers of one run in an S3 output (the writer lease, tuneloop/lease.py) ----------------


def _s3_keys(s3: S3Harness, prefix: str) -> dict[str, bytes]:
    return {key: s3.get_bytes(key) for key in s3.list_keys(prefix)}


def test_a_second_process_on_an_s3_run_being_written_is_refused_before_it_writes(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3: S3Harness
) -> None:
    """Regression: S3 has no ``flock``, so ``tuneloop run job.yaml --output s3://… --run 1`` twice
    at once both wrote run 1. The writer a running process holds (another machine's) is taken
    here by this test process; a clean end releases it, so the next run need not wait."""
    from tuneloop.lease import WriterLease
    from tuneloop.storage import Storage

    d = tmp_path / "busy-s3"
    d.mkdir()
    out = s3.uri("out/")
    job = job_file(d, tiny_model_dir("bert"), bad.one_class(d / "d.jsonl"))  # fails fast, after the claim
    first = run_in_process(job, d, "--output", out, monkeypatch=monkeypatch)
    assert first.code == ExitCode.INVALID_DATA, first.stderr[-2000:]
    assert json.loads(s3.get_bytes("out/runs/1/writer.json"))["released"] is True  # released at its end
    holder = WriterLease(Storage.for_uri(out), out, 1, host="gpu-box-7", pid=4242)
    holder.acquire()  # as a process still writing run 1 on another machine would
    before = _s3_keys(s3, "out/runs/1/")
    try:
        second = run_in_process(job, d, "--output", out, "--run", "1", monkeypatch=monkeypatch)
    finally:
        holder.release()
    assert second.code == ExitCode.INVALID_CONFIG, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    line = second.last_line
    assert line.startswith(f"error (OutputOwned, exit 10, permanent): run 1 under {out} is being written by another"), (
        line
    )
    assert "pid 4242 on host gpu-box-7, writing since " in line and "counts as gone if not renewed by " in line, line
    assert "--run 1" in line, line
    assert {k: v for k, v in _s3_keys(s3, "out/runs/1/").items() if not k.endswith("writer.json")} == {
        k: v for k, v in before.items() if not k.endswith("writer.json")
    }  # nothing of run 1 was touched
    third = run_in_process(job, d, "--output", out, "--run", "1", monkeypatch=monkeypatch)  # released: at once
    assert third.code == ExitCode.INVALID_DATA, third.stderr[-2000:]


def test_a_later_attempt_takes_an_s3_run_over_and_the_earlier_writer_stops_before_its_manifest(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3: S3Harness
) -> None:
    """Regression: the pod of an earlier attempt, still running on a partitioned node, went on
    writing the run the operator's next attempt writes, and could overwrite its checkpoint
    manifests and model. Here the later attempt (pod of attempt 2) takes the lease over while the
    earlier one (attempt 1) saves its first checkpoint: that checkpoint is never committed, the
    earlier writer stops with exit 10 naming the later one, and leaves the later one's lease."""
    from tuneloop.lease import WriterLease
    from tuneloop.storage import Storage
    from tuneloop_trainer.checkpoints import CheckpointManager

    d = tmp_path / "zombie"
    d.mkdir()
    out = s3.uri("out/")
    job = job_file(
        d, tiny_model_dir("bert"), _good(d), hyperparameters={"maxSteps": 3}, output={"checkpoint": {"everySteps": 1}}
    )
    later = WriterLease(Storage.for_uri(out), out, 1, attempt=2, host="t-r1-a2-n0", pid=1)
    save = CheckpointManager.save

    def save_after_a_takeover(manager: CheckpointManager, step: int, *args: Any, **kwargs: Any) -> None:
        if not later.held:
            later.acquire()  # the operator's next attempt starts while this one still runs
        save(manager, step, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", save_after_a_takeover)
    monkeypatch.setenv("TUNELOOP_ATTEMPT", "1")
    config = d / "job.json"
    config.write_text(json.dumps(yaml.safe_load(job.read_text())))
    earlier = run_in_process(
        job, d, monkeypatch=monkeypatch, argv=["--config", str(config), "--output-uri", out, "--run", "1"]
    )
    assert earlier.code == ExitCode.INVALID_CONFIG, earlier.stderr[-2000:]
    assert "Traceback" not in earlier.stderr
    line = earlier.last_line
    assert line.startswith(f"error (OutputOwned, exit 10, permanent): run 1 under {out} is no longer this"), line
    assert "another writer took it over: pid 1 on host t-r1-a2-n0 (attempt 2)" in line, line
    keys = s3.list_keys("out/runs/1/")
    assert later.took_over is not None and "held by attempt 1" in later.took_over
    assert not [k for k in keys if k.endswith("manifest.json")], keys  # no checkpoint committed
    assert not [k for k in keys if "/model" in k], keys  # no model, no card
    writer = json.loads(s3.get_bytes("out/runs/1/writer.json"))
    assert (writer["host"], writer["attempt"], writer["released"]) == ("t-r1-a2-n0", 2, False)
    assert json.loads(s3.get_bytes("out/runs/1/status.json"))["phase"] != "failed"  # its end not written either
    later.release()


@pytest.mark.skipif(not is_full(), reason="two trainer processes: full run only (about 30 s on 2 cores)")
def test_two_tuneloop_runs_on_one_s3_run_at_once(tiny_model_dir, tmp_path: Path, s3: S3Harness, figure: Figure) -> None:
    """Both ``--run 1`` on one S3 output at once: one writes the run, the other is refused
    before it writes; the lease is released at the end."""
    d = tmp_path / "two-s3"
    d.mkdir()
    out = s3.uri("out/")
    job = job_file(d, tiny_model_dir("bert"), _good(d))
    ended = _two_at_once(job, "--output", out, "--run", "1", env=s3.env)
    assert [code for code, _ in ended] == [0, int(ExitCode.INVALID_CONFIG)], ended
    assert ended[1][1].startswith(f"error (OutputOwned, exit 10, permanent): run 1 under {out}"), ended
    assert "being written by another process right now" in ended[1][1]
    card = json.loads(s3.get_bytes("out/runs/1/model-card.json"))
    assert card["run"] == 1 and json.loads(s3.get_bytes("out/runs/1/status.json"))["phase"] == "succeeded"
    assert json.loads(s3.get_bytes("out/runs/1/writer.json"))["released"] is True
    figure(
        scenario=SCENARIO,
        injection="two `tuneloop run job.yaml --output s3://… --run 1` on one output at once",
        count=1,
        invariant="never two writers of one run; the second exits 10 before writing",
        result=f"exits {[code for code, _ in ended]}; run 1 written once; writer lease released at the end",
        notes="S3 output: writer lease runs/<n>/writer.json (conditional create/replace, moto)",
    )


# --- Ctrl-C -------------------------------------------------------------------------------------


def test_ctrl_c_while_the_trainer_is_being_imported_is_a_clean_stop(tmp_path: Path) -> None:
    """Regression: a SIGINT that lands while Python imports the trainer (the first seconds of
    ``tuneloop run``) printed a KeyboardInterrupt traceback. The import is made to raise
    KeyboardInterrupt, as the signal would, deterministically."""
    hook = (
        "import sys, runpy\n"
        "class CtrlC:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tuneloop_trainer.main':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        "sys.argv = ['tuneloop_trainer', 'run', 'job.yaml']\n"
        "runpy.run_module('tuneloop_trainer', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", hook], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 130
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "stopped on SIGINT before training started"


@pytest.mark.skipif(not is_full(), reason="starts the trainer for each point: full run only")
def test_ctrl_c_at_random_points_of_tuneloop_run(tiny_model_dir, tmp_path: Path, figure: Figure) -> None:
    """Ctrl-C (SIGINT to the process group) at a seeded random time after the trainer process
    starts: through its imports, the output claim, data validation, model loading and training.
    (Mid-training alone is tests/integration/test_trainer_exits.py.)"""
    n = sample(quick=1, full=6)
    rng = random.Random(SEED + 7)
    print(f"seed {SEED + 7}")
    lasts: Counter[str] = Counter()
    for i in range(n):
        d = tmp_path / f"c{i}"
        d.mkdir()
        # 30 steps of at least 1 s: training outlasts the latest signal.
        job = job_file(d, tiny_model_dir("bert"), _good(d), hyperparameters={"maxSteps": None, "epochs": 6})
        delay = rng.uniform(0, 20)
        cli = start_cli(job, env={"TUNELOOP_FAULT_STEP_DELAY": "1.0"})
        try:
            deadline = time.monotonic() + 60
            while not _children(cli.pid) and time.monotonic() < deadline and cli.poll() is None:
                time.sleep(0.05)  # polling for the child's start: no event to await
            time.sleep(delay)
            assert cli.poll() is None, f"delay {delay:.1f}: ended before Ctrl-C: {cli.communicate()[1][-3000:]}"
            os.killpg(cli.pid, signal.SIGINT)
            _stdout, stderr = cli.communicate(timeout=CASE_TIMEOUT_S)
        finally:
            if cli.poll() is None:
                os.killpg(cli.pid, signal.SIGKILL)
        last = (stderr.strip().splitlines() or [""])[-1]
        assert cli.returncode == 130, f"delay {delay:.1f}: exit {cli.returncode}: {stderr[-3000:]}"
        assert "Traceback" not in stderr, f"delay {delay:.1f}: {stderr[-3000:]}"
        assert "SIGINT" in last, last
        assert not looks_complete(d / "out"), looks_complete(d / "out")
        status = d / "out/runs/1/status.json"
        if status.exists():
            assert json.loads(status.read_text())["phase"] == "stopped"
        lasts[last.split(" at step")[0].split(";")[0][:60]] += 1
    figure(
        scenario=SCENARIO,
        injection="Ctrl-C (SIGINT to the process group) at a random time 0-20 s after the trainer process starts",
        count=n,
        invariant="exit 130, a line saying it stopped on SIGINT, no traceback, no complete-looking run",
        result=f"{n}/{n} exit 130; " + ", ".join(f"{k!r}: {v}" for k, v in sorted(lasts.items())),
        notes=f"seed {SEED + 7}",
    )


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# --- S3 that cannot be reached ------------------------------------------------------------------


@pytest.mark.skipif(not is_full(), reason="starts the trainer: full run only")
def test_an_unreachable_s3_endpoint_fails_fast_naming_the_uri(tiny_model_dir, tmp_path: Path, figure: Figure) -> None:
    from tuneloop.storage import s3_request_time_bound

    connect, read, attempts = 1.0, 2.0, 2
    bound = s3_request_time_bound(connect, read, attempts)
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "TUNELOOP_S3_CONNECT_TIMEOUT": str(connect),
        "TUNELOOP_S3_READ_TIMEOUT": str(read),
        "TUNELOOP_S3_MAX_ATTEMPTS": str(attempts),
    }
    seen = []
    with bad.SilentEndpoint() as silent:
        for label, endpoint in (("refused", "http://127.0.0.1:9"), ("never answers", silent)):
            d = tmp_path / label.replace(" ", "-")
            d.mkdir()
            job = job_file(d, tiny_model_dir("bert"), d / "unused.jsonl")
            m = yaml.safe_load(job.read_text())
            m["spec"]["dataset"]["uri"] = "s3://bucket/data/"
            job.write_text(yaml.safe_dump(m))
            started = time.monotonic()
            cli = start_cli(job, env={**env, "AWS_ENDPOINT_URL_S3": endpoint})
            try:
                _stdout, stderr = cli.communicate(timeout=60 + bound)
            finally:
                if cli.poll() is None:
                    os.killpg(cli.pid, signal.SIGKILL)
            seconds = time.monotonic() - started
            last = (stderr.strip().splitlines() or [""])[-1]
            assert cli.returncode == 1, stderr[-3000:]
            assert last.startswith("error (StorageUnavailable, exit 1, retryable)"), last
            assert "s3://bucket/data/" in last and endpoint in last, last
            assert "Traceback" not in stderr
            assert not looks_complete(d / "out")
            seen.append((label, seconds))
    # Startup (imports, claim) is the same for both; the silent endpoint adds at most the bound.
    startup = seen[0][1]
    assert seen[1][1] <= startup + bound + 10, seen
    figure(
        scenario=SCENARIO,
        injection="dataset.uri on an S3 endpoint that refuses connections / accepts and never answers",
        count=2,
        invariant="exit 1 (retryable) naming the URI and endpoint, within the documented request bound",
        result=", ".join(f"{label}: {s:.1f} s" for label, s in seen)
        + f" (bound per request {bound:.1f} s with connect {connect:g} s, read {read:g} s, {attempts} attempts)",
        notes=f"defaults (5 s, 20 s, 4 attempts) bound a request at {s3_request_time_bound(5, 20, 4):.0f} s",
    )
