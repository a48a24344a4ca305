"""The trainer end to end on tiny models: every task × method that runs on CPU, outputs that
load back, early stopping, gates, and the documented failures with their exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.trainer_jobs import (
    FAMILY,
    job_file,
    manifest,
    rows_for,
    run_cli,
    run_job,
    run_recipe,
    tiny_job,
    write_jsonl,
)
from tests.manifests import ROOT
from tuneloop.contract import ExitCode

pytestmark = pytest.mark.integration

METHODS = ["full", "lora", "ia3", "prefix-tuning", "prompt-tuning"]
CASES = (
    [("sequence-classification", "text", m) for m in METHODS if m != "prefix-tuning"]
    + [("causal-lm", "text", m) for m in METHODS]
    + [
        ("causal-lm", "prompt", "lora"),
        ("causal-lm", "messages", "lora"),
    ]
    + [("seq2seq", "text", m) for m in METHODS]
)


@pytest.mark.parametrize(("task", "layout", "method"), CASES, ids=[f"{t}-{lay}-{m}" for t, lay, m in CASES])
def test_task_and_method_train_end_to_end(tiny_model_dir, tmp_path, task: str, layout: str, method: str) -> None:
    model_dir = tiny_model_dir(FAMILY[task], base_only=task != "sequence-classification")
    data = write_jsonl(tmp_path / "data.jsonl", rows_for(task, layout))
    out = tmp_path / "out"
    m = manifest(task, model_dir, data, out, layout, method={"type": method})
    if task != "sequence-classification":
        m["spec"]["evaluation"] = {"metrics": ["rouge", "bleu"] if task == "seq2seq" else ["perplexity", "rouge"]}
    result = run_recipe(m, tmp_path)

    assert result.steps > 0
    expected = {
        "sequence-classification": {"accuracy", "f1", "precision", "recall"},
        "causal-lm": {"perplexity", "rouge1", "rougeL"},
        "seq2seq": {"rouge1", "rougeL", "bleu"},
    }[task]
    assert expected | {"eval_loss"} <= set(result.metrics)
    run_dir = out / "runs" / "1"
    card = json.loads((run_dir / "model-card.json").read_text())
    assert card["method"] == method
    assert card["validationReport"]["rowsRead"] == 80
    assert (run_dir / "report" / "loss.png").stat().st_size > 1000
    assert_model_loads(task, method, model_dir, run_dir / "model")


def assert_model_loads(task: str, method: str, base_dir: Path, model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    auto = {
        "sequence-classification": AutoModelForSequenceClassification,
        "causal-lm": AutoModelForCausalLM,
        "seq2seq": AutoModelForSeq2SeqLM,
    }[task]
    if method == "full":
        model = auto.from_pretrained(model_dir)
    else:
        from peft import PeftModel

        kwargs = {"num_labels": 2} if task == "sequence-classification" else {}
        model = PeftModel.from_pretrained(auto.from_pretrained(base_dir, **kwargs), model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    extra = {"decoder_input_ids": torch.tensor([[0, 5]])} if task == "seq2seq" else {}
    assert torch.isfinite(model(input_ids=ids, **extra).logits).all()


def test_prefix_tuning_on_an_encoder_is_refused_at_setup(tiny_model_dir, tmp_path) -> None:
    from tuneloop_trainer.errors import UnsupportedModelError

    m = tiny_job("sequence-classification", tiny_model_dir("bert"), tmp_path, method={"type": "prefix-tuning"})
    with pytest.raises(UnsupportedModelError, match="use prompt-tuning or lora"):
        run_recipe(m, tmp_path)


def test_merged_lora_loads_as_a_plain_model(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    m = tiny_job(
        "causal-lm", tiny_model_dir("gpt2"), tmp_path, output={"save": "merged"}, hyperparameters={"epochs": 1}
    )
    run_recipe(m, tmp_path)
    model_dir = tmp_path / "out" / "runs" / "1" / "model"
    assert not (model_dir / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_classification_learns_the_signal(tiny_model_dir, tmp_path) -> None:
    m = tiny_job(
        "sequence-classification",
        tiny_model_dir("bert"),
        tmp_path,
        n=200,
        method={"type": "full"},
        hyperparameters={"epochs": 6, "learningRate": 3e-3},
    )
    result = run_recipe(m, tmp_path)
    assert result.metrics["accuracy"] > 0.8  # "good"/"bad" decides the label; chance is 0.5


def test_early_stopping_stops_and_keeps_the_best(tiny_model_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text", n=120))
    m = manifest(
        "sequence-classification",
        tiny_model_dir("bert"),
        data,
        tmp_path / "out",
        method={"type": "full"},
        hyperparameters={"epochs": 30, "learningRate": 5e-2},  # far too high: validation loss climbs
        earlyStopping={"metric": "eval_loss", "patience": 1, "minDelta": 0.0},
    )
    result = run_recipe(m, tmp_path)
    assert result.stopped_early
    assert result.steps < 30 * 11
    assert result.best_step is not None and result.best_step < result.steps


def test_gate_failure_exits_13_and_still_writes_the_model(tiny_model_dir, tmp_path) -> None:
    m = tiny_job(
        "sequence-classification",
        tiny_model_dir("bert"),
        tmp_path,
        hyperparameters={"epochs": 1},
        promotion={"gates": [{"metric": "accuracy", "min": 1.01}]},
    )
    result = run_job(m, tmp_path)
    assert result.returncode == ExitCode.GATE_FAILED, result.stderr
    assert "FAIL" in result.stdout
    assert "gates did not pass" in result.stderr
    assert (tmp_path / "out" / "runs" / "1" / "model").is_dir()
    from tuneloop.contract import Heartbeat

    heartbeat = Heartbeat.model_validate_json((tmp_path / "out" / "runs" / "1" / "status.json").read_text())
    assert heartbeat.step == heartbeat.total_steps > 0
    assert "accuracy" in heartbeat.metrics
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["result"] == "GateFailed"
    assert len((tmp_path / "termination-log").read_bytes()) <= 4096


def test_bad_data_exits_11_with_the_reason(tiny_model_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"review": "x", "label": 1}] * 5)
    m = manifest("sequence-classification", tiny_model_dir("bert"), data, tmp_path / "out")
    result = run_job(m, tmp_path)
    assert result.returncode == ExitCode.INVALID_DATA, result.stderr
    assert json.loads((tmp_path / "termination-log").read_text())["reason"] == "InvalidData"
    assert "'text'" in result.stderr and "review" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_that_does_not_fit_the_task_exits_12(tiny_model_dir, tmp_path) -> None:
    m = tiny_job("causal-lm", tiny_model_dir("bert"), tmp_path)
    result = run_job(m, tmp_path)
    assert result.returncode == ExitCode.UNSUPPORTED_MODEL, result.stderr
    assert "encoder model (bert), which does not fit task causal-lm" in result.stderr


def test_invalid_manifest_is_refused_before_training(tmp_path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("apiVersion: tuneloop.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\nspec: {task: nope}\n")
    result = run_cli(["run", str(job)])
    assert result.returncode == ExitCode.INVALID_CONFIG
    assert "spec.task" in result.stderr


def test_two_processes_with_gloo_train_one_model(tiny_model_dir, tmp_path) -> None:
    """Data-parallel training through accelerate: two CPU processes, the gloo backend."""
    m = tiny_job(
        "sequence-classification",
        tiny_model_dir("bert"),
        tmp_path,
        n=120,
        method={"type": "lora"},
        hyperparameters={"epochs": 1},
    )
    job = job_file(tmp_path, m)
    import socket

    with socket.socket() as sock:  # torchrun's static rendezvous needs a real port, not 0
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            port,
            "--master-addr",
            "127.0.0.1",
            "-m",
            "tuneloop_trainer",
            "run",
            str(job),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("result: passed") == 1  # only rank 0 reports
    card = json.loads((tmp_path / "out" / "runs" / "1" / "model-card.json").read_text())
    single_process_steps = -(-int(card["validationReport"]["split"]["sizes"]["train"]) // 8)
    assert card["hyperparameters"]["stepsTrained"] == single_process_steps // 2  # each step sees two batches


def test_model_data_and_outputs_on_s3(tiny_model_dir, tmp_path, s3) -> None:
    """s3:// for the model, the data and the outputs, credentials from the environment."""
    model_uri = s3.upload_dir(tiny_model_dir("gpt2", base_only=True), "models/tiny-gpt2/")
    data = write_jsonl(tmp_path / "chat.jsonl", rows_for("causal-lm", "prompt"))
    s3.put_bytes("data/chat/part-0.jsonl", data.read_bytes())
    m = manifest("causal-lm", Path("/unused"), data, tmp_path / "unused", "prompt", hyperparameters={"epochs": 1})
    m["spec"]["model"]["uri"] = model_uri
    m["spec"]["dataset"]["uri"] = s3.uri("data/chat/")
    m["spec"]["output"]["uri"] = s3.uri("jobs/chat/")
    result = run_recipe(m, tmp_path)
    assert result.model_uri == s3.uri("jobs/chat/runs/1/model/")
    keys = s3.list_keys("jobs/chat/runs/1/")
    assert "jobs/chat/runs/1/model/adapter_model.safetensors" in keys
    assert "jobs/chat/runs/1/model-card.json" in keys
    assert "jobs/chat/runs/1/report/loss.png" in keys


