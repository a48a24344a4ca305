"""The learning rate a run shows is its peak (the head's group under layer-wise decay), the same
on the console, in Prometheus and in the history ``learning_rate.png`` is drawn from."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from tests.harness.trainer_jobs import manifest, rows_for, write_jsonl
from tuneloop.api import FineTuneJob
from tuneloop_trainer.optim import parameter_groups, peak_learning_rate
from tuneloop_trainer.progress import ConsoleProgress, Sinks
from tuneloop_trainer.recipe import FineTuneRecipe, RunContext
from tuneloop_trainer.telemetry import PrometheusSink

pytestmark = pytest.mark.integration

LR = 4e-3
DECAY = 0.5


def test_the_peak_is_the_head_groups_rate_not_the_embeddings() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    model = BertForSequenceClassification(config)
    groups = parameter_groups(model, LR, 0.01, DECAY)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=LR)
    rates = sorted({g["lr"] for g in optimizer.param_groups})
    assert rates[0] == pytest.approx(LR * DECAY**3) and rates[-1] == pytest.approx(LR)  # embeddings, head
    assert peak_learning_rate(optimizer) == pytest.approx(LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.25)  # a schedule scales every group
    assert peak_learning_rate(optimizer) == pytest.approx(LR * 0.25)
    del scheduler


def test_console_prometheus_and_history_show_the_peak_rate(tiny_model_dir, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text", n=48))
    m = manifest(
        "sequence-classification",
        tiny_model_dir("bert"),
        data,
        tmp_path / "out",
        method={"type": "full", "layerwiseLrDecay": DECAY},
        hyperparameters={"epochs": 1, "learningRate": LR, "lrScheduler": "constant", "warmupRatio": 0.0},
    )
    job = FineTuneJob.from_manifest(m)
    console = io.StringIO()
    prom = PrometheusSink(port=None, job="t", run=1)
    ctx = RunContext(
        job=job,
        run=1,
        output_uri=job.spec.output.uri,
        work_dir=tmp_path / "work",
        sinks=Sinks([ConsoleProgress(console, interval=0.0), prom]),
        cache_dir=tmp_path / "cache",
    )
    FineTuneRecipe(ctx).run()
    history = json.loads((tmp_path / "out" / "runs" / "1" / "report" / "history.json").read_text())
    plotted = [row["learning_rate"] for row in history["train"]]
    assert plotted and plotted == pytest.approx([LR] * len(plotted))  # not LR × 0.5³, the embeddings' rate
    shown = [float(x) for x in re.findall(r"\blr ([0-9.e+-]+)", console.getvalue())]
    assert shown and shown == pytest.approx([LR] * len(shown))
    exported = prom.registry.get_sample_value("tuneloop_trainer_learning_rate", {"finetunejob": "t", "run": "1"})
    assert exported == pytest.approx(LR)
