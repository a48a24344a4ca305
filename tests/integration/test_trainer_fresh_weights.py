"""A checkpoint that lacks a backbone weight (a tensor renamed or dropped) is not fine-tuned silently:
transformers initialises the weight at random, and the run says so (console, log, model card)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from tests.harness.trainer_jobs import manifest, rows_for, run_recipe, write_jsonl

pytestmark = pytest.mark.integration


def rename_tensor(path, old: str, new: str) -> None:
    """Rename a tensor in a safetensors header, keeping the header's length (same-length names)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + size].decode()
    assert len(old) == len(new) and old in header
    path.write_bytes(raw[:8] + header.replace(old, new, 1).encode() + raw[8 + size :])


def test_a_renamed_backbone_tensor_is_reported_not_silently_reinitialised(tiny_model_dir, tmp_path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("bert"), model)
    (weights,) = model.glob("*.safetensors")
    header = json.loads(weights.read_bytes()[8 : 8 + struct.unpack("<Q", weights.read_bytes()[:8])[0]])
    name = next(k for k in header if k.endswith("attention.self.query.weight"))
    rename_tensor(weights, name, name.replace("query", "querx"))
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text", n=60))
    m = manifest("sequence-classification", model, data, tmp_path / "out", hyperparameters={"epochs": 1})
    run_recipe(m, tmp_path)  # still trains: the weight exists, at random
    card = (tmp_path / "out" / "runs" / "1" / "model-card.md").read_text()
    assert f"lacks 1 weight(s) of the pretrained model, which were initialised at random: {name}" in card


def test_a_checkpoint_without_its_head_is_not_reported(tiny_model_dir, tmp_path) -> None:
    """A base model without a task head is the everyday case: the head is new, nothing to warn of."""
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text", n=60))
    model = tiny_model_dir("bert", base_only=True)
    m = manifest("sequence-classification", model, data, tmp_path / "out", hyperparameters={"epochs": 1})
    run_recipe(m, tmp_path)
    assert "weight(s) of the pretrained model" not in (tmp_path / "out" / "runs" / "1" / "model-card.md").read_text()
