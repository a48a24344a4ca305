"""How a run trains and where it runs: hyperparameters, early stopping, differential privacy,
the output and checkpoint policy, the S3 connection and the pods' resources."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tuneloop.api.methods import METHOD_TRAITS
from tuneloop.api.spec.data import SecretReference
from tuneloop.api.types import ApiModel, Endpoint, ObjectName, OutputUri, Quantity, Ratio


def _rate(value: float) -> str:
    """``2e-5``, ``2.5e-4``: a learning rate as it is written in a manifest."""
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _default_learning_rates() -> str:
    """The traits table's default learning rates, in words: ``2e-5 full, 1e-4 bottleneck, …``."""
    methods: dict[float, list[str]] = {}
    for name, traits in METHOD_TRAITS.items():
        methods.setdefault(traits.learning_rate, []).append(name)
    return ", ".join(f"{_rate(rate)} {'/'.join(names)}" for rate, names in sorted(methods.items()))


class Hyperparameters(ApiModel):
    """Optimisation settings. The defaults are conservative choices for fine-tuning."""

    # Described from the traits table (tuneloop.api.methods), the defaults' one home.
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=None,
        description=f"Peak learning rate; omit for the method's default ({_default_learning_rates()}).",
    )
    epochs: Annotated[int, Field(gt=0, le=1000)] = 3
    """Passes over the training split."""
    max_steps: Annotated[int, Field(gt=0)] | None = None
    """Stop after this many optimizer steps, even mid-epoch."""
    batch_size: Annotated[int, Field(gt=0, le=65536)] = 16
    """Examples per device per forward pass."""
    gradient_accumulation_steps: Annotated[int, Field(gt=0, le=4096)] = 1
    """Forward passes per optimizer step (effective batch = batchSize × this × devices)."""
    warmup_ratio: Ratio = 0.06
    """Fraction of steps with a linear learning-rate warmup."""
    weight_decay: Ratio = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    dropout: Ratio | None = None
    """Override the model's dropout probabilities."""
    max_seq_length: Annotated[int, Field(ge=8, le=131072)] = 512
    """Longest input in tokens; longer inputs are truncated (or dropped, see
    ``dataset.cleaning.maxTokens``). Capped at what the base model takes: its position
    embeddings (``max_position_embeddings``, ``n_positions`` for GPT-2; two fewer for
    RoBERTa-style models, whose positions start after the padding index), less the virtual
    tokens of ``prefix-tuning`` and ``prompt-tuning``. A larger value is lowered to that limit
    with a warning on the console, in the validation report and in the model card. Models
    with relative positions only (T5) have no such limit."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on GPUs that support it, else fp16 with loss scaling on GPUs, fp32 on CPU."""
    seed: Annotated[int, Field(ge=0)] = 42
    """Seed for initialisation, shuffling and dropout."""
    packing: bool | None = None
    """Pack several examples into one sequence (causal-lm; on by default there), with
    attention kept within each example."""
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0
    """Gradient clipping threshold."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30 % more compute."""


class EarlyStopping(ApiModel):
    """Stop when the validation metric stops improving; the best checkpoint is the result."""

    metric: Annotated[str, Field(min_length=1, max_length=64)] = "eval_loss"
    """A computed metric (``eval_loss`` or one of ``evaluation.metrics``' outputs, e.g. ``f1``, ``rougeL``)."""
    mode: Literal["min", "max"] | None = None
    """Whether lower or higher is better; omit to infer from the metric."""
    patience: Annotated[int, Field(ge=1)] = 2
    """Evaluations without improvement before stopping."""
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0
    """Smallest change that counts as an improvement."""


class Privacy(ApiModel):
    """Differential privacy: train with DP-SGD (Opacus) so that the trained weights are
    (ε, δ)-differentially private with respect to each training row. Each step draws its batch by
    Poisson sampling (every row independently, with probability batchSize / rows rounded to
    Opacus' ``1 / ceil(rows / batchSize)``, so batch sizes vary around ``batchSize``), clips each
    row's gradient to ``maxGradNorm`` and adds Gaussian noise calibrated, by the RDP accountant,
    so that the planned steps spend at most ``targetEpsilon``. The ε actually spent is reported as
    the ``privacy_epsilon`` metric, in the model card and on the console. Offered for methods
    ``full`` and ``lora`` in one process (``resources.gpus`` ≤ 1, ``nodes`` 1), without gradient
    accumulation, packing, gradual unfreezing, class weights, oversampling or augmentation, each of
    which the guarantee does not cover; ``hyperparameters.maxGradNorm`` is not used. Sampling and
    noise are seeded from the operating system, not ``hyperparameters.seed``, so DP runs are not
    reproducible bit for bit. The guarantee covers the weights, not the training-loss curve or the
    data reports, which describe the training rows directly. DP-SGD learns when the noise is small
    beside the signal: start from a pretrained model, train few weights (``lora`` with a small
    ``r`` on few modules, e.g. ``targetModules: [query, value]``), use a large ``batchSize`` (64 or
    more), more epochs and a higher learning rate than without DP; a randomly initialised model
    does not learn under the noise."""

    target_epsilon: Annotated[float, Field(gt=0, le=100)]
    """Privacy budget ε for the whole run (smaller is more private and adds more noise; 1–10 is
    usual). Runs that stop early spend less."""
    delta: Annotated[float, Field(gt=0, lt=1)] | None = None
    """δ of the (ε, δ) guarantee; must be below 1 / training rows (checked when the data is read).
    Omit for 1 / (10 × training rows), rounded down to one significant digit."""
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    """Clipping bound C of each training row's gradient (its L2 norm over all trained weights);
    the noise's standard deviation is proportional to it."""


