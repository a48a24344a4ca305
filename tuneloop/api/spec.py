"""The FineTuneJob spec: what a user declares.

Field docstrings are the API documentation: they become the CRD's descriptions
(``kubectl explain finetunejob.spec.method``) and ``docs/api.md``. Rules that involve more
than one field are checked in :meth:`FineTuneJobSpec._cross_field_rules`, each reported at
the path of the field to change; the same rules are CEL ``x-kubernetes-validations`` in
the CRD (see :mod:`tuneloop.crd`), so the API server refuses what this module refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final, Literal, Self

from pydantic import Field, model_validator

from tuneloop.api.types import (
    ApiModel,
    ColumnName,
    CronExpression,
    DataUri,
    Duration,
    Endpoint,
    Loc,
    ModelUri,
    ObjectName,
    OutputUri,
    Quantity,
    TimeZone,
    raise_issues,
)

TaskType = Literal["sequence-classification", "causal-lm", "seq2seq"]
MethodType = Literal[
    "full", "lora", "qlora", "ia3", "prefix-tuning", "prompt-tuning", "vera", "loha", "lokr", "bottleneck"
]
MetricName = Literal["accuracy", "f1", "precision", "recall", "rouge", "bleu", "perplexity"]

#: Which metrics each task can compute. F1 and friends need labels; ROUGE and BLEU need
#: generated text; perplexity needs a language-modelling head (a seq2seq model's loss is
#: conditional on the source, so its "perplexity" is not comparable across models).
TASK_METRICS: Final[dict[str, tuple[str, ...]]] = {
    "sequence-classification": ("accuracy", "f1", "precision", "recall"),
    "causal-lm": ("perplexity", "rouge", "bleu"),
    "seq2seq": ("rouge", "bleu"),
}
#: What is computed when ``evaluation.metrics`` is omitted.
DEFAULT_METRICS: Final[dict[str, tuple[str, ...]]] = {
    "sequence-classification": ("accuracy", "f1", "precision", "recall"),
    "causal-lm": ("perplexity",),
    "seq2seq": ("rouge", "bleu"),
}
#: A metric family and the names it reports (what gates and early stopping may name).
METRIC_OUTPUTS: Final[dict[str, tuple[str, ...]]] = {
    "accuracy": ("accuracy",),
    "f1": ("f1",),
    "precision": ("precision",),
    "recall": ("recall",),
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("bleu",),
    "perplexity": ("perplexity",),
}
#: Metric families computed from generated text (one ``generate()`` per example).
GENERATION_METRICS: Final = frozenset({"rouge", "bleu"})
#: Metrics where lower is better; everything else is higher-is-better.
LOWER_IS_BETTER: Final = frozenset(
    {"eval_loss", "perplexity", "ood_eval_loss", "ood_perplexity", "forgetting_increase", "fairness_gap"}
)


@dataclass(frozen=True)
class MethodTraits:
    """What sets one fine-tuning method apart from the others: checks ask a method's traits,
    never its name."""

    learning_rate: float
    """Peak learning rate when ``hyperparameters.learningRate`` is omitted."""
    block: str | None
    """The camelCase field of ``spec.method`` holding the method's settings (None: none)."""
    peft: bool = True
    """An adapter trained on a frozen base model (saved alone unless ``output.save: merged``)."""
    target_modules: bool = False
    """The adapter wraps named modules (``targetModules``; omitted: the architecture's defaults)."""
    merges: bool = False
    """The trained adapter folds into the base weights (``output.save: merged``)."""
    virtual_tokens: bool = False
    """Trained tokens are put before every input (they take positions; no sequence packing)."""
    unfreezing: bool = False
    """Gradual unfreezing and layer-wise learning-rate decay apply (they act on base weights)."""
    needs_gpu: bool = False
    """Needs a CUDA GPU (``resources.gpus >= 1``)."""


#: Every method's traits. Learning rates: small for full fine-tuning (large updates destroy
#: pretrained features), larger for adapters, whose few fresh parameters start from zero or
#: random values; largest for methods that train a handful of scales or tokens.
METHOD_TRAITS: Final[dict[str, MethodTraits]] = {
    "full": MethodTraits(2.0e-5, None, peft=False, unfreezing=True),
    "lora": MethodTraits(2.0e-4, "lora", target_modules=True, merges=True),
    "qlora": MethodTraits(2.0e-4, "lora", target_modules=True, merges=True, needs_gpu=True),
    "ia3": MethodTraits(3.0e-3, "ia3", target_modules=True, merges=True),
    "prefix-tuning": MethodTraits(1.0e-2, "prefixTuning", virtual_tokens=True),
    "prompt-tuning": MethodTraits(3.0e-2, "promptTuning", virtual_tokens=True),
    "vera": MethodTraits(4.0e-3, "vera", target_modules=True, merges=True),
    "loha": MethodTraits(2.0e-4, "loha", target_modules=True, merges=True),
    "lokr": MethodTraits(2.0e-4, "lokr", target_modules=True, merges=True),
    "bottleneck": MethodTraits(1.0e-4, "bottleneck", target_modules=True),
}
PEFT_METHODS: Final = frozenset(name for name, traits in METHOD_TRAITS.items() if traits.peft)
#: Learning rates used when ``hyperparameters.learningRate`` is omitted (see :data:`METHOD_TRAITS`).
DEFAULT_LEARNING_RATES: Final[dict[str, float]] = {name: t.learning_rate for name, t in METHOD_TRAITS.items()}

