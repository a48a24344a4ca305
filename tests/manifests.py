"""Manifests shared by the API, CRD and CLI tests: a minimal valid job, and broken variants.

Each broken variant names the field path both the pydantic models and the CRD (OpenAPI
schema + CEL, as the API server applies them) must report, or says that only the
models catch it (rules documented in ``tuneloop.cel.OPERATOR_ONLY_RULES``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD_PATH = ROOT / "crds" / "finetunejobs.tuneloop.dev.yaml"

Manifest = dict[str, Any]


def minimal_job(task: str = "sequence-classification", name: str = "job") -> Manifest:
    """The smallest valid FineTuneJob for a task."""
    return {
        "apiVersion": "tuneloop.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "task": task,
            "model": {"uri": "hf://org/model"},
            "dataset": {"uri": "s3://data-bucket/train/"},
            "output": {"uri": "s3://model-bucket/out/"},
        },
    }


def load_examples() -> list[tuple[str, Manifest]]:
    return [(p.name, yaml.safe_load(p.read_text())) for p in EXAMPLES]


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def apply(m: Manifest) -> None:
        node = m
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    return apply


def _del(path: str) -> Callable[[Manifest], None]:
    def apply(m: Manifest) -> None:
        node = m
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[part]
        del node[parts[-1]]

    return apply


def _all(*steps: Callable[[Manifest], None]) -> Callable[[Manifest], None]:
    def apply(m: Manifest) -> None:
        for step in steps:
            step(m)

    return apply


@dataclass(frozen=True)
class Broken:
    """A broken variant of :func:`minimal_job`."""

    name: str
    mutate: Callable[[Manifest], None]
    path: str
    """Field path reported for it."""
    task: str = "sequence-classification"
    crd_catches: bool = True
    """False for rules only the models (tuneloop validate, the operator) check."""

    def manifest(self) -> Manifest:
        m = copy.deepcopy(minimal_job(self.task))
        self.mutate(m)
        return m


BROKEN: list[Broken] = [
    Broken(
        "typo in a field name", _set("spec.hyperparameters.learningrate", 1e-4), "spec.hyperparameters.learningrate"
    ),
    Broken("LoRA rank zero", _set("spec.method.lora", {"r": 0}), "spec.method.lora.r"),
    Broken(
        "learning rate above 1", _set("spec.hyperparameters.learningRate", 2.0), "spec.hyperparameters.learningRate"
    ),
    Broken("learning rate zero", _set("spec.hyperparameters.learningRate", 0.0), "spec.hyperparameters.learningRate"),
    Broken("warmup ratio of 1", _set("spec.hyperparameters.warmupRatio", 1.0), "spec.hyperparameters.warmupRatio"),
    Broken("zero epochs", _set("spec.hyperparameters.epochs", 0), "spec.hyperparameters.epochs"),
    Broken("negative batch size", _set("spec.hyperparameters.batchSize", -8), "spec.hyperparameters.batchSize"),
    Broken("unknown task", _set("spec.task", "translation"), "spec.task"),
    Broken("unknown precision", _set("spec.hyperparameters.precision", "bf32"), "spec.hyperparameters.precision"),
    Broken("http model URI", _set("spec.model.uri", "http://example.com/model"), "spec.model.uri"),
    Broken("hf URI for data", _set("spec.dataset.uri", "hf://org/data"), "spec.dataset.uri"),
    Broken(
        "'..' in the output URI", _set("spec.output.uri", "s3://model-bucket/jobs/../other-team/"), "spec.output.uri"
    ),
    Broken("empty bucket", _set("spec.output.uri", "s3:///models/"), "spec.output.uri"),
    Broken("relative file URI", _set("spec.dataset.uri", "file://data/train.csv"), "spec.dataset.uri"),
    Broken(
        "secretRef not DNS-1123", _set("spec.storage.secretRef", {"name": "S3_Creds"}), "spec.storage.secretRef.name"
    ),
    Broken("duration without unit", _set("spec.retrain.cooldown", "1 hour"), "spec.retrain.cooldown"),
    Broken("missing output", _del("spec.output"), "spec.output"),
    Broken("name too long", _set("metadata.name", "a" * 64), "metadata.name"),
    Broken(
        "qlora without GPU",
        _all(_set("spec.method.type", "qlora"), _set("spec.resources.gpus", 0)),
        "spec.resources.gpus",
    ),
    Broken("unfreezing with LoRA", _set("spec.method.unfreezing", {"startLayers": 2}), "spec.method.unfreezing"),
    Broken("layer-wise decay with LoRA", _set("spec.method.layerwiseLrDecay", 0.9), "spec.method.layerwiseLrDecay"),
    Broken(
        "lora block with full",
        _all(_set("spec.method.type", "full"), _set("spec.method.lora", {"r": 4})),
        "spec.method.lora",
    ),
    Broken(
        "balance for causal-lm",
        _set("spec.dataset.balance", {"strategy": "oversample"}),
        "spec.dataset.balance",
        task="causal-lm",
    ),
    Broken("replay ratio without URI", _set("spec.dataset.replay", {"ratio": 0.2}), "spec.dataset.replay.uri"),
    Broken("ROUGE for a classifier", _set("spec.evaluation.metrics", ["accuracy", "rouge"]), "spec.evaluation.metrics"),
    Broken("F1 for seq2seq", _set("spec.evaluation.metrics", ["f1"]), "spec.evaluation.metrics", task="seq2seq"),
    Broken(
        "forgetting for a classifier",
        _set("spec.evaluation.forgetting", {"uri": "s3://general-data/x.jsonl"}),
        "spec.evaluation.forgetting",
    ),
    Broken(
        "label column for seq2seq",
        _set("spec.dataset.columns", {"label": "y"}),
        "spec.dataset.columns.label",
        task="seq2seq",
    ),
    Broken(
        "prompt without completion",
        _set("spec.dataset.columns", {"prompt": "q"}),
        "spec.dataset.columns.completion",
        task="causal-lm",
    ),
    Broken(
        "splits leave nothing to train",
        _set("spec.dataset.split", {"validation": 0.5, "test": 0.5}),
        "spec.dataset.split",
    ),
    Broken("packing for a classifier", _set("spec.hyperparameters.packing", True), "spec.hyperparameters.packing"),
    Broken(
        "output.save with full",
        _all(_set("spec.method.type", "full"), _set("spec.output.save", "merged")),
        "spec.output.save",
    ),
    Broken("gate without a bound", _set("spec.promotion.gates", [{"metric": "f1"}]), "spec.promotion.gates[0]"),
    Broken(
        "gate min above max",
        _set("spec.promotion.gates", [{"metric": "f1", "min": 0.9, "max": 0.8}]),
        "spec.promotion.gates[0].min",
    ),
    # Only the models catch these (see tuneloop.cel.OPERATOR_ONLY_RULES and the cron note).
    Broken(
        "gate on a metric not computed",
        _set("spec.promotion.gates", [{"metric": "rougeL", "min": 0.3}]),
        "spec.promotion.gates[0].metric",
        crd_catches=False,
    ),
    Broken(
        "early stopping on a metric not computed",
        _set("spec.earlyStopping", {"metric": "bleu"}),
        "spec.earlyStopping.metric",
        crd_catches=False,
    ),
    Broken(
        "cron with hour 25", _set("spec.retrain.schedule", "0 25 * * *"), "spec.retrain.schedule", crd_catches=False
    ),
]
