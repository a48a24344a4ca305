"""Shared helpers of the benchmarks: SST-2 data, child processes, peak memory."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def read_sst2(split: str) -> list[tuple[str, int]]:
    """SST-2 rows as (sentence, label); ``split`` is ``train`` or ``dev``."""
    rows = []
    for line in (SST2 / f"{split}.tsv").read_text().splitlines():
        if not line.strip():
            continue
        text, label = line.rsplit("\t", 1)
        rows.append((text, int(label)))
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, mode: str, workdir: Path, extra: list[str] | None = None) -> dict[str, Any]:
    """Run one side of a benchmark in its own process (so peak memory is its own)."""
    out = workdir / f"{mode}.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(script), "--child", mode, "--workdir", str(workdir), "--result", str(out)]
    subprocess.run(cmd + (extra or []), check=True, env=env)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


class StepRecorder:
    """A trainer sink that adds up what training steps did (training time only, no eval)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.tokens = 0

    def phase(self, name: str) -> None: ...
    def evaluation(self, *args: Any) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...

    def step(self, report: Any) -> None:
        self.seconds += report.seconds
        self.tokens += report.tokens

    def result(self) -> dict[str, float]:
        return {"tokens": self.tokens, "train_seconds": self.seconds, "tokens_per_second": self.tokens / self.seconds}


def bench_manifest(
    name: str,
    task: str,
    model_uri: str,
    workdir: Path,
    epochs: int,
    *,
    hp: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    dataset: Mapping[str, Any] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Our side's job: ``train.jsonl`` to train on, ``dev.jsonl`` to validate and test on, the
    benchmark's hyperparameters ``hp`` in fp32, full fine-tuning, output to ``ours-out/``.

    ``dataset`` and ``hyperparameters`` add to (or override) those blocks."""
    from tuneloop_trainer.example import job_manifest

    return job_manifest(
        name,
        task=task,
        model_uri=model_uri,
        dataset={
            "uri": f"file://{workdir / 'train.jsonl'}",
            "split": {"validationUri": f"file://{workdir / 'dev.jsonl'}", "testUri": f"file://{workdir / 'dev.jsonl'}"},
            "cleaning": {"dedupe": "off"},
            "screening": {"pii": "off"},
            **(dataset or {}),
        },
        method={"type": "full"},
        hyperparameters={
            "learningRate": hp["lr"],
            "epochs": epochs,
            "batchSize": hp["batch_size"],
            "maxSeqLength": hp["max_len"],
            "warmupRatio": hp["warmup_ratio"],
            "weightDecay": hp["weight_decay"],
            "seed": hp["seed"],
            "precision": "fp32",
            **(hyperparameters or {}),
        },
        evaluation=evaluation,
        output={"uri": f"file://{workdir / 'ours-out'}/"},
    )


def save_gpt2(directory: Path, tokenizer: Any, **config: Any) -> Any:
    """A GPT-2-style model built from ``config`` (seeded: the same weights every time), saved
    with its tokenizer into ``directory``; returns the model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **config))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def baseline_arguments(workdir: Path, epochs: int, steps: int, hp: Mapping[str, Any], **extra: Any) -> Any:
    """The baseline's ``TrainingArguments``: the benchmark's hyperparameters ``hp`` over ``steps``
    optimizer steps, on CPU, nothing saved, evaluated or logged while training."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(workdir / "baseline-out"),
        per_device_train_batch_size=hp["batch_size"],
        learning_rate=hp["lr"],
        num_train_epochs=epochs,
        warmup_steps=int(hp["warmup_ratio"] * steps),
        weight_decay=hp["weight_decay"],
        seed=hp["seed"],
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )


def timed_train(trainer: Any) -> float:
    """Train a Hugging Face ``Trainer``; the seconds it took (its own ``train_runtime``)."""
    start = time.perf_counter()
    out = trainer.train()
    seconds: float = out.metrics.get("train_runtime", time.perf_counter() - start)
    return seconds


def train_ours(manifest: dict[str, Any], workdir: Path) -> tuple[Any, dict[str, float]]:
    """Run our recipe on a manifest; returns the run result and the step recorder's totals."""
    from tuneloop.api import FineTuneJob
    from tuneloop_trainer.progress import Sinks
    from tuneloop_trainer.recipe import FineTuneRecipe, RunContext

    job = FineTuneJob.from_manifest(manifest)
    recorder = StepRecorder()
    ctx = RunContext(
        job=job,
        run=1,
        output_uri=job.spec.output.uri,
        work_dir=workdir / "ours-work",
        sinks=Sinks([recorder]),
        cache_dir=workdir / "cache",
    )
    result = FineTuneRecipe(ctx).run()
    return result, recorder.result()


def compare(
    description: Any, script: Path, prepare: Any, run_ours: Any, run_baseline: Any, *, rows: list[tuple[str, str, str]]
) -> tuple[dict[str, Any], dict[str, Any], Any] | None:
    """The shared command line: ``--child`` runs one side; otherwise prepare, run both, print the table."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training rows")
    parser.add_argument("--child", choices=("ours", "baseline"))
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.child:
        result = (run_ours if args.child == "ours" else run_baseline)(args.workdir, args.epochs)
        args.result.write_text(json.dumps(result))
        return None
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.limit)
        extra = ["--epochs", str(args.epochs)]
        baseline = run_child(script, "baseline", workdir, extra)
        ours = run_child(script, "ours", workdir, extra)
    print(f"{'':22}{'HF Trainer':>14}{'tuneloop':>14}{'ratio':>10}")
    for key, label, fmt in rows:
        ratio = ours[key] / baseline[key] if baseline[key] else float("nan")
        print(f"{label:22}{fmt.format(baseline[key]):>14}{fmt.format(ours[key]):>14}{ratio:>9.2f}x")
    return baseline, ours, args


SPEED_ROWS = [
    ("tokens_per_second", "tokens/s (non-pad)", "{:,.0f}"),
    ("train_seconds", "train wall time (s)", "{:.1f}"),
    ("peak_rss_mb", "peak memory (MB)", "{:,.0f}"),
]