Ratio = Annotated[float, Field(ge=0.0, lt=1.0)]


class SecretReference(ApiModel):
    """A Secret in the FineTuneJob's namespace. Only its name is ever written in a spec:
    credentials are read from the Secret into the trainer's environment, never copied
    into specs, status, events or logs."""

    name: ObjectName
    """Name of the Secret."""


class ModelSource(ApiModel):
    """The base model to fine-tune."""

    uri: ModelUri
    """``hf://org/name`` (Hugging Face Hub, or its local cache when offline),
    ``s3://bucket/prefix/`` (a directory saved with ``save_pretrained``) or ``file:///dir``.
    A revision may be appended to an ``hf://`` URI as ``@revision``."""
    revision: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._/-]+$")] | None = None
    """Branch, tag or commit of an ``hf://`` model; pin a commit for reproducible runs."""
    secret_ref: SecretReference | None = None
    """Secret with key ``HF_TOKEN`` for gated or private Hugging Face models."""


class DatasetColumns(ApiModel):
    """Which columns (or JSON keys) hold what. Which ones apply depends on ``spec.task``:
    ``text``+``label`` for sequence-classification; ``messages`` (chat), or
    ``prompt``+``completion``, or ``text`` for causal-lm; ``source``+``target`` for seq2seq.
    Omitted columns take their own name (``text``, ``label``, …)."""

    text: ColumnName | None = None
    """Input text (classification) or raw training text (causal-lm)."""
    label: ColumnName | None = None
    """Class label, as an integer id or a string (strings are mapped to ids and recorded)."""
    prompt: ColumnName | None = None
    """Prompt of a prompt/completion pair (causal-lm); the loss ignores its tokens."""
    completion: ColumnName | None = None
    """Completion of a prompt/completion pair (causal-lm); only these tokens are learned."""
    messages: ColumnName | None = None
    """Chat conversation as a list of ``{role, content}`` (causal-lm), rendered with the
    tokenizer's chat template; only assistant turns are learned."""
    source: ColumnName | None = None
    """Input sequence (seq2seq), e.g. the article to summarize."""
    target: ColumnName | None = None
    """Output sequence (seq2seq), e.g. the summary."""


class DatasetSplit(ApiModel):
    """How validation and test sets are made. Rows are assigned by a hash of their content
    and ``seed``, so a row never moves between splits when data is appended — retraining
    on grown data never leaks old test rows into training."""

    validation: Ratio = 0.1
    """Fraction of rows held out for validation (early stopping, model selection)."""
    test: Ratio = 0.1
    """Fraction of rows held out for the final test metrics and promotion gates."""
    seed: Annotated[int, Field(ge=0)] = 42
    """Salt of the split hash; change it only to draw a different split."""
    validation_uri: DataUri | None = None
    """A separate validation set; then ``validation`` is ignored and no validation rows are
    taken from ``dataset.uri``."""
    test_uri: DataUri | None = None
    """A separate test set; then ``test`` is ignored and no test rows are taken from ``dataset.uri``."""


class DataCleaning(ApiModel):
    """Cleaning applied before training; every dropped row is counted, with its reason,
    in the validation report."""

    drop_empty: bool = True
    """Drop rows whose input or output is empty or whitespace."""
    dedupe: Literal["off", "exact", "normalized"] = "normalized"
    """Drop duplicates: ``exact`` text, or ``normalized`` (case, whitespace and punctuation folded)."""
    min_chars: Annotated[int, Field(ge=0)] | None = None
    """Drop rows whose input is shorter than this many characters."""
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    """Drop rows longer than this many tokens instead of truncating them at ``maxSeqLength``."""
    max_row_bytes: Annotated[int, Field(gt=0)] = 1048576
    """Largest row, in bytes, that is read at all (default 1 MiB). A bigger row is dropped
    and counted under the drop reason ``too_large`` in the validation report, with its
    ``file:line`` reference, so one huge row cannot exhaust the trainer's memory or time.
    JSON lines, CSV and TSV are read line by line with a bounded read: the rest of an oversize
    line (or CSV record) is skipped without being kept. Parquet is columnar and JSON-array
    files are parsed whole, so there each row is checked after reading (the bytes of the
    values in the configured columns); prefer JSON lines for very large data."""


class ClassBalance(ApiModel):
    """Class-imbalance policy (sequence-classification only)."""

    max_imbalance_ratio: Annotated[float, Field(ge=1.0)] = 10.0
    """Largest allowed ratio between the most and the least frequent class."""
    strategy: Literal["fail", "class-weights", "oversample"] = "fail"
    """Beyond the ratio: ``fail`` the run, weight the loss by inverse class frequency
    (``class-weights``), or ``oversample`` rare classes in the training split."""