class CheckpointPolicy(ApiModel):
    """When checkpoints are written (asynchronously, atomically) and how many are kept."""

    every_steps: Annotated[int, Field(gt=0)] | None = None
    """Checkpoint every this many optimizer steps; a kill (even mid-upload) loses at most this
    many. Uploads run in the background, but training never goes more than this many steps past
    the newest fully uploaded checkpoint: it waits for the upload in flight first. Snapshots fall
    on the multiples of this number; when uploads take longer than a step (and a second), each is
    taken early by the last upload's duration (never more than everySteps - 1 steps), so that the
    wait is short."""
    every_minutes: Annotated[float, Field(gt=0.0)] | None = 15.0
    """Checkpoint at least this often: a kill (even mid-upload) loses at most about this much
    training (plus whatever a step or a validation takes beyond the recent steps' mean). Each
    snapshot is taken early by the last upload's duration, and training waits for an upload still
    in flight rather than go past the bound."""
    keep: Annotated[int, Field(ge=1, le=100)] = 3
    """Complete checkpoints kept, besides the best one."""


class Output(ApiModel):
    """Where the run's checkpoints, model, model card and report go."""

    uri: OutputUri
    """Prefix for everything this job writes: ``runs/<n>/…`` and ``promoted.json``. The first
    job to run claims it (``owner.json``: namespace, name, uid); another job pointing at it is
    refused (condition ``Failed``, reason ``OutputOwned``, naming the owner)."""
    continue_lineage: bool = False
    """Set on a re-created job (same namespace and name, new uid: ``kubectl delete`` then
    ``apply``) to take over the output its predecessor owned: its runs are numbered after the
    predecessor's and are compared with the predecessor's promoted model. No checkpoint of the
    predecessor is ever resumed. Without it, such a job is refused (``OutputOwned``)."""
    save: Literal["adapter", "merged"] | None = None
    """For PEFT methods: save the ``adapter`` alone (default), or weights ``merged`` into the
    base model. Full fine-tuning always saves full weights."""
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    """Checkpoint policy."""


class Storage(ApiModel):
    """How to reach S3. Credentials come from the Secret, or from the pod's identity
    (IRSA, workload identity) when no Secret is named."""

    endpoint: Endpoint | None = None
    """S3-compatible endpoint (MinIO, Ceph…); omit for AWS. No credentials in the URL."""
    region: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")] | None = None
    """Region of the bucket."""
    secret_ref: SecretReference | None = None
    """Secret with keys ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (and optionally ``AWS_SESSION_TOKEN``)."""
    checksums: Literal["when-supported", "when-required"] = "when-supported"
    """Send flexible checksums on every upload, or only when required: some S3-compatible
    stores reject the checksums recent AWS SDKs send by default."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """Bucket addressing; many S3-compatible stores need ``path``."""


class Toleration(ApiModel):
    """A Kubernetes toleration for the trainer pods."""

    key: Annotated[str, Field(max_length=316)] | None = None
    """Taint key; omit with ``operator: Exists`` to tolerate everything."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """``Equal`` matches ``value``; ``Exists`` matches any value."""
    value: Annotated[str, Field(max_length=63)] | None = None
    """Taint value for ``Equal``."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; omit for all."""
    toleration_seconds: int | None = None
    """For ``NoExecute``: how long the pod stays bound after the taint appears."""


class Resources(ApiModel):
    """What the trainer pods get and where they run."""

    gpus: Annotated[int, Field(ge=0, le=64)] = 1
    """GPUs per node (``nvidia.com/gpu``); 0 trains on CPU."""
    nodes: Annotated[int, Field(ge=1, le=256)] = 1
    """Nodes; more than one runs an indexed set of pods with torch.distributed."""
    cpu: Quantity | None = None
    """CPU request and limit per pod, e.g. ``8`` or ``7500m``."""
    memory: Quantity | None = None
    """Memory request and limit per pod, e.g. ``64Gi``."""
    node_selector: Annotated[dict[str, str], Field(max_length=64)] = Field(default_factory=dict)
    """Node labels the pods must match."""
    tolerations: Annotated[list[Toleration], Field(max_length=64)] = Field(default_factory=list)
    """Tolerations for tainted (GPU) nodes."""
    priority_class_name: ObjectName | None = None
    """PriorityClass of the pods (preemption order)."""
    image: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")] | None = None
    """Trainer image; omit for the operator's default."""
