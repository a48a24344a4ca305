"""Optimizer parameter groups, discriminative learning rates and gradual unfreezing.

Lower layers of a pretrained transformer hold general features (syntax, word senses);
upper layers hold task-specific ones. Fine-tuning them all at the same rate, from a
randomly initialised head, lets early noisy gradients wreck the general features
("catastrophic forgetting"). Two remedies (Howard & Ruder, 2018, ULMFiT):

* layer-wise learning-rate decay: layer ``k`` of ``L`` gets ``lr × decay^(L − k)``, the
  embeddings the smallest rate, the head the full one;
* gradual unfreezing: train the head and the top layers first, unfreeze one more group per
  stage, embeddings last.

With more than one process, gradual unfreezing needs care: DistributedDataParallel registers
the parameters that require gradients *when it is built* and all-reduces only those. The
model is therefore wrapped with every parameter trainable and frozen afterwards
(:func:`prepare_for_training`), with ``find_unused_parameters=True``
(:func:`ddp_kwargs_handlers`) so that DDP accepts the frozen ones getting no gradient. Frozen
parameters keep ``grad = None`` and AdamW skips them; a block unfrozen later is all-reduced like
any other. The price is a traversal of the autograd graph per step and, while blocks are
frozen, all-reducing their (zero) bucket entries: never more communication than full
fine-tuning. Re-wrapping the model at each stage would avoid that but rebuild DDP's buckets
behind accelerate's back and re-broadcast the weights; unfreezing stages are few and the
communication bounded, so correctness without re-wrapping wins.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tuneloop.api.spec import Unfreezing

log = logging.getLogger(__name__)

_NO_DECAY = re.compile(r"(bias|norm|LayerNorm|layernorm|ln_\w+|\.ln\b|rms)", re.IGNORECASE)


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of transformer blocks (one for encoders and decoders, two for
    encoder-decoders), in the order they appear: lower stacks first."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(True for _ in module[0].parameters()):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue  # a list nested inside a block (attention heads, experts…)
        if sum(1 for _ in module[0].modules()) < 4:
            continue  # not a transformer block: too simple
        found.append((name, module))
    return found


@dataclass
class LayerMap:
    """Each parameter's depth: 0 = embeddings, 1..L = blocks bottom-up, L+1 = head/top."""

    depth: dict[str, int]
    num_layers: int
    block_params: list[list[str]] = field(default_factory=list)
    """Parameter names of each block, bottom-up."""

    @property
    def top(self) -> int:
        return self.num_layers + 1


def layer_map(model: nn.Module) -> LayerMap:
    """Assign every parameter a depth."""
    stacks = block_lists(model)
    prefixes: list[str] = []
    for name, stack in stacks:
        prefixes.extend(f"{name}.{i}." for i in range(len(stack)))
    depth: dict[str, int] = {}
    block_params: list[list[str]] = [[] for _ in prefixes]
    for pname, _ in model.named_parameters():
        for k, prefix in enumerate(prefixes):
            if pname.startswith(prefix):
                depth[pname] = k + 1
                block_params[k].append(pname)
                break
        else:
            depth[pname] = 0 if "embed" in pname or re.search(r"\b(wte|wpe|shared)\b", pname) else len(prefixes) + 1
    return LayerMap(depth=depth, num_layers=len(prefixes), block_params=block_params)


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, layerwise_decay: float | None
) -> list[dict[str, Any]]:
    """AdamW parameter groups: no weight decay on biases and norms; per-depth learning rates.

    Build the groups *before* gradual unfreezing freezes anything: every parameter
    trainable now is included, and AdamW skips those that have no gradient yet.
    """
    layers = layer_map(model) if layerwise_decay is not None else None
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    names: dict[tuple[float, float], list[str]] = {}
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen for good (PEFT base weights)
        decay = 0.0 if param.ndim < 2 or _NO_DECAY.search(pname) else weight_decay
        group_lr = lr
        if layers is not None:
            assert layerwise_decay is not None
            group_lr = lr * layerwise_decay ** (layers.top - layers.depth[pname])
        key = (group_lr, decay)
        groups.setdefault(key, []).append(param)
        names.setdefault(key, []).append(pname)
    return [
        {"params": params, "lr": key[0], "initial_lr": key[0], "weight_decay": key[1], "names": names[key]}
        for key, params in sorted(groups.items(), key=lambda kv: -kv[0][0])
    ]