class DataScreening(ApiModel):
    """Screening for personal data before it reaches a model."""

    pii: Literal["mask", "drop", "fail", "off"] = "mask"
    """What to do with rows that contain emails, phone numbers, card numbers (Luhn-checked)
    or IP addresses: replace them with a placeholder, drop the row, fail the run, or nothing."""


class ReplayData(ApiModel):
    """General-domain data mixed into training against catastrophic forgetting."""

    uri: DataUri | None = None
    """General-domain data, in the same column layout as the training data."""
    ratio: Ratio = 0.1
    """Fraction of each training epoch drawn from the replay data."""


AugmentOperation = Literal["swap", "delete", "insert"]
AUGMENT_OPERATIONS: Final[tuple[AugmentOperation, ...]] = ("swap", "delete", "insert")


class Augmentation(ApiModel):
    """Opt-in augmentation of the training split: extra rows made by perturbing the words of
    training inputs. Validation, test, out-of-domain and replay rows are never augmented, and
    the data fingerprint and data profile describe the user's rows only."""

    method: Literal["eda"] = "eda"
    """``eda``: easy data augmentation (Wei and Zou, 2019) without synonyms: each new row is a
    copy of a training row with some of its words swapped, deleted, or repeated at another
    place. Synonym replacement is left out because it needs WordNet, which trainer pods
    cannot download. What is perturbed: the ``text`` (sequence-classification), the
    ``source`` (seq2seq) or the ``prompt`` (causal-lm with prompt/completion); labels,
    targets and completions stay as written."""
    ratio: Annotated[float, Field(gt=0.0, le=16.0)] = 1.0
    """New rows per distinct training row: ``1`` adds one variant of every row, ``0.5`` one
    variant of a seeded half of them, ``2`` two variants of each."""
    strength: Annotated[float, Field(gt=0.0, le=0.5)] = 0.1
    """Share of a row's words each operation changes (at least one word)."""
    operations: Annotated[list[AugmentOperation], Field(min_length=1, max_length=3)] = Field(
        default_factory=lambda: list(AUGMENT_OPERATIONS)
    )
    """Operations to draw from, one per new row: ``swap`` two words, ``delete`` words (never
    all of them), ``insert`` a copy of one of the row's words at another place."""
    seed: Annotated[int, Field(ge=0)] | None = None
    """Seed of the draws; omit to use ``hyperparameters.seed``. Each row's variants depend on
    the seed and the row's content only, so a resumed run trains on the same rows."""


class Dataset(ApiModel):
    """The training data."""

    uri: DataUri
    """A file, or a prefix whose data files are all read (``s3://bucket/reviews/``)."""
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    """File format; ``auto`` goes by file extension."""
    columns: DatasetColumns = Field(default_factory=DatasetColumns)
    """Column mapping for the task."""
    split: DatasetSplit = Field(default_factory=DatasetSplit)
    """Validation and test splits."""
    cleaning: DataCleaning = Field(default_factory=DataCleaning)
    """Cleaning rules."""
    balance: ClassBalance | None = None
    """Class-imbalance policy; omit to only report the label distribution."""
    screening: DataScreening = Field(default_factory=DataScreening)
    """PII screening (on by default: masks)."""
    replay: ReplayData | None = None
    """General-domain replay data against forgetting."""
    label_issues: Literal["off", "report", "drop"] = "off"
    """Label-error detection (sequence-classification only). Before training, a linear probe
    (logistic regression on the frozen base model's mean-pooled features, the same one
    ``evaluation.baselines`` uses; one forward pass over the data) predicts every training row
    out of fold (5 folds, fewer when a class has fewer rows), and Cleanlab's
    ``find_label_issues`` flags the rows whose given label the probe finds unlikely. ``report``
    lists them in the validation report (split index, a PII-masked excerpt of the text, the
    given and the suggested label, the probe's confidence in the given label; at most 50
    rows, plus the total); ``drop`` also removes them from the training split, never from
    validation or test (so the metrics stay comparable). Needs at least 2 rows per class in
    training. Its cost in seconds is in the report."""
    augmentation: Augmentation | None = None
    """Augmentation of the training split (off when omitted); the validation report says how
    many rows it added."""


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


