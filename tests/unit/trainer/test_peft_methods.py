"""DoRA, VeRA, LoHa, LoKr and bottleneck adapters on tiny models: each trains (the loss falls),
saves in peft's format, loads back through the trainer's loader to the same outputs, and merges
into the base weights where the method can (bottleneck adapters cannot, and say so)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.manifests import minimal_job
from tuneloop.api import FineTuneJob
from tuneloop.api.methods import METHOD_TRAITS
from tuneloop_trainer.errors import UnsupportedModelError
from tuneloop_trainer.models import load_model, load_trained_model, resolve_model

pytestmark = pytest.mark.unit

#: method label → spec.method
METHODS: dict[str, dict[str, Any]] = {
    "dora": {"type": "lora", "lora": {"r": 4, "useDora": True}},
    "vera": {"type": "vera", "vera": {"r": 32}},
    "loha": {"type": "loha", "loha": {"r": 4}},
    "lokr": {"type": "lokr", "lokr": {"r": 4}},
    "bottleneck": {"type": "bottleneck", "bottleneck": {"reductionFactor": 4, "nonlinearity": "gelu"}},
}
FAMILY = {"causal-lm": "gpt2", "sequence-classification": "bert", "seq2seq": "t5"}
#: LoHa and LoKr adapt Linear and Conv layers only: GPT-2's Conv1D projections are refused
#: (see the last test), so they are tested on the encoder and the encoder-decoder.
CASES = [
    (m, t)
    for m in METHODS
    for t in ("causal-lm", "sequence-classification", "seq2seq")
    if (t == "causal-lm") != (m in ("loha", "lokr")) or t == "sequence-classification"
]
NAMES = ["neg", "pos"]


def spec_for(task: str, model_dir: Path, method: dict[str, Any]) -> Any:
    m = minimal_job(task)
    m["spec"]["model"]["uri"] = f"file://{model_dir}"
    m["spec"]["method"] = method
    return FineTuneJob.from_manifest(m).spec


def batch(task: str) -> dict[str, torch.Tensor]:
    # repeated patterns: each row is learnable within a few steps on a tiny random model
    ids = torch.tensor([[10 + r, 20 + r, 30 + r] * 4 for r in range(4)])
    if task == "sequence-classification":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(("label", "task"), CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_method_trains_saves_reloads_and_merges(tiny_model_dir, tmp_path, label: str, task: str) -> None:
    model_dir = tiny_model_dir(FAMILY[task], base_only=task != "sequence-classification")
    spec = spec_for(task, model_dir, METHODS[label])
    resolved = resolve_model(spec.model, lambda uri, dest: dest, tmp_path)
    names = NAMES if task == "sequence-classification" else None
    loaded = load_model(spec, resolved, label_names=names)
    model = loaded.model
    trainable, total = loaded.parameter_counts()
    assert 0 < trainable < total / 2

    inputs = batch(task)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(25):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses  # nats; the loss at fixed weights is deterministic

    saved = tmp_path / "adapter"
    model.save_pretrained(saved)
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["peft_type"] == {"dora": "LORA", "bottleneck": "LORA"}.get(label, label.upper())
    trained = outputs(model, inputs)

    reloaded = load_trained_model(spec, saved, "file:///adapter", resolved, names)
    assert reloaded.kind == "adapter"
    assert reloaded.method.type == spec.method.type
    torch.testing.assert_close(outputs(reloaded.model, inputs), trained, rtol=0, atol=1e-5)
    # the adapter changed what the model computes (not a no-op that reloads trivially)
    with reloaded.model.disable_adapter():
        assert not torch.allclose(outputs(reloaded.model, inputs), trained, atol=1e-3)

    if METHOD_TRAITS[spec.method.type].merges:
        merged = copy.deepcopy(model).merge_and_unload()
        assert not any(
            "lora_" in n or "hada_" in n or "lokr_" in n or "vera_" in n for n, _ in merged.named_parameters()
        )
        torch.testing.assert_close(outputs(merged, inputs), trained, rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(ValueError, match="cannot be merged"):
            copy.deepcopy(model).merge_and_unload()


def test_bottleneck_defaults_to_the_feed_forward_outputs(tiny_model_dir, tmp_path) -> None:
    model_dir = tiny_model_dir("gpt2", base_only=True)
    spec = spec_for("causal-lm", model_dir, {"type": "bottleneck"})
    loaded = load_model(spec, resolve_model(spec.model, lambda uri, dest: dest, tmp_path))
    wrapped = {
        n.removesuffix(".lora_A.default") for n, _ in loaded.model.named_modules() if n.endswith("lora_A.default")
    }
    layers = loaded.config.n_layer
    assert len(wrapped) == layers
    assert all(n.endswith("mlp.c_proj") for n in wrapped)
    # the up-projection starts at zero: the untrained adapter computes what the base model does
    inputs = batch("causal-lm")
    with loaded.model.disable_adapter():
        base = outputs(loaded.model, inputs)
    torch.testing.assert_close(outputs(loaded.model, inputs), base)


def test_bottleneck_on_an_unknown_architecture_asks_for_target_modules(tmp_path) -> None:
    from tuneloop.api.spec import Method
    from tuneloop_trainer.adapters import peft_config

    with pytest.raises(UnsupportedModelError, match=r"method\.bottleneck\.targetModules"):
        peft_config(Method(type="bottleneck"), None, "some-new-arch")
    config = peft_config(
        Method.model_validate({"type": "bottleneck", "bottleneck": {"targetModules": ["o"]}}), None, "x"
    )
    assert config.target_modules == {"o"}


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_on_conv1d_projections_is_a_clear_error(tiny_model_dir, tmp_path, method: str) -> None:
    spec = spec_for("causal-lm", tiny_model_dir("gpt2", base_only=True), {"type": method})
    with pytest.raises(UnsupportedModelError, match=rf"cannot apply {method} to this decoder model: .*Conv1D"):
        load_model(spec, resolve_model(spec.model, lambda uri, dest: dest, tmp_path))


def test_every_parameter_efficient_method_has_a_peft_config_builder() -> None:
    from tuneloop.api.methods import PEFT_METHODS
    from tuneloop_trainer.adapters import PEFT_CONFIGS

    assert set(PEFT_CONFIGS) == PEFT_METHODS
