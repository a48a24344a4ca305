"""The trainer end to end on tiny models: every task × method that runs on CPU, outputs that
load back, early stopping, gates, and the documented failures with their exit codes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.manifests import ROOT
from tuneloop.api import FineTuneJob
from tuneloop.contract import ExitCode
from tuneloop_trainer.progress import Sinks
from tuneloop_trainer.recipe import FineTuneRecipe, RunContext, RunResult

pytestmark = pytest.mark.integration

WORDS = (
    "the cat sat on the mat and the dog ran in the park while a bird sang "
    "good great fine happy bad sad poor awful day night river tree house"
).split()


def rows_for(task: str, layout: str, n: int = 80, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        positive = i % 2 == 0
        words.insert(rng.randint(0, len(words)), "good" if positive else "bad")
        text = " ".join(words) + f" {i}"
        if task == "sequence-classification":
            rows.append({"text": text, "label": "pos" if positive else "neg", "group": "a" if i % 3 else "b"})
        elif task == "seq2seq":
            rows.append({"source": text, "target": " ".join(words[:3])})
        elif layout == "prompt":
            rows.append({"prompt": f"Q: {text}\nA:", "completion": " yes" if positive else " no"})
        elif layout == "messages":
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": "yes" if positive else "no"},
                    ]
                }
            )
        else:
            rows.append({"text": text})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FAMILY = {"sequence-classification": "bert", "causal-lm": "gpt2", "seq2seq": "t5"}


def manifest(task: str, model_dir: Path, data: Path, out: Path, layout: str = "text", **spec: Any) -> dict[str, Any]:
    columns = (
        {
            "prompt": {"prompt": "prompt", "completion": "completion"},
            "messages": {"messages": "messages"},
            "text": {},
        }.get(layout, {})
        if task == "causal-lm"
        else {}
    )
    body: dict[str, Any] = {
        "task": task,
        "model": {"uri": f"file://{model_dir}"},
        "dataset": {
            "uri": f"file://{data}",
            "columns": columns,
            "split": {"validation": 0.15, "test": 0.15},
            "screening": {"pii": "off"},
        },
        "hyperparameters": {"epochs": 2, "batchSize": 8, "maxSeqLength": 48, "learningRate": 5e-3, "seed": 1},
        "output": {"uri": f"file://{out}/"},
        "resources": {"gpus": 0},
    }
    for key, value in spec.items():
        body[key] = value if not isinstance(value, dict) else {**body.get(key, {}), **value}
    return {"apiVersion": "tuneloop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"}, "spec": body}


def run_recipe(m: dict[str, Any], tmp_path: Path) -> RunResult:
    job = FineTuneJob.from_manifest(m)
    ctx = RunContext(
        job=job,
        run=1,
        output_uri=job.spec.output.uri,
        work_dir=tmp_path / "work",
        sinks=Sinks([]),
        cache_dir=tmp_path / "cache",
    )
    return FineTuneRecipe(ctx).run()


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

    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text"))
    m = manifest(
        "sequence-classification", tiny_model_dir("bert"), data, tmp_path / "out", method={"type": "prefix-tuning"}
    )
    with pytest.raises(UnsupportedModelError, match="use prompt-tuning or lora"):
        run_recipe(m, tmp_path)


def test_merged_lora_loads_as_a_plain_model(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", rows_for("causal-lm", "text"))
    m = manifest(
        "causal-lm",
        tiny_model_dir("gpt2"),
        data,
        tmp_path / "out",
        output={"save": "merged"},
        hyperparameters={"epochs": 1},
    )
    run_recipe(m, tmp_path)
    model_dir = tmp_path / "out" / "runs" / "1" / "model"
    assert not (model_dir / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_classification_learns_the_signal(tiny_model_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text", n=200))
    m = manifest(
        "sequence-classification",
        tiny_model_dir("bert"),
        data,
        tmp_path / "out",
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


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuneloop", *args], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False
    )


def run_job(
    m: dict[str, Any], tmp_path: Path, *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`tuneloop run job.yaml`, as a user types it (termination message to tmp_path/termination-log;
    ``env`` adds to the environment)."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(m))
    env = {**os.environ, "TUNELOOP_TERMINATION_LOG": str(tmp_path / "termination-log"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tuneloop", "run", str(job)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
        env=env,
    )


def test_gate_failure_exits_13_and_still_writes_the_model(tiny_model_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text"))
    m = manifest(
        "sequence-classification",
        tiny_model_dir("bert"),
        data,
        tmp_path / "out",
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
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("causal-lm", "text"))
    m = manifest("causal-lm", tiny_model_dir("bert"), data, tmp_path / "out")
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
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text", n=120))
    m = manifest(
        "sequence-classification",
        tiny_model_dir("bert"),
        data,
        tmp_path / "out",
        method={"type": "lora"},
        hyperparameters={"epochs": 1},
    )
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(m))
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
    result = subprocess.run(
        [sys.executable, "-m", "tuneloop_trainer", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == ExitCode.INVALID_CONFIG
    assert "cannot read the job config" in result.stderr


def test_hub_model_missing_offline_exits_12(tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("causal-lm", "text"))
    m = manifest("causal-lm", Path("/unused"), data, tmp_path / "out")
    m["spec"]["model"]["uri"] = "hf://no-such-org/no-such-model"
    result = run_job(m, tmp_path)
    assert result.returncode == ExitCode.UNSUPPORTED_MODEL, result.stderr[-2000:]
    assert "no-such-org/no-such-model" in result.stderr
    assert "Traceback" not in result.stderr
