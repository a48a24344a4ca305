"""Scenario 3: the trainer SIGKILLed and SIGTERMed at random steps and mid checkpoint upload.

Each run starts ``tuneloop_trainer run job.yaml --output s3://… --run 1`` as its own process (what
``tuneloop run`` and the pod run), with S3 (moto) behind a proxy that can hold one request, and
signals it at one of four points chosen per run from a seeded RNG:

* ``step``: right after a random step finished (the kill lands wherever the loop is then);
* ``upload``: while one data file of a checkpoint (``model.safetensors``, ``state.pt`` or
  ``meta.json``) is being PUT;
* ``manifest``: after every data file of a checkpoint is stored, with its ``manifest.json`` PUT
  in flight (the window DCP-style completeness is about);
* ``multipart``: with part 2 of a checkpoint's multipart ``state.pt`` upload in flight (a wider
  tiny model, 5 MiB parts).

The held request belongs to the first checkpoint at or after the drawn step (a snapshot may be
taken early by the expected upload time). With it held, a SIGKILL lands once the trainer says it
waits for that upload at the bound (one interval past the newest complete checkpoint): the most a
kill can lose, exactly one interval. A SIGTERM lands as soon as the request is held, which is then
released.

Then the run is resumed by the trainer's resume path on the same output (in this process, to keep
the sample fast) and checked against an uninterrupted run of the same job: all planned steps, the
same final loss and loss curve, the checkpoint it resumed from is the newest one that was complete
in S3 when the process died (judged from S3, not from the trainer), the number of finished steps
trained again (at most one interval, also with an upload in flight), and no partial checkpoint
left once the run has finished.
"""

from __future__ import annotations

import json
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.k8s_fixtures import K8sApi
from tests.harness.reliability import Figure, is_full, sample
from tests.harness.s3 import S3Harness
from tests.harness.trainer_faults import (
    Hold,
    HoldingS3Proxy,
    S3Request,
    TrainerProcess,
    checkpoint_file,
    checkpoint_listing,
    incomplete_multipart_uploads,
    widened_gpt2,
)
from tests.harness.trainer_jobs import manifest, rows_for, write_jsonl
from tuneloop.api import FineTuneJob
from tuneloop_trainer.progress import Sinks, StepReport
from tuneloop_trainer.recipe import FineTuneRecipe, RunContext, RunResult

SCENARIO = "3. Trainer SIGKILL/SIGTERM"
INTERVAL = 4
"""``spec.output.checkpoint.everySteps`` of every run here."""
MODES = ("step", "upload", "manifest", "multipart")
DATA_FILES = ("model.safetensors", "state.pt", "meta.json")
SEED = 1303
LOSS_REL = 1e-4


# --- the job and its uninterrupted reference ----------------------------------------------------


@dataclass
class Setup:
    tiny: Path
    data: Path
    root: Path
    references: dict[str, tuple[RunResult, list[float]]] = field(default_factory=dict)

    def job(self, model: str, output_uri: str) -> dict[str, Any]:
        m = manifest(
            "causal-lm",
            self.model_dir(model),
            self.data,
            self.root,
            method={"type": "full"},
            hyperparameters={"epochs": 2, "batchSize": 8},
        )
        m["spec"]["output"] = {"uri": output_uri, "checkpoint": {"everySteps": INTERVAL, "keep": 2}}
        return m

    def model_dir(self, model: str) -> Path:
        """``tiny``: the tiny GPT-2; ``wide``: the same made wide enough for multipart checkpoints
        (built on first use: only the multipart runs need it)."""
        return self.tiny if model == "tiny" else widened_gpt2(self.tiny, self.root / "wide-gpt2")

    def reference(self, model: str) -> tuple[RunResult, list[float]]:
        """The uninterrupted run (once per model): its result and its per-step training losses."""
        if model not in self.references:
            out = self.root / f"reference-{model}"
            result, _ = train_in_process(self.job(model, f"file://{out}/"), self.root / f"w-reference-{model}")
            history = json.loads((out / "runs/1/report/history.json").read_text())
            self.references[model] = (result, [r["loss"] for r in history["train"]])
        return self.references[model]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("trainer-kills")
    data = write_jsonl(root / "data.jsonl", rows_for("causal-lm", "text", n=80))
    return Setup(tiny=tiny_model_dir("gpt2"), data=data, root=root)


