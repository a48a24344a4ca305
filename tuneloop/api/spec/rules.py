"""The spec's cross-field rules: a table of small named rules (:data:`RULES`).

Each rule finds its issues as (path under ``spec``, message), reported at the path of the field
to change. A rule whose ``cel`` is true has one or more twins among the CRD's CEL rules
(:data:`tuneloop.cel.CEL_RULES`, each naming its twin), so the API server refuses what the models
refuse; a unit test checks that every such rule has a twin and every twin a rule. The others need
the derived metric catalogue or cover DP-SGD's guarantee, and are checked by ``tuneloop
validate`` and the operator only. Issues are reported in table order: as a reader goes through
the spec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from tuneloop.api.methods import METHOD_TRAITS
from tuneloop.api.spec.evaluation import TASK_METRICS
from tuneloop.api.types import Loc

if TYPE_CHECKING:
    from tuneloop.api.spec.evaluation import Gate
    from tuneloop.api.spec.job import FineTuneJobSpec

Issue = tuple[Loc, str]
"""A path under ``spec`` and what to change there."""
Issues = Iterator[Issue]


@dataclass(frozen=True)
class Rule:
    """One cross-field rule."""

    name: str
    """What must hold, in a few words; the CEL twins in the CRD name the rule by it."""
    find: Callable[[FineTuneJobSpec], Issues]
    """The issues of a spec (none when the rule holds)."""
    cel: bool = True
    """Whether the CRD has CEL twins of this rule (the API server checks it too)."""


# --- data ----------------------------------------------------------------------------------

_TASK_COLUMNS: Final[dict[str, frozenset[str]]] = {
    "sequence-classification": frozenset({"text", "label"}),
    "causal-lm": frozenset({"text", "prompt", "completion", "messages"}),
    "seq2seq": frozenset({"source", "target"}),
}


def _columns_fit_task(spec: FineTuneJobSpec) -> Issues:
    allowed = _TASK_COLUMNS[spec.task]
    for role, value in spec.dataset.columns.model_dump().items():
        if value is not None and role not in allowed:
            yield (
                ("dataset", "columns", role),
                f"column {role!r} is not used by task {spec.task}; this task reads {', '.join(sorted(allowed))}",
            )


def _one_causal_lm_layout(spec: FineTuneJobSpec) -> Issues:
    cols = spec.dataset.columns
    if spec.task != "causal-lm":
        return
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
        yield (
            ("dataset", "columns"),
            f"set one causal-lm layout, not {' and '.join(styles)}: chat 'messages', "
            "or 'prompt' with 'completion', or plain 'text'",
        )


def _prompt_with_completion(spec: FineTuneJobSpec) -> Issues:
    cols = spec.dataset.columns
    if spec.task == "causal-lm" and (cols.prompt is None) != (cols.completion is None):
        missing = "completion" if cols.completion is None else "prompt"
        yield (("dataset", "columns", missing), f"'prompt' and 'completion' go together; set {missing!r} too")


def _split_leaves_training_data(spec: FineTuneJobSpec) -> Issues:
    split = spec.dataset.split
    taken = (split.validation if split.validation_uri is None else 0.0) + (
        split.test if split.test_uri is None else 0.0
    )
    if taken >= 1.0:
        yield (("dataset", "split"), f"validation + test take {taken:g} of the data; leave some for training (< 1)")


def _balance_for_classification(spec: FineTuneJobSpec) -> Issues:
    if spec.dataset.balance is not None and spec.task != "sequence-classification":
        yield (
            ("dataset", "balance"),
            f"class balance applies to sequence-classification only, not {spec.task}; remove it",
        )


def _replay_needs_uri(spec: FineTuneJobSpec) -> Issues:
    replay = spec.dataset.replay
    if replay is not None and replay.uri is None and replay.ratio > 0:
        yield (("dataset", "replay", "uri"), "replay.ratio needs replay.uri: the general-domain data to mix in")


def _augmentation_needs_prompt(spec: FineTuneJobSpec) -> Issues:
    if spec.dataset.augmentation is not None and spec.task == "causal-lm" and spec.dataset.columns.prompt is None:
        yield (
            ("dataset", "augmentation"),
            "causal-lm learns to write its text, so perturbed words would be learnt as they are: augmentation "
            "applies to the prompt of a prompt/completion layout only; set dataset.columns.prompt and "
            "completion, or remove augmentation",
        )


# --- method --------------------------------------------------------------------------------

#: Each settings block of ``spec.method``: camelCase field → (attribute, the methods it belongs to).
_METHOD_BLOCKS: Final[dict[str, tuple[str, frozenset[str]]]] = {
    t.block: (t.attribute, frozenset(name for name, u in METHOD_TRAITS.items() if u.block == t.block))
    for t in METHOD_TRAITS.values()
    if t.block is not None and t.attribute is not None
}


def _block_fits_method(spec: FineTuneJobSpec) -> Issues:
    method = spec.method
    for block, (attribute, methods) in _METHOD_BLOCKS.items():
        if getattr(method, attribute) is not None and method.type not in methods:
            yield (
                ("method", block),
                f"{block} settings apply to method {' or '.join(sorted(methods))}, but method.type is "
                f"{method.type}; remove the block or change the type",
            )


def _unfreezing_fits_method(spec: FineTuneJobSpec) -> Issues:
    method = spec.method
    if not METHOD_TRAITS[method.type].unfreezing and method.unfreezing is not None:
        yield (
            ("method", "unfreezing"),
            f"gradual unfreezing applies to full fine-tuning only (method.type is {method.type}); "
            "set method.type: full or remove it",
        )


def _lr_decay_fits_method(spec: FineTuneJobSpec) -> Issues:
    method = spec.method
    if not METHOD_TRAITS[method.type].unfreezing and method.layerwise_lr_decay is not None:
        yield (
            ("method", "layerwiseLrDecay"),
            f"layer-wise learning-rate decay applies to full fine-tuning only (method.type is "
            f"{method.type}); set method.type: full or remove it",
        )


def _gpu_for_method(spec: FineTuneJobSpec) -> Issues:
    if METHOD_TRAITS[spec.method.type].needs_gpu and spec.resources.gpus < 1:
        yield (
            ("resources", "gpus"),
            "qlora loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU; "
            "set resources.gpus >= 1 or use method.type: lora",
        )


def _save_for_peft_only(spec: FineTuneJobSpec) -> Issues:
    if not METHOD_TRAITS[spec.method.type].peft and spec.output.save is not None:
        yield (("output", "save"), "full fine-tuning saves full weights; output.save applies to PEFT methods only")


def _merged_needs_a_merging_method(spec: FineTuneJobSpec) -> Issues:
    traits = METHOD_TRAITS[spec.method.type]
    if traits.peft and not traits.merges and spec.output.save == "merged":
        yield (
            ("output", "save"),
            f"{spec.method.type} cannot be merged into the base weights (no weight update to add: "
            f"{'its trained tokens are inputs' if traits.virtual_tokens else 'the adapter is non-linear'}); "
            "use output.save: adapter",
        )


def _dora_not_on_quantized_base(spec: FineTuneJobSpec) -> Issues:
    method = spec.method
    if METHOD_TRAITS[method.type].quantized_base and method.lora is not None and method.lora.use_dora:
        yield (
            ("method", "lora", "useDora"),
            "useDora applies to method lora only (DoRA on a 4-bit qlora base is not offered); use method.type: lora",
        )


def _init_text_for_prompt_tuning(spec: FineTuneJobSpec) -> Issues:
    if spec.method.prefix_tuning is not None and spec.method.prefix_tuning.init_text is not None:
        yield (("method", "prefixTuning", "initText"), "initText applies to prompt-tuning only; remove it")


def _packing_for_causal_lm(spec: FineTuneJobSpec) -> Issues:
    if spec.hyperparameters.packing and spec.task != "causal-lm":
        yield (
            ("hyperparameters", "packing"),
            f"packing applies to causal-lm only; {spec.task} batches are padded dynamically instead",
        )


# --- privacy: what DP-SGD's guarantee does not cover, refused by the field that asks for it --

_NO_GUARANTEE: Final = "spec.privacy cannot be guaranteed with "


def _private_method(spec: FineTuneJobSpec) -> Issues:
    method = spec.method
    if spec.privacy is not None and not METHOD_TRAITS[method.type].dp_sgd:
        yield (
            ("method", "type"),
            _NO_GUARANTEE + f"method {method.type}: DP-SGD is offered for full and lora, whose per-example "
            "gradients Opacus computes and the trainer tests (qlora's 4-bit layers and the virtual-token methods "
            "are not covered); use method.type: lora",
        )


def _private_without_accumulation(spec: FineTuneJobSpec) -> Issues:
    if spec.privacy is not None and spec.hyperparameters.gradient_accumulation_steps > 1:
        yield (
            ("hyperparameters", "gradientAccumulationSteps"),
            _NO_GUARANTEE + "gradient accumulation: each step's batch is one Poisson draw of expected size "
            "batchSize, noised once; raise hyperparameters.batchSize instead and set gradientAccumulationSteps: 1",
        )


def _private_without_packing(spec: FineTuneJobSpec) -> Issues:
    if spec.privacy is not None and spec.hyperparameters.packing:
        yield (
            ("hyperparameters", "packing"),
            _NO_GUARANTEE + "packing: a packed row mixes several training rows, so its gradient is not one "
            "row's; remove packing (it is off by default with privacy)",
        )


def _private_in_one_process(spec: FineTuneJobSpec) -> Issues:
    resources = spec.resources
    if spec.privacy is not None and (resources.gpus > 1 or resources.nodes > 1):
        yield (
            ("resources", "gpus" if resources.gpus > 1 else "nodes"),
            _NO_GUARANTEE + "more than one process: the trainer runs DP-SGD in one process (Poisson sampling "
            "and noise are drawn once per step); set resources.gpus ≤ 1 and nodes: 1",
        )


def _private_without_unfreezing(spec: FineTuneJobSpec) -> Issues:
    if spec.privacy is not None and spec.method.unfreezing is not None:
        yield (
            ("method", "unfreezing"),
            _NO_GUARANTEE + "gradual unfreezing: the DP optimizer clips and noises a fixed set of weights from "
            "the first step; remove unfreezing",
        )


def _private_balance(spec: FineTuneJobSpec) -> Issues:
    balance = spec.dataset.balance
    if spec.privacy is not None and balance is not None and balance.strategy in ("class-weights", "oversample"):
        why = (
            "weights computed from the training labels make each row's loss depend on the other rows"
            if balance.strategy == "class-weights"
            else "a repeated row is one person counted several times"
        )
        yield (("dataset", "balance", "strategy"), _NO_GUARANTEE + f"{balance.strategy}: {why}; use strategy: fail")


def _private_label_issues(spec: FineTuneJobSpec) -> Issues:
    if spec.privacy is not None and spec.dataset.label_issues == "drop":
        yield (
            ("dataset", "labelIssues"),
            _NO_GUARANTEE + "labelIssues: drop: which rows are dropped depends on a model fitted to all training "
            "rows; use labelIssues: report",
        )


def _private_without_augmentation(spec: FineTuneJobSpec) -> Issues:
    if spec.privacy is not None and spec.dataset.augmentation is not None:
        yield (
            ("dataset", "augmentation"),
            _NO_GUARANTEE + "augmentation: rows made from a training row carry it several times into training; "
            "remove augmentation",
        )


# --- evaluation and promotion --------------------------------------------------------------


def _metrics_fit_task(spec: FineTuneJobSpec) -> Issues:
    fits = TASK_METRICS[spec.task]
    misfits = [m for m in spec.evaluation.metrics or () if m not in fits]
    if misfits:
        yield (
            ("evaluation", "metrics"),
            f"{', '.join(misfits)} cannot be computed for task {spec.task}; use {', '.join(fits)}",
        )


def _forgetting_needs_perplexity(spec: FineTuneJobSpec) -> Issues:
    if spec.evaluation.forgetting is not None and spec.task == "sequence-classification":
        yield (
            ("evaluation", "forgetting"),
            "the forgetting check compares general-domain perplexity, which a classification head "
            "does not have; use it with causal-lm or seq2seq, or evaluate outOfDomain instead",
        )


def _slice_columns(spec: FineTuneJobSpec) -> Issues:
    """Each slice column once, and none of the task's own columns (that part needs the task's
    column defaults: operator only)."""
    roles = spec.columns()
    seen: set[str] = set()
    for i, column in enumerate(spec.evaluation.slices):
        if column in seen:
            yield (("evaluation", "slices", i), f"slice column {column!r} is listed twice")
        seen.add(column)
        if column in roles.values():
            yield (
                ("evaluation", "slices", i),
                f"slice column {column!r} is the task's {next(r for r, c in roles.items() if c == column)} "
                "column; slices name another column of the data (a language, a source)",
            )


def _label_issues_for_classification(spec: FineTuneJobSpec) -> Issues:
    if spec.dataset.label_issues != "off" and spec.task != "sequence-classification":
        yield (
            ("dataset", "labelIssues"),
            f"label-error detection needs class labels (sequence-classification), not {spec.task}; remove it",
        )


def _known(computed: frozenset[str]) -> str:
    return ", ".join(sorted(computed))


def _fairness_metric_computed(spec: FineTuneJobSpec) -> Issues:
    fairness, computed = spec.evaluation.fairness, spec.computed_metrics()
    if fairness is not None and fairness.metric not in computed - {"fairness_gap"}:
        yield (
            ("evaluation", "fairness", "metric"),
            f"metric {fairness.metric!r} is not computed; use one of {_known(computed)}",
        )


def _early_stopping_metric_computed(spec: FineTuneJobSpec) -> Issues:
    early, computed = spec.early_stopping, spec.computed_metrics()
    if early is not None and early.metric not in computed:
        yield (("earlyStopping", "metric"), f"metric {early.metric!r} is not computed; use one of {_known(computed)}")


def _gate_issues(spec: FineTuneJobSpec, i: int, gate: Gate) -> Issues:
    """One gate: its metric is computed (operator only), it has a bound, a gain over the baselines
    has baselines that compute its metric (operator only), and ``min`` is not above ``max``."""
    computed, base = spec.computed_metrics(), spec.baseline_metrics()
    at: Loc = ("promotion", "gates", i)
    if gate.metric not in computed:
        yield (
            (*at, "metric"),
            f"gate metric {gate.metric!r} is not computed by this job; use one of {_known(computed)} "
            "(or add its family to evaluation.metrics)",
        )
    if gate.min is None and gate.max is None and gate.min_improvement is None and gate.min_gain_over_baseline is None:
        yield (at, "a gate needs at least one of min, max, minImprovement or minGainOverBaseline")
    if gate.min_gain_over_baseline is not None:
        if not spec.evaluation.baselines:
            yield (
                (*at, "minGainOverBaseline"),
                "needs the baselines it compares with; remove evaluation.baselines: false",
            )
        elif gate.metric in computed and gate.metric not in base:
            yield (
                (*at, "minGainOverBaseline"),
                f"the baselines do not compute {gate.metric}; use one of {', '.join(sorted(base))}",
            )
    if gate.min is not None and gate.max is not None and gate.min > gate.max:
        yield ((*at, "min"), f"min {gate.min:g} is above max {gate.max:g}")


def _gates(spec: FineTuneJobSpec) -> Issues:
    for i, gate in enumerate(spec.promotion.gates):
        yield from _gate_issues(spec, i, gate)


#: Every cross-field rule, in the order their issues are reported.
RULES: Final[tuple[Rule, ...]] = (
    Rule("dataset columns fit the task", _columns_fit_task),
    Rule("one causal-lm column layout", _one_causal_lm_layout),
    Rule("prompt and completion go together", _prompt_with_completion),
    Rule("the splits leave training data", _split_leaves_training_data),
    Rule("class balance for classification only", _balance_for_classification),
    Rule("replay needs its data", _replay_needs_uri),
    Rule("augmentation needs a prompt in causal-lm", _augmentation_needs_prompt),
    Rule("a settings block fits the method", _block_fits_method),
    Rule("gradual unfreezing fits the method", _unfreezing_fits_method),
    Rule("layer-wise lr decay fits the method", _lr_decay_fits_method),
    Rule("a GPU for methods that need one", _gpu_for_method),
    Rule("output.save for PEFT methods only", _save_for_peft_only),
    Rule("merged needs a method that merges", _merged_needs_a_merging_method),
    Rule("no DoRA on a quantized base", _dora_not_on_quantized_base),
    Rule("initText for prompt-tuning only", _init_text_for_prompt_tuning),
    Rule("packing for causal-lm only", _packing_for_causal_lm),
    Rule("privacy: a method DP-SGD covers", _private_method, cel=False),
    Rule("privacy: no gradient accumulation", _private_without_accumulation, cel=False),
    Rule("privacy: no packing", _private_without_packing, cel=False),
    Rule("privacy: one process", _private_in_one_process, cel=False),
    Rule("privacy: no gradual unfreezing", _private_without_unfreezing, cel=False),
    Rule("privacy: no class weights or oversampling", _private_balance, cel=False),
    Rule("privacy: label issues are not dropped", _private_label_issues, cel=False),
    Rule("privacy: no augmentation", _private_without_augmentation, cel=False),
    Rule("evaluation metrics fit the task", _metrics_fit_task),
    Rule("the forgetting check needs perplexity", _forgetting_needs_perplexity),
    Rule("slice columns", _slice_columns),
    Rule("label issues for classification only", _label_issues_for_classification, cel=False),
    Rule("the fairness metric is computed", _fairness_metric_computed, cel=False),
    Rule("the early-stopping metric is computed", _early_stopping_metric_computed, cel=False),
    Rule("promotion gates", _gates),
)


def spec_issues(spec: FineTuneJobSpec) -> list[Issue]:
    """Every issue of every rule, in table order."""
    return [issue for rule in RULES for issue in rule.find(spec)]