class Hyperparameters(ApiModel):
    """Optimisation settings. The defaults are conservative choices for fine-tuning."""

    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Peak learning rate; omit for the method's default (2e-5 full, 2e-4 LoRA/QLoRA/LoHa/LoKr,
    3e-3 IA3, 4e-3 VeRA, 1e-4 bottleneck, 1e-2 prefix-tuning, 3e-2 prompt-tuning)."""
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


class OutOfDomain(ApiModel):
    """A held-out set from another domain, to check generalisation."""

    uri: DataUri
    """Data in the same column layout as the training data."""


class Forgetting(ApiModel):
    """Catastrophic-forgetting check: general-domain perplexity of the tuned model
    against the base model."""

    uri: DataUri
    """General-domain text."""
    max_increase: Annotated[float, Field(ge=0.0)] = 0.10
    """Largest allowed relative perplexity increase (0.10 = 10 %)."""


class Fairness(ApiModel):
    """Per-group evaluation: the metric for each value of a column, and the largest gap."""

    group_column: ColumnName
    """Column naming each row's group (kept for evaluation, never used as a feature)."""
    metric: Annotated[str, Field(min_length=1, max_length=64)] = "f1"
    """A computed metric to compare across groups."""
    max_gap: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    """Largest allowed difference between the best and the worst group."""


class Evaluation(ApiModel):
    """How a trained model is judged."""

    metrics: Annotated[list[MetricName], Field(min_length=1, max_length=8)] | None = None
    """Metrics to compute; omit for the task's defaults (classification: accuracy, f1,
    precision, recall; causal-lm: perplexity; seq2seq: rouge, bleu). ``rouge`` reports
    ``rouge1``, ``rouge2``, ``rougeL`` and ``rougeLsum``; ``eval_loss`` is always computed."""
    every_steps: Annotated[int, Field(gt=0)] | None = None
    """Evaluate every this many steps; omit to evaluate at the end of each epoch."""
    out_of_domain: OutOfDomain | None = None
    """Out-of-domain evaluation set; its metrics are reported with an ``ood_`` prefix."""
    forgetting: Forgetting | None = None
    """Forgetting check (causal-lm, seq2seq); reported as ``forgetting_increase``."""
    fairness: Fairness | None = None
    """Fairness check per group; reported as ``fairness_gap``."""
    baselines: bool = True
    """Before training, evaluate what is cheap to know, on the split the final metrics use (test,
    else validation), with the same metrics: for sequence-classification the majority class
    (trained-split class frequencies) and a linear probe (logistic regression on the frozen base
    model's mean-pooled features; one forward pass over train and test); for causal-lm and
    seq2seq the untouched base model on that split (its first 128 rows when ROUGE or BLEU are
    computed: generation is one ``generate()`` per row). Reported as ``baseline_<name>_<metric>``
    (``majority``, ``probe``, ``base``) and ``gain_over_baseline``: the selection metric's (``earlyStopping.metric``,
    default ``eval_loss``) gain over the best baseline, in the metric's better direction
    (positive: the fine-tuned model is better). Their cost in seconds is in the report. Set
    false to skip them (``minGainOverBaseline`` then cannot be used)."""
    slices: Annotated[list[ColumnName], Field(max_length=8)] = Field(default_factory=list)
    """Columns to break the test metrics down by (a language, a source, a product line):
    the error analysis (``report/error-analysis.json`` and the model card) reports the
    metrics for each of their values, beside the fairness group column's. Read from the
    test data like the group column, never used as a feature; rows without a value count
    as ``(none)``."""


class Gate(ApiModel):
    """A promotion gate on one metric of the test split. All bounds given must hold."""

    metric: Annotated[str, Field(min_length=1, max_length=64)]
    """A computed metric, e.g. ``f1``, ``rougeL``, ``perplexity``, ``forgetting_increase``."""
    min: float | None = None
    """The metric must be at least this."""
    max: float | None = None
    """The metric must be at most this."""
    min_improvement: float | None = None
    """The metric must beat the promoted model's by at least this much (in the metric's
    better direction); passes when nothing is promoted yet."""
    min_gain_over_baseline: float | None = None
    """The metric must beat the best baseline (``evaluation.baselines``: majority class and
    linear probe for classification, the untouched base model for generation) on the same
    split by at least this much, in the metric's better direction: a run that fine-tunes for
    nothing is not promoted. ``0`` asks only to beat it; the metric must be one the baselines
    compute (``eval_loss`` or an ``evaluation.metrics`` output, not ``ood_*``, ``fairness_gap``
    or ``forgetting_increase``)."""


class Promotion(ApiModel):
    """When a new model replaces the promoted one."""

    gates: Annotated[list[Gate], Field(max_length=16)] = Field(default_factory=list)
    """Every gate must pass."""
    require_approval: bool = False
    """Human in the loop: a run that passes its gates waits (``AwaitingApproval``) for the
    annotation ``tuneloop.dev/approve=<run number>`` (promote) or ``tuneloop.dev/reject=<run
    number>`` (close it). Changing it never starts a run."""
    pin: Annotated[int, Field(ge=1)] | None = None
    """Roll back (or forward): promote this run's model (it must still exist) and keep it
    promoted while set; new runs train and are evaluated but are not promoted. Setting or
    removing it never starts a run; once removed, the next run that passes is promoted."""


class CheckpointPolicy(ApiModel):
    """When checkpoints are written (asynchronously, atomically) and how many are kept."""

    every_steps: Annotated[int, Field(gt=0)] | None = None
    """Checkpoint every this many optimizer steps."""
    every_minutes: Annotated[float, Field(gt=0.0)] | None = 15.0
    """Checkpoint at least this often (bounds the work lost to a preemption)."""
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


