"""spec.privacy through the trainer: DP-SGD runs learn, the ε they report is the accountant's for
the steps taken, and what the guarantee does not cover is refused with exit code 10."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.harness.trainer_jobs import run_job, run_recipe, tiny_job
from tuneloop.contract import ExitCode

pytestmark = pytest.mark.integration

ROWS = 200
BATCH = 8


def independent_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of the subsampled Gaussian mechanism from Opacus' RDP analysis functions directly (not
    through the accountant class the trainer uses)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise, steps=steps, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def classification(tmp_path: Path, tiny_model_dir, **spec) -> dict:
    return tiny_job(
        "sequence-classification",
        tiny_model_dir("bert"),
        tmp_path,
        n=ROWS,
        method={"type": "full"},
        **{
            **spec,
            "hyperparameters": {
                "epochs": 2,
                "learningRate": 3e-3,
                "batchSize": BATCH,
                **spec.get("hyperparameters", {}),
            },
        },
    )


def card_privacy(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "runs" / "1" / "model-card.json").read_text())["privacy"]


def test_reported_epsilon_is_the_accountants_for_the_steps_taken(tiny_model_dir, tmp_path) -> None:
    result = run_recipe(classification(tmp_path, tiny_model_dir, privacy={"targetEpsilon": 8}), tmp_path)
    privacy = card_privacy(tmp_path)
    steps_per_epoch = math.ceil(privacy["trainRows"] / BATCH)
    assert privacy["sampleRate"] == pytest.approx(1 / steps_per_epoch)
    assert privacy["steps"] == result.steps == 2 * steps_per_epoch
    assert privacy["delta"] < 1 / privacy["trainRows"]
    assert privacy["noiseMultiplier"] > 0

    expected = independent_epsilon(privacy["noiseMultiplier"], privacy["sampleRate"], result.steps, privacy["delta"])
    assert result.metrics["privacy_epsilon"] == pytest.approx(expected, rel=1e-3)
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-3)
    # The noise was calibrated for exactly these steps: the budget is used, not exceeded.
    assert 8 * 0.97 <= expected <= 8.0

    md = (tmp_path / "out" / "runs" / "1" / "model-card.md").read_text()
    assert "## Differential privacy" in md


@pytest.mark.slow
def test_dp_run_on_a_pretrained_encoder_learns_the_signal(tmp_path) -> None:
    """DP-SGD needs a model that already knows the language, a large batch and many steps: a
    randomly initialised model drowns in the noise (see the trainer README). LoRA on
    all-MiniLM-L6-v2, batch 64, 8 epochs: about 30 s on 2 CPU cores."""
    from tuneloop_trainer.example import minilm_path

    m = tiny_job(
        "sequence-classification",
        minilm_path(),
        tmp_path,
        n=600,
        method={"type": "lora", "lora": {"r": 4}},
        hyperparameters={"epochs": 8, "learningRate": 1e-2, "batchSize": 64, "maxSeqLength": 48},
        privacy={"targetEpsilon": 8, "maxGradNorm": 1.0},
    )
    result = run_recipe(m, tmp_path)
    # "good"/"bad" decides the label; chance is 0.5. Noise and clipping cost some accuracy, not all.
    assert result.metrics["accuracy"] >= 0.75, result.metrics
    assert 0 < result.metrics["privacy_epsilon"] <= 8


def test_early_stopping_spends_less_than_the_target(tiny_model_dir, tmp_path) -> None:
    # Far too high a learning rate: validation loss climbs and the run stops long before its plan.
    m = classification(
        tmp_path,
        tiny_model_dir,
        privacy={"targetEpsilon": 4},
        hyperparameters={"epochs": 30, "learningRate": 5e-2},
        earlyStopping={"metric": "eval_loss", "patience": 1, "minDelta": 0.0},
    )
    result = run_recipe(m, tmp_path)
    assert result.stopped_early
    privacy = card_privacy(tmp_path)
    planned = 30 * math.ceil(privacy["trainRows"] / BATCH)
    assert privacy["steps"] == result.steps < planned
    eps = result.metrics["privacy_epsilon"]
    assert 0 < eps < 4
    assert eps == pytest.approx(
        independent_epsilon(privacy["noiseMultiplier"], privacy["sampleRate"], result.steps, privacy["delta"]), rel=1e-3
    )
    # The noise was calibrated for the whole plan: the planned steps would have spent the target.
    planned_eps = independent_epsilon(privacy["noiseMultiplier"], privacy["sampleRate"], planned, privacy["delta"])
    assert 4 * 0.97 <= planned_eps <= 4.0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dp_trains_decoders_with_lora_and_full_fine_tuning(tiny_model_dir, tmp_path, method: str) -> None:
    m = tiny_job(
        "causal-lm",
        tiny_model_dir("gpt2", base_only=True),
        tmp_path,
        "prompt",
        n=60,
        method={"type": method},
        hyperparameters={"epochs": 1},
        privacy={"targetEpsilon": 3},
    )
    result = run_recipe(m, tmp_path)
    assert math.isfinite(result.metrics["eval_loss"])
    privacy = card_privacy(tmp_path)
    assert result.steps == privacy["steps"] > 0
    assert 0 < result.metrics["privacy_epsilon"] <= 3
    assert result.metrics["privacy_epsilon"] == pytest.approx(
        independent_epsilon(privacy["noiseMultiplier"], privacy["sampleRate"], result.steps, privacy["delta"]), rel=1e-3
    )


def test_delta_not_below_one_over_rows_exits_10_naming_the_field(tiny_model_dir, tmp_path) -> None:
    m = classification(tmp_path, tiny_model_dir, privacy={"targetEpsilon": 8, "delta": 0.01})
    result = run_job(m, tmp_path)
    assert result.returncode == ExitCode.INVALID_CONFIG, result.stderr
    assert "spec.privacy.delta 0.01 is not below 1/" in result.stderr
    assert "Traceback" not in result.stderr


def test_refused_combination_exits_10_before_training(tmp_path, tiny_model_dir) -> None:
    m = classification(
        tmp_path, tiny_model_dir, privacy={"targetEpsilon": 8}, hyperparameters={"gradientAccumulationSteps": 2}
    )
    result = run_job(m, tmp_path)
    assert result.returncode == ExitCode.INVALID_CONFIG, result.stderr
    assert "spec.hyperparameters.gradientAccumulationSteps" in result.stderr
    assert not (tmp_path / "out" / "runs").exists()