class GradualUnfreezer:
    """Freezes all but the head and the top ``startLayers`` blocks; each stage unfreezes
    ``layersPerStage`` more, top-down; the embeddings go last."""

    def __init__(self, model: nn.Module, settings: Unfreezing, steps_per_epoch: int) -> None:
        self.model = model
        self.settings = settings
        self.layers = layer_map(model)
        if self.layers.num_layers == 0:
            log.warning("no transformer blocks found; gradual unfreezing has nothing to do")
        self.steps_per_stage = settings.every_steps or max(1, steps_per_epoch)
        self.stage = -1
        self.apply_stage(0)

    def trainable_blocks(self, stage: int) -> int:
        return min(self.layers.num_layers, self.settings.start_layers + stage * self.settings.layers_per_stage)

    def apply_stage(self, stage: int) -> bool:
        """Set ``requires_grad`` for a stage; True when something changed."""
        if stage == self.stage:
            return False
        self.stage = stage
        n_blocks = self.trainable_blocks(stage)
        first_trainable = self.layers.num_layers - n_blocks + 1  # depth of the lowest trainable block
        embeddings_on = n_blocks >= self.layers.num_layers and stage > self._stage_all_blocks()
        for pname, param in self.model.named_parameters():
            d = self.layers.depth[pname]
            param.requires_grad = (d >= first_trainable and d > 0) or (d == 0 and embeddings_on)
        log.info(
            "unfreezing stage %d: top %d of %d blocks trainable%s",
            stage,
            n_blocks,
            self.layers.num_layers,
            ", embeddings too" if embeddings_on else "",
        )
        return True

    def _stage_all_blocks(self) -> int:
        """First stage at which every block is trainable."""
        remaining = max(0, self.layers.num_layers - self.settings.start_layers)
        return -(-remaining // self.settings.layers_per_stage)

    def on_step(self, step: int) -> bool:
        """Call before each optimizer step ``step`` (0-based)."""
        return self.apply_stage(step // self.steps_per_stage)

    def frozen_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if not p.requires_grad]


def ddp_kwargs_handlers(unfreezing: bool) -> list[Any]:
    """accelerate kwargs handlers for the run's ``Accelerator``: with gradual unfreezing, DDP
    must accept parameters that get no gradient (the frozen ones). Ignored by one process."""
    if not unfreezing:
        return []
    from accelerate.utils import DistributedDataParallelKwargs  # noqa: PLC0415

    return [DistributedDataParallelKwargs(find_unused_parameters=True)]


def prepare_for_training(
    accelerator: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    unfreezing: Unfreezing | None,
    steps_per_epoch: int,
) -> tuple[Any, Any, Any, GradualUnfreezer | None]:
    """``accelerator.prepare`` the model, optimizer and scheduler, *then* start gradual
    unfreezing on the unwrapped model: DDP is built while every parameter that will ever train
    requires a gradient, so that each is all-reduced once it is unfrozen (see the module's
    docstring). The accelerator must come with :func:`ddp_kwargs_handlers` ``(True)`` when
    ``unfreezing`` is set."""
    prepared_model, prepared_optimizer, prepared_scheduler = accelerator.prepare(model, optimizer, scheduler)
    unfreezer = (
        GradualUnfreezer(accelerator.unwrap_model(prepared_model), unfreezing, steps_per_epoch)
        if unfreezing is not None
        else None
    )
    return prepared_model, prepared_optimizer, prepared_scheduler, unfreezer


def peak_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The largest learning rate among the optimizer's parameter groups: the head's under
    layer-wise decay (the embeddings get the smallest). The rate shown on the console, in
    Prometheus and in ``learning_rate.png``: the schedule at the rate ``learningRate`` names."""
    rates = [float(g["lr"]) for g in optimizer.param_groups if g.get("params")]
    return max(rates, default=0.0)


def describe_groups(groups: Iterable[dict[str, Any]]) -> list[str]:
    return [f"lr={g['lr']:.3g} wd={g['weight_decay']:g} params={len(g['params'])}" for g in groups]