class NewDataTrigger(ApiModel):
    """Retrain when enough new rows land under ``dataset.uri``."""

    enabled: bool = True
    """Watch for new data."""
    min_new_samples: Annotated[int, Field(ge=1)] = 500
    """New rows needed to start a run: rows of the objects added or changed under
    ``dataset.uri`` since the listing the last run trained on (unchanged objects are never
    downloaded or counted again)."""
    poll_interval: Duration = "5m"
    """How often the data prefix is listed (spread over the interval, so that many jobs do not
    list at the same moment)."""
    settle_period: Duration = "2m"
    """The listing must stay unchanged this long before new rows are counted and a run starts:
    a burst of uploads becomes one run."""


class PrometheusDrift(ApiModel):
    """A PromQL query whose value signals drift."""

    url: Endpoint
    """Prometheus base URL, e.g. ``http://prometheus.monitoring:9090``."""
    query: Annotated[str, Field(min_length=1, max_length=4096)]
    """PromQL returning one number, e.g. a drift score or a live accuracy."""
    threshold: float
    """Drift when the value crosses this. The query must return one number (a scalar, or a
    vector of exactly one sample); anything else is reported in the status, never a run."""
    direction: Literal["above", "below"] = "above"
    """Drift when the value is ``above`` (a drift score) or ``below`` (a live accuracy) the threshold."""
    for_: Annotated[Duration, Field(alias="for")] = "10m"
    """How long the condition must hold, in every query, before a run starts (one value on the
    other side of the threshold starts the wait again)."""
    poll_interval: Duration = "1m"
    """How often the query runs."""


class DriftTrigger(ApiModel):
    """Retrain when monitoring reports drift."""

    prometheus: PrometheusDrift
    """Prometheus query."""


class Retrain(ApiModel):
    """When Tuneloop starts a new run by itself. Every run is evaluated and promoted only
    if it passes ``promotion``."""

    on_spec_change: bool = True
    """A new ``metadata.generation`` (a GitOps sync, a ``kubectl apply``) whose training-relevant
    spec differs starts a new run (see ``concurrencyPolicy`` while one is active)."""
    on_new_data: NewDataTrigger | None = None
    """Retrain when enough new rows land under ``dataset.uri`` (trigger ``NewData``)."""
    on_drift: DriftTrigger | None = None
    """Retrain when a Prometheus query reports drift (trigger ``Drift``)."""
    schedule: CronExpression | None = None
    """Retrain on a cron schedule, e.g. ``0 3 * * 0`` (in ``timeZone``, UTC by default)."""
    time_zone: TimeZone | None = None
    """IANA time zone of ``schedule``, e.g. ``Europe/Berlin`` (as a CronJob's ``timeZone``)."""
    starting_deadline: Duration = "1h"
    """A scheduled start missed by more than this (the operator was down) is skipped, not run
    late; of several missed starts at most the latest runs."""
    cooldown: Duration = "1h"
    """Least time between the starts of two automatic runs (new data, drift, schedule).
    Triggers that arrive sooner, or while a run is active, are coalesced into one follow-up run
    that starts when the cooldown ends; a spec change or a manual request is not held back."""
    concurrency_policy: Literal["Queue", "Replace"] = "Queue"
    """What a spec change does while a run is active: ``Queue`` trains the new spec in the next
    run, after the active one ends; ``Replace`` stops the active run (its pods are deleted,
    checkpoints kept) and starts the new spec at once."""


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


