"""A whole ``tuneloop run`` with two processes (gloo, CPU) equals one process on the same batches.

The trainer's launcher starts two trainers on one output, as a pod with two GPUs does; each
takes every other batch, so one optimizer step sees two batches. One process with
``gradientAccumulationSteps: 2`` sees the same two batches in each step. The saved models
match only if, with gradual unfreezing on, every block unfrozen later is all-reduced (the
defect of freezing before DDP is built), the learning-rate schedule advances once per step
(accelerate's default advanced it once per process: with two processes the LR reached zero
half-way), and the loss is the mean over the global batch (each rank dividing by its own rows
weighed the length-grouped batcher's short batch as much as a full one).
(test_unfreezing_distributed.py shows the unfreezing property on the step logic alone, and
that the old order drifts.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.harness.operator import free_port
from tests.harness.trainer_jobs import manifest, rows_for, write_jsonl
from tests.manifests import ROOT

pytestmark = pytest.mark.integration


def job(tmp_path: Path, model: Path, name: str, accumulation: int) -> Path:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text", n=80))
    m = manifest(
        "sequence-classification",
        model,
        data,
        tmp_path / name,
        method={
            "type": "full",
            "unfreezing": {"startLayers": 1, "layersPerStage": 1, "everySteps": 2},
            "layerwiseLrDecay": 0.8,
        },
        hyperparameters={
            # One epoch cut at 8 steps: the 2-process run drops an odd last batch, where one
            # process would take a step of one batch; both must plan the same steps (and LR schedule).
            "epochs": 1,
            "maxSteps": 8,
            "batchSize": 4,
            "gradientAccumulationSteps": accumulation,
            "learningRate": 1e-2,
            "dropout": 0.0,
            "maxSeqLength": 24,
            "seed": 3,
        },
        # The baselines and label-issue stage runs on every process; rank 0's findings are used.
        dataset={"labelIssues": "report"},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELOOP_TERMINATION_LOG": os.devnull}
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=400, check=False)


def saved_model(out: Path) -> dict[str, Any]:
    (weights,) = (out / "runs" / "1" / "model").glob("*.safetensors")
    return load_file(weights)


def test_two_process_run_with_unfreezing_equals_one_process_on_the_same_batches(tiny_model_dir, tmp_path) -> None:
    model = tiny_model_dir("bert")
    two = run(
        [
            sys.executable,
            "-m",
            "tuneloop_trainer.launch",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "--max-restarts=0",
            "-m",
            "tuneloop_trainer",
            "run",
            str(job(tmp_path, model, "two", accumulation=1)),
        ]
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([sys.executable, "-m", "tuneloop", "run", str(job(tmp_path, model, "one", accumulation=2))])
    assert one.returncode == 0, one.stderr[-3000:]
    distributed, single = saved_model(tmp_path / "two"), saved_model(tmp_path / "one")
    assert distributed.keys() == single.keys()
    base = load_file(next(model.glob("*.safetensors")))
    embeddings = next(k for k in distributed if k.endswith("embeddings.word_embeddings.weight"))
    # The embeddings, unfrozen last, were trained in both runs ...
    assert not torch.allclose(distributed[embeddings], base[embeddings])
    # ... and every weight equals the one-process run's: each step all-reduced every unfrozen block.
    worst = max(float((distributed[k].float() - single[k].float()).abs().max()) for k in distributed)
    assert worst < 1e-4, worst
