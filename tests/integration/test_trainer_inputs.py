"""The trainer on inputs users got wrong (issue #9): each known permanent failure exits with
its documented code and a one-line message naming what to fix, and a ``maxSeqLength``
beyond the model's positions is clamped with a visible warning instead of crashing mid-run."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.harness import trainer_jobs
from tests.harness.trainer_jobs import WORDS, manifest, rows_for, tiny_job, write_jsonl
from tuneloop.contract import ExitCode
from tuneloop_trainer.recipe import RunResult

pytestmark = pytest.mark.integration


def run_job(m: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`tuneloop run job.yaml` with its own cache (S3 downloads) and termination log under tmp_path."""
    return trainer_jobs.run_job(m, tmp_path, env={"TUNELOOP_CACHE_DIR": str(tmp_path / "cache")})


def assert_one_line_failure(result: Any, tmp_path: Path, code: ExitCode, reason: str) -> str:
    """The run failed permanently with ``code``, without a traceback; returns its message."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["reason"] == reason
    message = str(summary["message"])
    assert "\n" not in message
    return message


def test_a_classification_head_with_fewer_labels_than_the_data_exits_12(tiny_model_dir, tmp_path: Path) -> None:
    rows = [
        {**r, "label": ["neg", "neutral", "pos"][i % 3]}
        for i, r in enumerate(rows_for("sequence-classification", "text"))
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    m = manifest("sequence-classification", tiny_model_dir("bert", num_labels=2), data, tmp_path / "out")
    message = assert_one_line_failure(run_job(m, tmp_path), tmp_path, ExitCode.UNSUPPORTED_MODEL, "UnsupportedModel")
    assert "2 labels" in message and "3 labels" in message
    assert "without a task head" in message


def test_a_truncated_weights_file_exits_12_naming_the_file(tiny_model_dir, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("gpt2"), model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    m = tiny_job("causal-lm", model_dir, tmp_path)
    message = assert_one_line_failure(run_job(m, tmp_path), tmp_path, ExitCode.UNSUPPORTED_MODEL, "UnsupportedModel")
    assert "model.safetensors" in message and "truncated or corrupt" in message


def test_an_unsafe_key_in_the_dataset_prefix_exits_11_naming_the_key(tiny_model_dir, tmp_path: Path, s3) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("causal-lm", "text"))
    s3.put_bytes("data/part-0.jsonl", data.read_bytes())
    s3.put_bytes("data/sub/../../escape.jsonl", data.read_bytes())
    m = manifest("causal-lm", tiny_model_dir("gpt2"), data, tmp_path / "out")
    m["spec"]["dataset"]["uri"] = s3.uri("data/")
    message = assert_one_line_failure(run_job(m, tmp_path), tmp_path, ExitCode.INVALID_DATA, "InvalidData")
    assert "spec.dataset.uri" in message
    assert "'sub/../../escape.jsonl'" in message
    assert "'..' segment" in message


def test_an_unsafe_key_in_the_model_prefix_exits_12_naming_the_key(tiny_model_dir, tmp_path: Path, s3) -> None:
    model_uri = s3.upload_dir(tiny_model_dir("gpt2"), "models/tiny/")
    s3.put_bytes("models/tiny/\\evil.json", b"{}")
    m = tiny_job("causal-lm", Path("/unused"), tmp_path)
    m["spec"]["model"]["uri"] = model_uri
    message = assert_one_line_failure(run_job(m, tmp_path), tmp_path, ExitCode.UNSUPPORTED_MODEL, "UnsupportedModel")
    assert "spec.model.uri" in message and "'\\\\evil.json'" in message and "backslash" in message


# --- maxSeqLength beyond the model's positions --------------------------------------------


class Collect:
    """A sink that keeps the console messages."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def phase(self, name: str) -> None:
        pass

    def step(self, report: Any) -> None:
        pass

    def evaluation(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        self.messages.append(text)

    def close(self) -> None:
        pass


def long_rows(task: str, n: int = 40, words: int = 400) -> list[dict[str, Any]]:
    """Rows far longer than the tiny models' 256 positions (one token per word)."""
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(words)) + f" {i}"
        rows.append(
            {"text": text, "label": "pos" if i % 2 else "neg"} if task == "sequence-classification" else {"text": text}
        )
    return rows


def run_collecting(m: dict[str, Any], tmp_path: Path) -> tuple[RunResult, Collect]:
    sink = Collect()
    return trainer_jobs.run_recipe(m, tmp_path, sink), sink


@pytest.mark.parametrize(
    "case",
    [
        ("sequence-classification", "bert", "full", 256),
        ("causal-lm", "gpt2", "prompt-tuning", 236),  # 20 virtual tokens are prepended
    ],
    ids=["bert-full", "gpt2-prompt-tuning"],
)
def test_max_seq_length_beyond_the_models_positions_is_clamped_with_a_warning(
    tiny_model_dir, tmp_path: Path, case: tuple[str, str, str, int]
) -> None:
    task, family, method, usable = case
    data = write_jsonl(tmp_path / "d.jsonl", long_rows(task))
    m = manifest(
        task,
        tiny_model_dir(family),
        data,
        tmp_path / "out",
        method={"type": method},
        hyperparameters={"epochs": 1, "maxSeqLength": 1024, "batchSize": 4},
    )
    result, sink = run_collecting(m, tmp_path)

    assert result.steps > 0
    warning = next(msg for msg in sink.messages if "maxSeqLength 1024" in msg)
    assert f"using {usable}" in warning
    card = json.loads((tmp_path / "out" / "runs" / "1" / "model-card.json").read_text())
    assert any("maxSeqLength 1024" in note and f"using {usable}" in note for note in card["notes"])
    assert any("maxSeqLength 1024" in w for w in card["validationReport"]["warnings"])
    assert card["hyperparameters"]["maxSeqLength"] == usable


def test_generated_metrics_of_prompts_near_the_position_limit_do_not_crash(tiny_model_dir, tmp_path: Path) -> None:
    """ROUGE/BLEU generate after the prompt: a prompt of maxSeqLength tokens left no position for
    the new tokens, and the final evaluation crashed after all the training."""
    rng = random.Random(1)
    rows = [
        {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(300)),
            "completion": " ".join(rng.choice(WORDS) for _ in range(12)),
        }
        for _ in range(24)
    ]
    m = tiny_job(
        "causal-lm",
        tiny_model_dir("gpt2"),
        tmp_path,
        "prompt",
        rows=rows,
        method={"type": "lora"},
        hyperparameters={"epochs": 1, "maxSeqLength": 256, "batchSize": 4, "maxSteps": 2},
        evaluation={"metrics": ["rouge"]},
    )
    result, _sink = run_collecting(m, tmp_path)
    assert "rougeL" in result.metrics or any(k.startswith("rouge") for k in result.metrics)