class Recorder:
    """A sink that keeps the steps trained and the messages of an in-process run."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.messages: list[str] = []

    def phase(self, name: str) -> None: ...
    def evaluation(self, *a: Any) -> None: ...
    def close(self) -> None: ...

    def message(self, text: str) -> None:
        self.messages.append(text)

    def step(self, report: StepReport) -> None:
        self.steps.append(report.step)


def train_in_process(m: dict[str, Any], work: Path, sink: Any = None) -> tuple[RunResult, Recorder]:
    """Run (or resume: same output and run number) the job through the trainer's recipe."""
    recorder = Recorder()
    job = FineTuneJob.from_manifest(m)
    ctx = RunContext(
        job=job,
        run=1,
        output_uri=job.spec.output.uri,
        work_dir=work,
        sinks=Sinks([recorder, *([sink] if sink else [])]),
        cache_dir=work / "cache",
    )
    return FineTuneRecipe(ctx).run(), recorder


# --- one kill and its resume ----------------------------------------------------------------------


@dataclass
class Outcome:
    mode: str
    target: int
    last_step: int
    resumed_from: int
    in_flight: bool
    at_bound: bool
    """Killed while the trainer waited at the bound for the held upload."""
    partial_at_kill: list[int]
    partial_after: list[int]
    multipart_left: int

    @property
    def redone(self) -> int:
        return self.last_step - self.resumed_from


def hold_for(proxy: HoldingS3Proxy, mode: str, step: int, rng: random.Random) -> Hold:
    """Hold the chosen request of the first checkpoint at or after ``step``."""
    name = {"upload": rng.choice(DATA_FILES), "manifest": "manifest.json"}.get(mode, "state.pt")

    def wanted(r: S3Request) -> bool:
        target = checkpoint_file(r)
        if r.method != "PUT" or target is None or target[0] < step or target[1] != name:
            return False
        if mode == "upload":
            return "uploadId" not in r.query
        return mode == "manifest" or r.query.get("partNumber") == ["2"]

    return proxy.hold(wanted)


def waiting_at_the_bound(trainer: TrainerProcess, held: int) -> bool:
    if trainer.proc.poll() is not None:
        raise AssertionError(f"the trainer ended ({trainer.proc.returncode}) with the upload of step {held} held")
    return any(f"waiting for the checkpoint at step {held} to finish uploading" in t for t in trainer.messages())


def kill_and_resume(
    setup: Setup, s3: S3Harness, *, sig: signal.Signals, mode: str, rng: random.Random, index: int
) -> Outcome:
    model = "wide" if mode == "multipart" else "tiny"
    reference, reference_losses = setup.reference(model)
    total = reference.steps
    prefix = f"{sig.name.lower()}-{index}/"
    output = s3.uri(prefix)
    m = setup.job(model, output)
    scratch = setup.root / prefix.rstrip("/")
    scratch.mkdir()
    job_path = scratch / "job.yaml"
    job_path.write_text(yaml.safe_dump(m))
    if mode == "step":
        target = rng.randint(1, total - 3)
    else:  # a checkpoint step that leaves room for the SIGTERM's own checkpoint before the end
        target = rng.choice(range(INTERVAL, total - 2 * INTERVAL + 1, INTERVAL))
    print(f"run {index}: {sig.name} mode={mode} target={target}")

    with HoldingS3Proxy(s3.endpoint_url) as proxy:
        hold = hold_for(proxy, mode, target, rng) if mode != "step" else None
        trainer = TrainerProcess.start(
            job_path,
            output,
            scratch=scratch,
            env={**s3.env, "AWS_ENDPOINT_URL_S3": proxy.endpoint_url},
            multipart_mib=5 if mode == "multipart" else None,
        )
        try:
            if hold is None:
                trainer.wait_for_step(target)
                trainer.signal(sig)
            else:
                K8sApi.wait_for(
                    lambda: hold.seen.is_set() or trainer.proc.poll() is not None, timeout=300, message="the hold"
                )
                if not hold.seen.is_set():
                    code, _, stderr = trainer.finish()
                    raise AssertionError(f"the trainer ended ({code}) before the held request:\n{stderr[-3000:]}")
                if sig == signal.SIGKILL:
                    # The most a kill can lose: the trainer went as far as it may with the upload
                    # held, and waits for it there.
                    held = checkpoint_file(hold.wait_seen())
                    assert held is not None
                    K8sApi.wait_for(
                        lambda: waiting_at_the_bound(trainer, held[0]), timeout=300, message="the wait at the bound"
                    )
                trainer.signal(sig)
                if sig == signal.SIGTERM:
                    hold.release()  # the stop waits for this upload, then saves its own checkpoint
            code, _, stderr = trainer.finish()
        finally:
            trainer.kill()
            if hold is not None:
                hold.drop()

    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL, stderr[-3000:]
    else:
        assert code == 143, stderr[-3000:]  # the documented exit after SIGTERM: step done, checkpoint saved
        assert f"stopped on SIGTERM at step {trainer.last_step()}; checkpoint saved" in stderr, stderr[-3000:]
    at_kill = checkpoint_listing(s3, prefix + "runs/1/")
    saves = trainer.saves()

    result, recorder = train_in_process(m, scratch / "resume")
    resumed_from = recorder.steps[0] - 1
    newest_complete = at_kill.complete[-1] if at_kill.complete else 0
    # The resume takes the newest checkpoint that was complete in S3, never a partial one.
    assert resumed_from == newest_complete, (resumed_from, at_kill)
    assert resumed_from not in at_kill.partial
    if resumed_from:
        assert any(f"resumed from the checkpoint at step {resumed_from} " in t for t in recorder.messages)
    # All planned steps, the same end and the same loss curve as the uninterrupted run.
    assert result.steps == total
    assert recorder.steps == list(range(resumed_from + 1, total + 1))
    assert result.metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], rel=LOSS_REL)
    history = json.loads(s3.get_bytes(prefix + "runs/1/report/history.json"))
    assert [r["step"] for r in history["train"]] == list(range(1, total + 1))
    assert [r["loss"] for r in history["train"]] == pytest.approx(reference_losses, rel=LOSS_REL)
    after = checkpoint_listing(s3, prefix + "runs/1/")
    outcome = Outcome(
        mode=mode,
        target=target,
        last_step=trainer.last_step(),
        resumed_from=resumed_from,
        in_flight=bool(saves) and saves[-1] > resumed_from,
        at_bound=mode != "step" and sig == signal.SIGKILL,
        partial_at_kill=at_kill.partial,
        partial_after=after.partial,
        multipart_left=len(incomplete_multipart_uploads(s3, prefix)),
    )
    print(f"run {index}: {outcome} redone={outcome.redone}")
    return outcome


