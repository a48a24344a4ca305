"""Gradual unfreezing with two processes (gloo, CPU): every unfrozen block is all-reduced.

DDP only all-reduces the parameters that required gradients when it was built; the trainer
wraps the model first and freezes afterwards (``optim.prepare_for_training``). Two processes
started by the trainer's launcher each take half of every global batch; at the end both hold
the same weights, equal to one process trained on the whole global batches. The order the
trainer used before (freeze, then wrap) is run too, to show that this test sees the drift.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness.operator import free_port
from tests.manifests import ROOT

pytestmark = pytest.mark.integration

#: Mirrors FineTuneRecipe's setup and step: parameter groups with layer-wise decay built before
#: anything is frozen, the optimizer and scheduler prepared with the model, the unfreezer called
#: before each step, gradients clipped over the trainable parameters, zero_grad(set_to_none).
WORKER = """
import sys
import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification
from tuneloop.api.spec import Unfreezing
from tuneloop_trainer.optim import GradualUnfreezer, ddp_kwargs_handlers, parameter_groups, prepare_for_training

order, out = sys.argv[1], sys.argv[2]
acc = Accelerator(cpu=True, kwargs_handlers=ddp_kwargs_handlers(order == "trainer"))
torch.manual_seed(0)
config = BertConfig(
    vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
)
model = BertForSequenceClassification(config)
initial = model.bert.embeddings.word_embeddings.weight.detach().clone()
groups = parameter_groups(model, 1e-2, 0.01, 0.8)
optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
unfreezing = Unfreezing(start_layers=1, layers_per_stage=1, every_steps=2)
if order == "trainer":
    model, optimizer, scheduler, unfreezer = prepare_for_training(
        acc, model, optimizer, scheduler, unfreezing=unfreezing, steps_per_epoch=2
    )
else:  # the defect: frozen before DDP is built
    unfreezer = GradualUnfreezer(model, unfreezing, 2)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
rank, world = acc.process_index, acc.num_processes
data = torch.Generator().manual_seed(1)
GLOBAL = 8
for step in range(10):  # stages: top block, 2 blocks, 3 blocks, embeddings too
    ids = torch.randint(1, 64, (GLOBAL, 12), generator=data)
    labels = (ids[:, 0] % 2).long()
    share = GLOBAL // world
    mine = slice(rank * share, (rank + 1) * share)
    unfreezer.on_step(step)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    logits = model(input_ids=ids[mine]).logits
    loss = torch.nn.functional.cross_entropy(logits, labels[mine])
    acc.backward(loss)
    acc.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
state = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
state["__frozen__"] = torch.tensor(len(unfreezer.frozen_names()))
state["__initial_embeddings__"] = initial
torch.save(state, f"{out}/{world}-{rank}.pt")
"""


def run_worker(tmp_path: Path, order: str, processes: int) -> list[dict[str, torch.Tensor]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / order
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    if processes == 1:
        argv = [sys.executable, str(script), order, str(out)]
    else:
        # The trainer's launcher with the flags the operator renders, on one node.
        argv = [
            sys.executable,
            "-m",
            "tuneloop_trainer.launch",
            "--nnodes=1",
            f"--nproc-per-node={processes}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "--max-restarts=0",
            str(script),
            order,
            str(out),
        ]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"{processes}-{r}.pt", weights_only=True) for r in range(processes)]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if not k.startswith("__"))


def test_two_processes_with_unfreezing_keep_identical_weights_equal_to_one_process(tmp_path: Path) -> None:
    rank0, rank1 = run_worker(tmp_path, "trainer", 2)
    (single,) = run_worker(tmp_path, "trainer", 1)
    assert int(rank0["__frozen__"]) == 0 == int(single["__frozen__"])  # every stage was reached
    assert max_difference(rank0, rank1) == 0.0  # the ranks never drift apart
    # The embeddings, unfrozen last, trained too ...
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert not torch.allclose(rank0[embeddings], rank0["__initial_embeddings__"])
    assert max_difference(rank0, single) < 1e-4  # ... exactly as one process on the global batches


def test_the_order_before_the_fix_lets_the_ranks_drift_apart(tmp_path: Path) -> None:
    """Frozen before DDP is built, the blocks unfrozen later are never all-reduced: this
    test's comparison is the one that catches it."""
    rank0, rank1 = run_worker(tmp_path, "frozen-first", 2)
    drifted = {k for k in rank0 if not k.startswith("__") and not torch.equal(rank0[k], rank1[k])}
    # the blocks unfrozen later (and, through the clipping norm, the rest with them)
    assert any("embeddings" in k for k in drifted) and any(".layer.0." in k for k in drifted)
