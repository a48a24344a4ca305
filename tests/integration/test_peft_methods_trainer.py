"""The newer peft methods through the whole trainer: a run with DoRA, VeRA, LoHa, LoKr or a
bottleneck adapter trains, evaluates, writes its card, and its saved model loads back
(merged into full weights where the method merges)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness.trainer_jobs import FAMILY, manifest, rows_for, run_recipe, write_jsonl
from tuneloop.api import FineTuneJob
from tuneloop_trainer.models import load_trained_model, resolve_model

pytestmark = pytest.mark.integration

CASES: list[tuple[str, dict[str, Any], str]] = [
    ("causal-lm", {"type": "lora", "lora": {"useDora": True}}, "adapter"),
    ("sequence-classification", {"type": "vera"}, "merged"),
    ("seq2seq", {"type": "loha"}, "adapter"),
    ("sequence-classification", {"type": "lokr"}, "merged"),
    ("causal-lm", {"type": "bottleneck"}, "adapter"),
    ("sequence-classification", {"type": "bottleneck", "bottleneck": {"reductionFactor": 4}}, "adapter"),
]


@pytest.mark.parametrize(
    ("task", "method", "save"), CASES, ids=[f"{t}-{m['type']}{'-dora' if 'lora' in m else ''}" for t, m, _ in CASES]
)
def test_method_runs_through_the_trainer(
    tiny_model_dir, tmp_path, task: str, method: dict[str, Any], save: str
) -> None:
    model_dir = tiny_model_dir(FAMILY[task], base_only=task != "sequence-classification")
    data = write_jsonl(tmp_path / "data.jsonl", rows_for(task, "text"))
    out = tmp_path / "out"
    m = manifest(task, model_dir, data, out, method=method, output={"save": save})
    if task != "sequence-classification":
        m["spec"]["evaluation"] = {"metrics": ["perplexity"] if task == "causal-lm" else ["rouge"]}
    result = run_recipe(m, tmp_path)

    assert result.steps > 0
    assert result.metrics["eval_loss"] > 0
    run_dir = out / "runs" / "1"
    card = json.loads((run_dir / "model-card.json").read_text())
    assert card["method"] == method["type"]
    model_path = run_dir / "model"
    if save == "merged":
        assert (model_path / "config.json").is_file()
        assert not (model_path / "adapter_config.json").exists()
    else:
        assert (model_path / "adapter_config.json").is_file()
    spec = FineTuneJob.from_manifest(m).spec
    base = resolve_model(spec.model, lambda uri, dest: dest, tmp_path)
    names = ["neg", "pos"] if task == "sequence-classification" else None
    trained = load_trained_model(spec, model_path, "file:///model", base, names)
    assert trained.kind == ("full" if save == "merged" else "adapter")