def modes(sig: signal.Signals, n: int, rng: random.Random) -> list[str]:
    """Every mode in turn (shuffled) in the full count; the quick sample takes the upload windows."""
    if not is_full():
        return ["manifest" if sig == signal.SIGKILL else "upload"][:n]
    chosen = [MODES[i % len(MODES)] for i in range(n)]
    rng.shuffle(chosen)
    return chosen


# The full count (20 trainer processes and 20 resumes) costs about 20 s of CPU per run (measured:
# 88 s for the setup and the first 4 SIGKILL runs), more than the suite's 600 s per-test limit allows
# on a shared 2-core machine.
@pytest.mark.timeout(3600 if is_full() else 600)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_trainer_killed_at_random_points_resumes_to_the_same_end(
    setup: Setup, s3: S3Harness, figure: Figure, sig: signal.Signals
) -> None:
    n = sample(quick=1, full=20)
    rng = random.Random(SEED + int(sig))
    print(f"seed {SEED + int(sig)}")
    outcomes = [
        kill_and_resume(setup, s3, sig=sig, mode=mode, rng=rng, index=i) for i, mode in enumerate(modes(sig, n, rng))
    ]

    for o in outcomes:
        if sig == signal.SIGTERM:
            assert o.redone == 0, o  # SIGTERM checkpoints the step it stopped at
        else:
            # Uploads run in the background, but the loop waits for the one in flight rather than
            # go more than one interval past the newest complete checkpoint.
            assert o.redone <= INTERVAL, o
        if o.at_bound:
            # Killed while it waited there: exactly one interval, with the upload in flight.
            assert o.in_flight and o.redone == INTERVAL, o
        assert o.partial_after == [], o  # a partial checkpoint does not outlive the finished run
        assert o.multipart_left == 0, o  # nor does an upload cut short: aborted when training ends
    if sig == signal.SIGKILL:
        assert any(o.at_bound for o in outcomes), "no kill with an upload in flight in the sample"
    per_mode = {mode: sum(o.mode == mode for o in outcomes) for mode in MODES}
    settled = [o.redone for o in outcomes if not o.in_flight]
    flying = [o.redone for o in outcomes if o.in_flight]
    figure(
        scenario=SCENARIO,
        injection=(
            f"{sig.name} of `tuneloop_trainer run` (S3 output, moto): "
            + ", ".join(f"{k} {v}" for k, v in per_mode.items() if v)
            + " (after a random step / mid data-file PUT / with the manifest PUT in flight / mid multipart part 2"
            + ("; SIGKILL once the trainer waits at the bound for that upload)" if sig == signal.SIGKILL else ")")
        ),
        count=n,
        invariant=(
            "resume completes all planned steps with the uninterrupted run's final loss and loss curve (rel 1e-4); "
            "resumes from the newest checkpoint complete in S3, never a partial one; "
            f"steps redone ≤ {INTERVAL} (one interval), also when a kill lands while an upload is in flight; "
            "SIGTERM exits 143 with 0 steps redone; no partial checkpoint and no unfinished multipart upload left "
            "after the run"
        ),
        result=(
            f"{len(outcomes)} of {n} resumed to all {setup.reference('tiny')[0].steps} steps with the same loss; "
            f"partial checkpoints present at the kill: {sum(len(o.partial_at_kill) for o in outcomes)}, loaded: 0, "
            f"left after the run: {sum(len(o.partial_after) for o in outcomes)}; steps redone: max "
            f"{max(settled, default=0)} with the last upload done ({len(settled)} runs), max "
            f"{max(flying, default=0)} with one in flight ({len(flying)} runs, "
            f"{sum(o.at_bound for o in outcomes)} killed at the bound); incomplete multipart uploads "
            f"left: {sum(o.multipart_left for o in outcomes)}"
        ),
        notes=f"checkpoint every {INTERVAL} steps, tiny GPT-2, seed {SEED + int(sig)}",
    )