class FineTuneJobSpec(ApiModel):
    """The desired state: what to fine-tune, on what, how, and what counts as good."""

    task: TaskType
    """``sequence-classification`` (encoder models), ``causal-lm`` (decoders: generation,
    chat) or ``seq2seq`` (encoder-decoders: summarization, translation). Immutable."""
    model: ModelSource
    """The base model."""
    dataset: Dataset
    """The training data."""
    method: Method = Field(default_factory=Method)
    """How weights are adapted (default: LoRA)."""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    """Optimisation settings."""
    early_stopping: EarlyStopping | None = None
    """Early stopping; omit to train all epochs (the best checkpoint is still kept)."""
    evaluation: Evaluation = Field(default_factory=Evaluation)
    """Evaluation."""
    promotion: Promotion = Field(default_factory=Promotion)
    """Promotion gates."""
    privacy: Privacy | None = None
    """Differential privacy (DP-SGD); omit to train without it."""
    output: Output
    """Where results go."""
    storage: Storage = Field(default_factory=Storage)
    """S3 connection settings."""
    resources: Resources = Field(default_factory=Resources)
    """Pod resources and placement."""
    retrain: Retrain = Field(default_factory=Retrain)
    """Automatic retraining."""
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Retries of a run after retryable failures (preemptions do not count)."""
    active_deadline_seconds: Annotated[int, Field(gt=0)] | None = None
    """Fail a run that has been active longer than this (suspended time excluded)."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete a finished run's pods and ConfigMaps after this long; checkpoints and models stay."""
    suspend: bool = False
    """Suspend: pods are deleted, checkpoints kept; unsuspending resumes from the last checkpoint."""

    # --- derived views (not fields) -------------------------------------------------

    def metric_families(self) -> tuple[str, ...]:
        """The metric families evaluated for this spec."""
        if self.evaluation.metrics is not None:
            return tuple(m for m in dict.fromkeys(self.evaluation.metrics) if m in TASK_METRICS[self.task])
        return DEFAULT_METRICS[self.task]

    def computed_metrics(self) -> frozenset[str]:
        """Every metric name this spec produces: what gates and early stopping may name."""
        base = {"eval_loss"}
        for family in self.metric_families():
            base.update(METRIC_OUTPUTS[family])
        names = set(base)
        if self.evaluation.out_of_domain is not None:
            names.update(f"ood_{m}" for m in base)
        if self.evaluation.forgetting is not None:
            names.add("forgetting_increase")
        if self.evaluation.fairness is not None:
            names.add("fairness_gap")
        return frozenset(names)

    def baseline_metrics(self) -> frozenset[str]:
        """The metric names the baselines report (each as ``baseline_<name>_<metric>``)."""
        names = {"eval_loss"}
        for family in self.metric_families():
            names.update(METRIC_OUTPUTS[family])
        return frozenset(names)

    def learning_rate(self) -> float:
        """The peak learning rate: the given one, or the method's default."""
        return self.hyperparameters.learning_rate or DEFAULT_LEARNING_RATES[self.method.type]

    def packing(self) -> bool:
        """Whether sequences are packed (causal-lm only, on by default there, off with privacy)."""
        if self.task != "causal-lm" or self.privacy is not None:
            return False
        return self.hyperparameters.packing is not False

    def save_format(self) -> Literal["adapter", "merged", "full"]:
        """What ``runs/<n>/model/`` holds."""
        if self.method.type == "full":
            return "full"
        return self.output.save or "adapter"

    def columns(self) -> dict[str, str]:
        """The effective column mapping for the task (role → column name)."""
        given = {k: v for k, v in self.dataset.columns.model_dump().items() if v is not None}
        if self.task == "sequence-classification":
            return {"text": given.get("text", "text"), "label": given.get("label", "label")}
        if self.task == "seq2seq":
            return {"source": given.get("source", "source"), "target": given.get("target", "target")}
        if "messages" in given:
            return {"messages": given["messages"]}
        if "prompt" in given or "completion" in given:
            return {
                "prompt": given.get("prompt", "prompt"),
                "completion": given.get("completion", "completion"),
            }
        return {"text": given.get("text", "text")}

    # --- cross-field rules ------------------------------------------------------------

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Self:
        raise_issues("FineTuneJobSpec", list(_spec_issues(self)), self)
        return self


_TASK_COLUMNS: Final[dict[str, frozenset[str]]] = {
    "sequence-classification": frozenset({"text", "label"}),
    "causal-lm": frozenset({"text", "prompt", "completion", "messages"}),
    "seq2seq": frozenset({"source", "target"}),
}
_METHOD_BLOCKS: Final[dict[str, tuple[str, frozenset[str]]]] = {
    # block (snake_case attribute, camelCase field) → methods it belongs to
    "".join(f"_{c.lower()}" if c.isupper() else c for c in field): (
        field,
        frozenset(name for name, traits in METHOD_TRAITS.items() if traits.block == field),
    )
    for field in dict.fromkeys(t.block for t in METHOD_TRAITS.values() if t.block is not None)
}


