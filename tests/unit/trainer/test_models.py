"""The right model class for the task, and clear errors otherwise."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from tests.manifests import minimal_job
from tuneloop.api import FineTuneJob
from tuneloop.contract import ExitCode
from tuneloop_trainer.errors import InvalidConfigError, UnsupportedModelError
from tuneloop_trainer.models import check_fits_task, load_model, model_family, resolve_model

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("family", "expected"), [("bert", "encoder"), ("gpt2", "decoder"), ("t5", "encoder-decoder")])
def test_families(tiny_model_dir, family: str, expected: str) -> None:
    assert model_family(AutoConfig.from_pretrained(tiny_model_dir(family))) == expected


@pytest.mark.parametrize(
    ("family", "task", "words"),
    [
        ("bert", "causal-lm", "encoder model (bert), which does not fit task causal-lm"),
        ("gpt2", "seq2seq", "decoder model (gpt2), which does not fit task seq2seq"),
        ("t5", "causal-lm", "encoder-decoder model (t5)"),
    ],
)
def test_mismatch_says_which_models_fit(tiny_model_dir, family: str, task: str, words: str) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        check_fits_task(AutoConfig.from_pretrained(tiny_model_dir(family)), task, f"file:///{family}")
    assert words in info.value.message
    assert "encoder models (BERT, MiniLM, DeBERTa) fit sequence-classification" in info.value.message
    assert info.value.exit_code == ExitCode.UNSUPPORTED_MODEL


def job(task: str, model_dir, **method) -> FineTuneJob:
    m = minimal_job(task)
    m["spec"]["model"]["uri"] = f"file://{model_dir}"
    m["spec"]["resources"] = {"gpus": 1}
    if method:
        m["spec"]["method"] = method
    return FineTuneJob.from_manifest(m)


def test_missing_directory_is_unsupported_model(tmp_path) -> None:
    spec = job("causal-lm", tmp_path / "nope").spec
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        resolve_model(spec.model, lambda uri, dest: dest, tmp_path)


def test_unknown_hub_model_offline_is_a_clear_error(tmp_path, monkeypatch) -> None:
    m = minimal_job("causal-lm")
    m["spec"]["model"]["uri"] = "hf://no-such-org/no-such-model"
    spec = FineTuneJob.from_manifest(m).spec
    resolved = resolve_model(spec.model, lambda uri, dest: dest, tmp_path)
    with pytest.raises(UnsupportedModelError, match="no-such-org/no-such-model"):
        load_model(spec, resolved)


def test_qlora_without_cuda_is_refused_not_downgraded(tiny_model_dir, tmp_path) -> None:
    spec = job("causal-lm", tiny_model_dir("gpt2"), type="qlora").spec
    resolved = resolve_model(spec.model, lambda uri, dest: dest, tmp_path)
    with pytest.raises(InvalidConfigError, match="needs a CUDA GPU"):
        load_model(spec, resolved)


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix-tuning", "prompt-tuning", "full"])
def test_methods_wrap_the_model(tiny_model_dir, tmp_path, method: str) -> None:
    spec = job("causal-lm", tiny_model_dir("gpt2"), type=method).spec
    resolved = resolve_model(spec.model, lambda uri, dest: dest, tmp_path)
    loaded = load_model(spec, resolved)
    trainable, total = loaded.parameter_counts()
    if method == "full":
        assert trainable == total
    else:
        assert 0 < trainable < total / 2
