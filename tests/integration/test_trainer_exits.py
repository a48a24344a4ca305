"""How the trainer ends, as the operator and a user see it: the exit code (permanent or
retryable), the last line of stderr, the termination message and the status file.

Crashes are injected by replacing one recipe method in the trainer's own process (a stand-in for
a bug deep in a library); everything around it (the entry point, the mapping to exit codes, the
messages) is the real code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.s3 import S3Harness
from tests.harness.trainer_jobs import heartbeat_step, job_file, manifest, run_cli, tiny_job, wait_for, write_jsonl
from tests.manifests import ROOT
from tuneloop.contract import TERMINATION_MESSAGE_MAX_BYTES, ExitCode, Heartbeat
from tuneloop.storage import Storage

pytestmark = pytest.mark.integration

STATE_DICT_ERROR = (
    "Error(s) in loading state_dict for BertForSequenceClassification:\n"
    "\tsize mismatch for classifier.weight: copying a param with shape torch.Size([3, 32]) from checkpoint, "
    "the shape in current model is torch.Size([2, 32])."
)

#: The trainer's entry point with FineTuneRecipe.setup replaced by one that raises ``exc``.
FAILING_TRAINER = textwrap.dedent(
    """
    import sys
    from tuneloop.storage import StorageError
    from tuneloop_trainer import recipe
    from tuneloop_trainer.main import main
    exc = eval(sys.argv[1])

    def setup(self):
        self.sinks.phase("validating")
        raise exc

    recipe.FineTuneRecipe.setup = setup
    sys.exit(main(sys.argv[2:]))
    """
)


def classification_job(tiny_model_dir, tmp_path: Path, **spec: Any) -> Path:
    return job_file(tmp_path, tiny_job("sequence-classification", tiny_model_dir("bert"), tmp_path, n=96, **spec))


def run_failing(tmp_path: Path, exc: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNELOOP_TERMINATION_LOG": str(tmp_path / "termination-log")}
    return subprocess.run(
        [sys.executable, "-c", FAILING_TRAINER, exc, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )


def termination(tmp_path: Path) -> dict[str, Any]:
    text = (tmp_path / "termination-log").read_text()
    assert len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES
    summary = json.loads(text)
    assert isinstance(summary, dict)
    return summary


def status(out: Path, run: int = 1) -> Heartbeat:
    return Heartbeat.model_validate_json((out / "runs" / str(run) / "status.json").read_text())


def last_line(text: str) -> str:
    return text.rstrip("\n").rsplit("\n", 1)[-1]


# --- crashes and permanent failures -------------------------------------------------------------


def test_an_unknown_crash_is_retryable_and_says_its_cause(tiny_model_dir, tmp_path) -> None:
    job = classification_job(tiny_model_dir, tmp_path)
    result = run_failing(tmp_path, f"RuntimeError({STATE_DICT_ERROR!r})", "run", str(job))
    assert result.returncode == 1, result.stderr[-2000:]
    cause = "RuntimeError: size mismatch for classifier.weight: copying a param with shape torch.Size([3, 32])"
    line = last_line(result.stderr)
    assert cause in line and line.startswith("error")
    traceback_at = result.stderr.find("Traceback (most recent call last)")
    assert 0 <= traceback_at < result.stderr.rfind(line)  # the full traceback first, for the pod log
    summary = termination(tmp_path)
    assert summary["result"] == "Failed"
    assert summary["message"].startswith(cause)
    beat = status(tmp_path / "out")
    assert beat.phase == "failed"
    assert beat.message.startswith(cause)
    assert beat.estimated_remaining_seconds is None


def test_a_huge_crash_message_is_cut_keeping_its_start(tiny_model_dir, tmp_path) -> None:
    job = classification_job(tiny_model_dir, tmp_path)
    result = run_failing(tmp_path, "ValueError('bad shape ' + 'x' * 20000)", "run", str(job))
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert "ValueError: bad shape xxx" in line and len(line) < 2200 and line.endswith("…")
    summary = termination(tmp_path)  # valid JSON, within 4 KiB
    assert summary["message"].startswith("ValueError: bad shape xxx")
    assert status(tmp_path / "out").message.startswith("ValueError: bad shape xxx")


@pytest.mark.parametrize("text", ["a" * 10_000, "é" * 5_000, "line\n" * 3_000], ids=["ascii", "accents", "lines"])
def test_termination_message_is_valid_json_keeping_the_start_of_the_message(tmp_path, monkeypatch, text: str) -> None:
    from tuneloop_trainer.main import write_termination_message

    monkeypatch.setenv("TUNELOOP_TERMINATION_LOG", str(tmp_path / "termination-log"))
    metrics = {f"metric_{i}": i / 7 for i in range(300)}
    write_termination_message(
        {"result": "Failed", "reason": "InvalidData", "message": "cause first: " + text, "metrics": metrics}
    )
    summary = termination(tmp_path)
    assert summary["result"] == "Failed" and summary["reason"] == "InvalidData"
    assert summary["message"].startswith("cause first: " + text[:200])
    assert summary["truncated"] is True


@pytest.mark.parametrize(
    ("message", "code", "exit_code"),
    [
        ("access denied to s3://b/data/ (list); check the Secret named by spec.storage.secretRef", "AccessDenied", 10),
        ("bucket b does not exist (list s3://b/data/); check the bucket name in the URI", "NoSuchBucket", 10),
        ("bucket b is not in region us-east-1 (list s3://b/data/); set spec.storage.region", "PermanentRedirect", 10),
        ("no AWS credentials found (list s3://b/data/)", "NoCredentials", 10),
        ("cannot reach http://127.0.0.1:9 (list s3://b/d/): EndpointConnectionError", "connection", 1),
        ("http://s3 is throttling or unavailable (SlowDown) (list s3://b/d/); retry later", "SlowDown", 1),
        ("the data sent for s3://b/d/x was corrupted in transit (checksum mismatch, BadDigest); retry", "BadDigest", 1),
    ],
    ids=["access-denied", "no-bucket", "wrong-region", "no-credentials", "connection", "throttled", "corrupted"],
)
def test_storage_errors_are_permanent_only_when_configuration_is_wrong(
    tiny_model_dir, tmp_path, message: str, code: str, exit_code: int
) -> None:
    job = classification_job(tiny_model_dir, tmp_path)
    result = run_failing(tmp_path, f"StorageError({message!r}, code={code!r})", "run", str(job))
    assert result.returncode == exit_code, result.stderr[-2000:]
    assert last_line(result.stderr).endswith(message)
    assert "Traceback" not in result.stderr  # the message says it all
    summary = termination(tmp_path)
    assert summary["message"] == message
    assert summary["reason"] == ("InvalidConfig" if exit_code == 10 else "StorageUnavailable")


def test_missing_s3_credentials_exit_10_naming_the_uri(tiny_model_dir, tmp_path, s3_no_ambient_credentials) -> None:
    s3 = s3_no_ambient_credentials
    s3.put_bytes("data/train.jsonl", b'{"text": "good", "label": "pos"}\n')
    m = manifest("sequence-classification", tiny_model_dir("bert"), tmp_path / "unused", tmp_path / "out")
    m["spec"]["dataset"]["uri"] = s3.uri("data/train.jsonl")
    job = job_file(tmp_path, m)
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": s3.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}
    env["TUNELOOP_TERMINATION_LOG"] = str(tmp_path / "termination-log")
    result = run_cli(["run", str(job)], module="tuneloop_trainer", env=env, timeout=300)
    assert result.returncode == ExitCode.INVALID_CONFIG, result.stderr[-2000:]
    assert s3.uri("data/train.jsonl") in last_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert termination(tmp_path)["reason"] == "InvalidConfig"
    assert status(tmp_path / "out").phase == "failed"


def test_the_pod_entry_point_reports_a_crash_the_same_way(tiny_model_dir, tmp_path) -> None:
    job = classification_job(tiny_model_dir, tmp_path)
    config = tmp_path / "job.json"
    config.write_text(json.dumps(yaml.safe_load(job.read_text())))
    result = run_failing(tmp_path, "KeyError('input_ids')", "--config", str(config), "--run", "2")
    assert result.returncode == 1
    assert last_line(result.stderr).endswith("KeyError: 'input_ids'")
    assert termination(tmp_path)["message"] == "KeyError: 'input_ids'"
    assert status(tmp_path / "out", run=2).phase == "failed"


# --- --output -----------------------------------------------------------------------------------


def test_output_that_is_a_file_exits_10(tmp_path) -> None:
    m = manifest("sequence-classification", tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "out")
    job = job_file(tmp_path, m)
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    result = run_cli(["run", str(job), "--output", str(target)], timeout=300)
    assert result.returncode == ExitCode.INVALID_CONFIG, result.stderr[-2000:]
    assert f"{target} is a file, not a directory; pass a directory" in result.stderr
    assert target.read_text() == "keep me\n"


def test_output_uris_are_honoured(tiny_model_dir, tmp_path, s3: S3Harness) -> None:
    """`--output s3://…` writes to the bucket (not to a local folder named `s3:`), `file://…` is a URI."""
    bad = write_jsonl(tmp_path / "d.jsonl", [{"review": "x", "label": 1}] * 5)  # exits 11 after the first heartbeat
    m = manifest("sequence-classification", tiny_model_dir("bert"), bad, tmp_path / "unused")
    job = job_file(tmp_path, m)
    for output in (s3.uri("results/"), f"file://{tmp_path}/local-results"):
        result = subprocess.run(
            [sys.executable, "-m", "tuneloop", "run", str(job), "--output", output],
            capture_output=True,
            text=True,
            cwd=tmp_path,  # where a folder named "s3:" or "file:" would appear
            timeout=300,
            check=False,
        )
        assert result.returncode == ExitCode.INVALID_DATA, result.stderr[-2000:]
        assert f"output {output}" in result.stdout
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "file:").exists()
    beat = Heartbeat.model_validate(Storage.for_uri(s3.uri()).read_json(s3.uri("results/runs/1/status.json")))
    assert beat.phase == "failed"
    assert status(tmp_path / "local-results").phase == "failed"


def test_output_uri_of_another_scheme_exits_10(tmp_path) -> None:
    m = manifest("sequence-classification", tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "out")
    job = job_file(tmp_path, m)
    result = run_cli(
        ["run", str(job), "--output", "gs://bucket/x/"], module="tuneloop_trainer", cwd=tmp_path, timeout=300
    )
    assert result.returncode == ExitCode.INVALID_CONFIG
    assert "--output: scheme gs:// is not supported here" in result.stderr
    assert not (tmp_path / "gs:").exists()


# --- stopping: SIGTERM, Ctrl-C ------------------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(
    ("sig", "code", "group"),
    [(signal.SIGTERM, 143, False), (signal.SIGINT, 130, True)],
    ids=["SIGTERM-to-the-cli", "ctrl-c-in-a-terminal"],
)
def test_stopping_tuneloop_run_stops_the_trainer_with_a_checkpoint(
    tiny_model_dir, tmp_path, sig: signal.Signals, code: int, group: bool
) -> None:
    job = classification_job(tiny_model_dir, tmp_path, hyperparameters={"epochs": 4})
    out = tmp_path / "out"
    env = {**os.environ, "TUNELOOP_FAULT_STEP_DELAY": "0.3"}
    cli = subprocess.Popen(
        [sys.executable, "-m", "tuneloop", "run", str(job)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell runs a job
    )
    trainers: list[int] = []
    try:
        wait_for(lambda: heartbeat_step(out) >= 2, timeout=180)
        trainers = children(cli.pid)
        assert trainers, "the trainer runs as a child of the CLI"
        if group:
            os.killpg(cli.pid, sig)  # what Ctrl-C does: the whole foreground group
        else:
            cli.send_signal(sig)
        stdout, stderr = cli.communicate(timeout=180)
    finally:
        cli.kill()
        for pid in trainers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert cli.returncode == code, stderr[-3000:]
    wait_for(lambda: all(gone(pid) for pid in trainers), timeout=10)
    name = sig.name
    lines = [line for line in stderr.splitlines() if f"stopped on {name}" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert "checkpoint saved" in lines[0]
    assert f"resume with tuneloop run {job} --run 1" in lines[0]
    assert "interrupted" not in stdout + stderr
    assert "Traceback" not in stderr
    beat = status(out)
    assert beat.phase == "stopped"
    assert beat.message.startswith(f"stopped on {name} at step {beat.step}; checkpoint saved")
    assert beat.estimated_remaining_seconds is None
    assert beat.last_checkpoint is not None and beat.last_checkpoint.step == beat.step
    assert (out / "runs/1/checkpoints" / f"step-{beat.step:08d}" / "manifest.json").is_file()