def _spec_issues(spec: FineTuneJobSpec) -> list[tuple[Loc, str]]:
    """Every cross-field rule, as (path under spec, message). Order: as a reader goes."""
    issues: list[tuple[Loc, str]] = []
    task = spec.task

    # dataset.columns fit the task
    allowed = _TASK_COLUMNS[task]
    cols = spec.dataset.columns
    for role, value in cols.model_dump().items():
        if value is not None and role not in allowed:
            issues.append(
                (
                    ("dataset", "columns", role),
                    f"column {role!r} is not used by task {task}; this task reads {', '.join(sorted(allowed))}",
                )
            )
    if task == "causal-lm":
        styles = [
            s
            for s, on in (
                ("messages", cols.messages),
                ("prompt/completion", cols.prompt or cols.completion),
                ("text", cols.text),
            )
            if on
        ]
        if len(styles) > 1:
            issues.append(
                (
                    ("dataset", "columns"),
                    f"set one causal-lm layout, not {' and '.join(styles)}: chat 'messages', "
                    "or 'prompt' with 'completion', or plain 'text'",
                )
            )
        if (cols.prompt is None) != (cols.completion is None):
            missing = "completion" if cols.completion is None else "prompt"
            issues.append(
                (
                    ("dataset", "columns", missing),
                    f"'prompt' and 'completion' go together; set {missing!r} too",
                )
            )

    split = spec.dataset.split
    taken = (split.validation if split.validation_uri is None else 0.0) + (
        split.test if split.test_uri is None else 0.0
    )
    if taken >= 1.0:
        issues.append(
            (
                ("dataset", "split"),
                f"validation + test take {taken:g} of the data; leave some for training (< 1)",
            )
        )

    if spec.dataset.balance is not None and task != "sequence-classification":
        issues.append(
            (
                ("dataset", "balance"),
                f"class balance applies to sequence-classification only, not {task}; remove it",
            )
        )
    replay = spec.dataset.replay
    if replay is not None and replay.uri is None and replay.ratio > 0:
        issues.append(
            (("dataset", "replay", "uri"), "replay.ratio needs replay.uri: the general-domain data to mix in")
        )
    if spec.dataset.augmentation is not None and task == "causal-lm" and cols.prompt is None:
        issues.append(
            (
                ("dataset", "augmentation"),
                "causal-lm learns to write its text, so perturbed words would be learnt as they are: augmentation "
                "applies to the prompt of a prompt/completion layout only; set dataset.columns.prompt and "
                "completion, or remove augmentation",
            )
        )

    # method
    method = spec.method
    for attr, (field, methods) in _METHOD_BLOCKS.items():
        if getattr(method, attr) is not None and method.type not in methods:
            issues.append(
                (
                    ("method", field),
                    f"{field} settings apply to method {' or '.join(sorted(methods))}, but method.type is "
                    f"{method.type}; remove the block or change the type",
                )
            )
    traits = METHOD_TRAITS[method.type]
    if not traits.unfreezing:
        if method.unfreezing is not None:
            issues.append(
                (
                    ("method", "unfreezing"),
                    f"gradual unfreezing applies to full fine-tuning only (method.type is {method.type}); "
                    "set method.type: full or remove it",
                )
            )
        if method.layerwise_lr_decay is not None:
            issues.append(
                (
                    ("method", "layerwiseLrDecay"),
                    f"layer-wise learning-rate decay applies to full fine-tuning only (method.type is "
                    f"{method.type}); set method.type: full or remove it",
                )
            )
    if traits.needs_gpu and spec.resources.gpus < 1:
        issues.append(
            (
                ("resources", "gpus"),
                "qlora loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU; "
                "set resources.gpus >= 1 or use method.type: lora",
            )
        )
    if not traits.peft and spec.output.save is not None:
        issues.append(
            (
                ("output", "save"),
                "full fine-tuning saves full weights; output.save applies to PEFT methods only",
            )
        )
    if traits.peft and not traits.merges and spec.output.save == "merged":
        issues.append(
            (
                ("output", "save"),
                f"{method.type} cannot be merged into the base weights (no weight update to add: "
                f"{'its trained tokens are inputs' if traits.virtual_tokens else 'the adapter is non-linear'}); "
                "use output.save: adapter",
            )
        )
    if method.type == "qlora" and method.lora is not None and method.lora.use_dora:
        issues.append(
            (
                ("method", "lora", "useDora"),
                "useDora applies to method lora only (DoRA on a 4-bit qlora base is not offered); "
                "use method.type: lora",
            )
        )
    if method.prefix_tuning is not None and method.prefix_tuning.init_text is not None:
        issues.append((("method", "prefixTuning", "initText"), "initText applies to prompt-tuning only; remove it"))

    if spec.hyperparameters.packing and task != "causal-lm":
        issues.append(
            (
                ("hyperparameters", "packing"),
                f"packing applies to causal-lm only; {task} batches are padded dynamically instead",
            )
        )

    issues.extend(_privacy_issues(spec))

    # evaluation
    evaluation = spec.evaluation
    fits = TASK_METRICS[task]
    misfits = [m for m in evaluation.metrics or () if m not in fits]
    if misfits:
        issues.append(
            (
                ("evaluation", "metrics"),
                f"{', '.join(misfits)} cannot be computed for task {task}; use {', '.join(fits)}",
            )
        )
    if evaluation.forgetting is not None and task == "sequence-classification":
        issues.append(
            (
                ("evaluation", "forgetting"),
                "the forgetting check compares general-domain perplexity, which a classification head "
                "does not have; use it with causal-lm or seq2seq, or evaluate outOfDomain instead",
            )
        )
    roles = spec.columns()
    seen: set[str] = set()
    for i, column in enumerate(evaluation.slices):
        if column in seen:
            issues.append((("evaluation", "slices", i), f"slice column {column!r} is listed twice"))
        seen.add(column)
        if column in roles.values():
            issues.append(
                (
                    ("evaluation", "slices", i),
                    f"slice column {column!r} is the task's {next(r for r, c in roles.items() if c == column)} "
                    "column; slices name another column of the data (a language, a source)",
                )
            )
    computed = spec.computed_metrics()
    known = ", ".join(sorted(computed))
    base = spec.baseline_metrics()
    if spec.dataset.label_issues != "off" and task != "sequence-classification":
        issues.append(
            (
                ("dataset", "labelIssues"),
                f"label-error detection needs class labels (sequence-classification), not {task}; remove it",
            )
        )
    if evaluation.fairness is not None and evaluation.fairness.metric not in computed - {"fairness_gap"}:
        issues.append(
            (
                ("evaluation", "fairness", "metric"),
                f"metric {evaluation.fairness.metric!r} is not computed; use one of {known}",
            )
        )
    if spec.early_stopping is not None and spec.early_stopping.metric not in computed:
        issues.append(
            (
                ("earlyStopping", "metric"),
                f"metric {spec.early_stopping.metric!r} is not computed; use one of {known}",
            )
        )
    for i, gate in enumerate(spec.promotion.gates):
        if gate.metric not in computed:
            issues.append(
                (
                    ("promotion", "gates", i, "metric"),
                    f"gate metric {gate.metric!r} is not computed by this job; use one of {known} "
                    "(or add its family to evaluation.metrics)",
                )
            )
        if (
            gate.min is None
            and gate.max is None
            and gate.min_improvement is None
            and gate.min_gain_over_baseline is None
        ):
            issues.append(
                (
                    ("promotion", "gates", i),
                    "a gate needs at least one of min, max, minImprovement or minGainOverBaseline",
                )
            )
        if gate.min_gain_over_baseline is not None:
            if not evaluation.baselines:
                issues.append(
                    (
                        ("promotion", "gates", i, "minGainOverBaseline"),
                        "needs the baselines it compares with; remove evaluation.baselines: false",
                    )
                )
            elif gate.metric in computed and gate.metric not in base:
                issues.append(
                    (
                        ("promotion", "gates", i, "minGainOverBaseline"),
                        f"the baselines do not compute {gate.metric}; use one of {', '.join(sorted(base))}",
                    )
                )
        if gate.min is not None and gate.max is not None and gate.min > gate.max:
            issues.append((("promotion", "gates", i, "min"), f"min {gate.min:g} is above max {gate.max:g}"))

    return issues


