"""Benchmark: our trainer vs plain Hugging Face ``Trainer`` on SST-2 classification.

Same model (all-MiniLM-L6-v2, full fine-tuning), data (SST-2 train → dev), hyperparameters,
epochs and seed. The baseline is ``Trainer`` with ``DataCollatorWithPadding`` (random
batches padded to their longest member); ours uses length-grouped batches. Reported:
non-padding tokens per second of training, training wall time, peak memory and dev
accuracy of both, and the ratios.

    .venv/bin/python bench/classification.py [--epochs 1] [--limit N]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    SPEED_ROWS,
    baseline_arguments,
    bench_manifest,
    compare,
    peak_rss_mb,
    read_sst2,
    timed_train,
    train_ours,
    write_jsonl,
)

HP = {"lr": 5e-5, "batch_size": 32, "max_len": 128, "warmup_ratio": 0.06, "weight_decay": 0.01, "seed": 42}


def prepare(workdir: Path, limit: int | None) -> None:
    train = read_sst2("train")[:limit] if limit else read_sst2("train")
    dev = read_sst2("dev")
    write_jsonl([{"text": t, "label": y} for t, y in train], workdir / "train.jsonl")
    write_jsonl([{"text": t, "label": y} for t, y in dev], workdir / "dev.jsonl")


def ours_manifest(workdir: Path, epochs: int) -> dict[str, Any]:
    """Our job for the benchmark, with every optional stage off: no baselines (on by default),
    no label-issue detection, augmentation, replay, dropout override or differential privacy.
    Length statistics and error analysis always run (outside the training steps timed here)."""
    from tuneloop_trainer.example import minilm_path

    return bench_manifest(
        "bench-sst2",
        "sequence-classification",
        f"file://{minilm_path()}",
        workdir,
        epochs,
        hp=HP,
        dataset={"cleaning": {"dedupe": "off", "dropEmpty": True}, "labelIssues": "off"},
        evaluation={"metrics": ["accuracy"], "baselines": False},
    )


def run_ours(workdir: Path, epochs: int) -> dict[str, Any]:
    result, steps = train_ours(ours_manifest(workdir, epochs), workdir)
    return {
        **steps,
        "dev_accuracy": result.metrics["accuracy"],
        "peak_rss_mb": peak_rss_mb(),
    }


def run_baseline(workdir: Path, epochs: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
    )

    from tuneloop_trainer.example import minilm_path

    torch.manual_seed(HP["seed"])
    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    rows = {s: [json.loads(x) for x in (workdir / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "dev")}

    class Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self, items: list[dict[str, Any]]) -> None:
            enc = tok([r["text"] for r in items], truncation=True, max_length=HP["max_len"])
            self.items = [
                {"input_ids": i, "attention_mask": m, "labels": r["label"]}
                for i, m, r in zip(enc["input_ids"], enc["attention_mask"], items, strict=True)
            ]

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return self.items[i]

    train, dev = Data(rows["train"]), Data(rows["dev"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    steps = epochs * -(-len(train) // HP["batch_size"])
    args = baseline_arguments(workdir, epochs, steps, HP, per_device_eval_batch_size=64)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
    seconds = timed_train(trainer)
    tokens = epochs * sum(len(x["input_ids"]) for x in train.items)
    pred = trainer.predict(dev)
    accuracy = float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())
    return {
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "dev_accuracy": accuracy,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    done = compare(
        __doc__,
        Path(__file__),
        prepare,
        run_ours,
        run_baseline,
        rows=[*SPEED_ROWS, ("dev_accuracy", "dev accuracy", "{:.4f}")],
    )
    if done is None:
        return
    baseline, ours, args = done
    print(f"accuracy difference: {100 * (ours['dev_accuracy'] - baseline['dev_accuracy']):+.2f} points")
    print(
        f"(SST-2, all-MiniLM-L6-v2, full fine-tuning, {args.epochs} epoch(s), batch {HP['batch_size']}, "
        f"lr {HP['lr']}, seed {HP['seed']}, CPU)"
    )


if __name__ == "__main__":
    main()