class CrashAt:
    """A sink that raises (a crash in the loop) once ``step`` has finished."""

    def __init__(self, step: int) -> None:
        self.at = step

    def phase(self, name: str) -> None: ...
    def evaluation(self, *a: Any) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...

    def step(self, report: StepReport) -> None:
        if report.step == self.at:
            raise RuntimeError("simulated crash")


def plant(s3: S3Harness, checkpoints: str, source: int, step: int, damage: str) -> None:
    """Copy checkpoint ``source`` to ``step`` with ``damage``: ``no-manifest`` (data files only),
    ``missing-file`` (no state.pt), ``corrupted`` (state.pt altered, same size), ``truncated``
    (state.pt cut in half). The manifest, when there is one, is the source's with its step changed."""
    src, dst = f"{checkpoints}step-{source:08d}/", f"{checkpoints}step-{step:08d}/"
    for name in DATA_FILES:
        data = s3.get_bytes(src + name)
        if name == "state.pt":
            if damage == "missing-file":
                continue
            if damage == "corrupted":
                data = data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:]
            if damage == "truncated":
                data = data[: len(data) // 2]
        s3.put_bytes(dst + name, data)
    if damage != "no-manifest":
        manifest_body = json.loads(s3.get_bytes(src + "manifest.json"))
        manifest_body["step"] = step
        s3.put_bytes(dst + "manifest.json", json.dumps(manifest_body).encode())


def test_partial_and_damaged_checkpoints_are_never_loaded_and_are_cleaned_up(
    setup: Setup, s3: S3Harness, figure: Figure
) -> None:
    reference, reference_losses = setup.reference("tiny")
    total = reference.steps
    good = 2 * INTERVAL
    # Newer than the good checkpoint: two the resumed run passes, one it saves again, and one past
    # its last save (total - 1, off the cadence: a SIGTERM's checkpoint cut short by a SIGKILL).
    planted = {
        good + 1: "no-manifest",
        good + 2: "missing-file",
        good + INTERVAL: "corrupted",
        total - 1: "truncated",
    }
    last_save = max(range(INTERVAL, total, INTERVAL))
    assert good + INTERVAL < total - 1 and total - 1 > last_save, (planted, total)
    prefix = "damaged/"
    m = setup.job("tiny", s3.uri(prefix))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_in_process(m, setup.root / "damaged-1", CrashAt(good + 1))
    checkpoints = prefix + "runs/1/checkpoints/"
    assert checkpoint_listing(s3, prefix + "runs/1/").complete[-1] == good
    for step, damage in planted.items():
        plant(s3, checkpoints, good, step, damage)
    assert checkpoint_listing(s3, prefix + "runs/1/").partial == sorted(planted)

    result, recorder = train_in_process(m, setup.root / "damaged-2")
    assert recorder.steps[0] == good + 1  # resumed from the good one: no damaged checkpoint was used
    assert result.steps == total
    assert result.metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], rel=LOSS_REL)
    history = json.loads(s3.get_bytes(prefix + "runs/1/report/history.json"))
    assert [r["loss"] for r in history["train"]] == pytest.approx(reference_losses, rel=LOSS_REL)
    after = checkpoint_listing(s3, prefix + "runs/1/")
    assert after.partial == [], f"partial checkpoints left after the run: {after.partial}"
    figure(
        scenario=SCENARIO,
        injection=(
            "checkpoints planted newer than the last good one: data files without manifest, manifest with a "
            "missing file, a corrupted file (same size), a truncated file"
        ),
        count=len(planted),
        invariant="none is loaded (resume from the newest intact one, same final loss); none is left after the run",
        result=(
            f"resumed from step {recorder.steps[0] - 1} (the intact one); damaged loaded: 0; "
            f"left after the run: {len(after.partial)} of {len(planted)}"
        ),
        notes="in-process resume on S3 (moto)",
    )