def metric_direction(metric: str) -> Literal["min", "max"]:
    """Whether lower (``min``) or higher (``max``) is better for a metric name."""
    return "min" if metric in LOWER_IS_BETTER else "max"


def _privacy_issues(spec: FineTuneJobSpec) -> list[tuple[Loc, str]]:
    """What DP-SGD's guarantee does not cover, refused by the field that asks for it."""
    if spec.privacy is None:
        return []
    hp, method, dataset = spec.hyperparameters, spec.method, spec.dataset
    why = "spec.privacy cannot be guaranteed with "
    issues: list[tuple[Loc, str]] = []
    if method.type not in ("full", "lora"):
        issues.append(
            (
                ("method", "type"),
                why + f"method {method.type}: DP-SGD is offered for full and lora, whose per-example gradients "
                "Opacus computes and the trainer tests (qlora's 4-bit layers and the virtual-token methods are not "
                "covered); use method.type: lora",
            )
        )
    if hp.gradient_accumulation_steps > 1:
        issues.append(
            (
                ("hyperparameters", "gradientAccumulationSteps"),
                why + "gradient accumulation: each step's batch is one Poisson draw of expected size batchSize, "
                "noised once; raise hyperparameters.batchSize instead and set gradientAccumulationSteps: 1",
            )
        )
    if hp.packing:
        issues.append(
            (
                ("hyperparameters", "packing"),
                why + "packing: a packed row mixes several training rows, so its gradient is not one row's; "
                "remove packing (it is off by default with privacy)",
            )
        )
    if spec.resources.gpus > 1 or spec.resources.nodes > 1:
        issues.append(
            (
                ("resources", "gpus" if spec.resources.gpus > 1 else "nodes"),
                why + "more than one process: the trainer runs DP-SGD in one process (Poisson sampling and noise "
                "are drawn once per step); set resources.gpus ≤ 1 and nodes: 1",
            )
        )
    if method.unfreezing is not None:
        issues.append(
            (
                ("method", "unfreezing"),
                why + "gradual unfreezing: the DP optimizer clips and noises a fixed set of weights from the first "
                "step; remove unfreezing",
            )
        )
    if dataset.balance is not None and dataset.balance.strategy in ("class-weights", "oversample"):
        issues.append(
            (
                ("dataset", "balance", "strategy"),
                why
                + f"{dataset.balance.strategy}: "
                + (
                    "weights computed from the training labels make each row's loss depend on the other rows"
                    if dataset.balance.strategy == "class-weights"
                    else "a repeated row is one person counted several times"
                )
                + "; use strategy: fail",
            )
        )
    if dataset.label_issues == "drop":
        issues.append(
            (
                ("dataset", "labelIssues"),
                why + "labelIssues: drop: which rows are dropped depends on a model fitted to all training rows; "
                "use labelIssues: report",
            )
        )
    if dataset.augmentation is not None:
        issues.append(
            (
                ("dataset", "augmentation"),
                why + "augmentation: rows made from a training row carry it several times into training; "
                "remove augmentation",
            )
        )
    return issues