def test_same_seed_same_result(tiny_model_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("causal-lm", "text"))
    results = []
    for i in range(2):
        m = manifest(
            "causal-lm",
            tiny_model_dir("gpt2"),
            data,
            tmp_path / f"out{i}",
            hyperparameters={"epochs": 1, "gradientAccumulationSteps": 2},
            method={"type": "full"},
        )
        m["spec"]["hyperparameters"]["gradientCheckpointing"] = True
        results.append(run_recipe(m, tmp_path / f"w{i}").metrics["eval_loss"])
    assert results[0] == results[1]


def test_unreadable_config_exits_10(tmp_path) -> None:
    bad = tmp_path / "job.json"
    bad.write_text("{not json")
    result = run_cli(["--config", str(bad)], module="tuneloop_trainer", timeout=120)
    assert result.returncode == ExitCode.INVALID_CONFIG
    assert "cannot read the job config" in result.stderr


def test_hub_model_missing_offline_exits_12(tmp_path) -> None:
    m = tiny_job("causal-lm", Path("/unused"), tmp_path)
    m["spec"]["model"]["uri"] = "hf://no-such-org/no-such-model"
    result = run_job(m, tmp_path)
    assert result.returncode == ExitCode.UNSUPPORTED_MODEL, result.stderr[-2000:]
    assert "no-such-org/no-such-model" in result.stderr
    assert "Traceback" not in result.stderr
