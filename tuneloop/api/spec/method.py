"""How the model's weights are adapted: ``spec.method`` and the settings block of each
method. What sets the methods apart (defaults, which block, what may combine) is the traits
table, :mod:`tuneloop.api.methods`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tuneloop.api.types import ApiModel, Ratio

MethodType = Literal[
    "full", "lora", "qlora", "ia3", "prefix-tuning", "prompt-tuning", "vera", "loha", "lokr", "bottleneck"
]


class LoraConfig(ApiModel):
    """LoRA / QLoRA adapter settings."""

    r: Annotated[int, Field(gt=0, le=1024)] = 8
    """Rank of the update matrices."""
    alpha: Annotated[int, Field(gt=0, le=4096)] = 16
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: Ratio = 0.05
    """Dropout on the adapter input."""
    target_modules: (
        Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=64)] | None
    ) = None
    """Module names to adapt (e.g. ``[q_proj, v_proj]``); omit to pick the attention and
    MLP projections of the architecture automatically."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA, ``lora`` only): each adapted weight is split into a
    magnitude vector and a direction; LoRA updates the direction and the magnitude is trained
    alongside. Often closer to full fine-tuning at low rank, at roughly twice LoRA's step
    time. Merges like LoRA."""


TargetModules = Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=64)]


class VeraConfig(ApiModel):
    """VeRA settings: one pair of frozen random low-rank matrices shared by every adapted
    layer, and two small trained scaling vectors per layer, so far fewer trained parameters
    than LoRA at a much higher rank. The random matrices are saved with the adapter."""

    r: Annotated[int, Field(gt=0, le=4096)] = 256
    """Rank of the shared random matrices (high ranks cost little: they are not trained)."""
    dropout: Ratio = 0.0
    """Dropout on the adapter input."""
    target_modules: TargetModules | None = None
    """Module names to adapt; omit for the architecture's defaults (the attention query and
    value projections)."""


class LycorisConfig(ApiModel):
    """LoHa / LoKr settings: the weight update is a Hadamard product of two low-rank products
    (LoHa) or a Kronecker product of a small matrix and a low-rank one (LoKr), which reach
    a higher effective rank than LoRA for the same trained parameters."""

    r: Annotated[int, Field(gt=0, le=1024)] = 8
    """Rank of the low-rank factors."""
    alpha: Annotated[int, Field(gt=0, le=4096)] = 8
    """Scaling numerator (the update is scaled by alpha / r)."""
    target_modules: TargetModules | None = None
    """Module names to adapt; omit for the architecture's defaults (attention projections)."""


class BottleneckConfig(ApiModel):
    """Bottleneck adapter settings (Houlsby et al. 2019; Pfeiffer et al. 2021): after each
    adapted output projection a small two-layer network (down-projection, nonlinearity,
    up-projection) adds a residual correction to the projection's output. The up-projection
    starts at zero, so training starts from the base model's behaviour. It is non-linear, so
    it cannot be merged into the base weights (``output.save: merged`` is refused)."""

    reduction_factor: Annotated[int, Field(ge=1, le=1024)] = 16
    """Width of the bottleneck as a fraction of the adapted layer's output width: 16 turns a
    768-wide output into a 48-wide bottleneck (at least 1)."""
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Activation between the down- and up-projection."""
    target_modules: TargetModules | None = None
    """Output projections after which an adapter is placed; omit for the feed-forward output
    of every block (BERT-style ``output.dense`` also matches the attention output, which gives
    Houlsby's placement: after attention and after the feed-forward). Add the attention output
    projection (e.g. ``o_proj``, ``c_proj``) for Houlsby's placement on other architectures."""


class Ia3Config(ApiModel):
    """IA3 settings."""

    target_modules: (
        Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=64)] | None
    ) = None
    """Modules whose activations are rescaled; omit for the architecture's defaults."""


class VirtualTokensConfig(ApiModel):
    """Prefix- or prompt-tuning settings."""

    num_virtual_tokens: Annotated[int, Field(gt=0, le=512)] = 20
    """Number of trained virtual tokens."""
    init_text: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    """Prompt tuning only: initialise the virtual tokens from this text's embeddings."""


class Unfreezing(ApiModel):
    """Gradual unfreezing (full fine-tuning): train the top layers first, then one more
    group at a time, so the general features of lower layers are disturbed last."""

    schedule: Literal["gradual"] = "gradual"
    """Unfreezing schedule."""
    start_layers: Annotated[int, Field(ge=1)] = 2
    """Transformer layers (from the top) trainable from the start, besides the head."""
    layers_per_stage: Annotated[int, Field(ge=1)] = 1
    """Layers unfrozen at each stage."""
    every_steps: Annotated[int, Field(gt=0)] | None = None
    """Steps per stage; omit to unfreeze once per epoch."""


class Method(ApiModel):
    """How the model's weights are adapted."""

    type: MethodType = "lora"
    """``full`` fine-tuning, or a parameter-efficient method: ``lora``, ``qlora`` (LoRA on a
    4-bit base; needs a GPU), ``ia3``, ``prefix-tuning``, ``prompt-tuning``, ``vera``,
    ``loha``, ``lokr``, ``bottleneck`` (a Houlsby/Pfeiffer bottleneck adapter, built on peft's
    LoRA layer machinery and saved in peft's format). DoRA is ``lora`` with
    ``lora.useDora: true``."""
    lora: LoraConfig | None = None
    """LoRA settings (``lora``, ``qlora``)."""
    vera: VeraConfig | None = None
    """VeRA settings (``vera``)."""
    loha: LycorisConfig | None = None
    """LoHa settings (``loha``)."""
    lokr: LycorisConfig | None = None
    """LoKr settings (``lokr``)."""
    bottleneck: BottleneckConfig | None = None
    """Bottleneck adapter settings (``bottleneck``)."""
    ia3: Ia3Config | None = None
    """IA3 settings (``ia3``)."""
    prefix_tuning: VirtualTokensConfig | None = None
    """Prefix-tuning settings (``prefix-tuning``)."""
    prompt_tuning: VirtualTokensConfig | None = None
    """Prompt-tuning settings (``prompt-tuning``)."""
    unfreezing: Unfreezing | None = None
    """Gradual unfreezing (``full`` only)."""
    layerwise_lr_decay: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Discriminative learning rates (``full`` only): each layer below the top gets the
    learning rate of the layer above times this factor (e.g. 0.9)."""
