"""The CRD's CEL rules (``x-kubernetes-validations``): the cross-field rules the API server checks
itself, so a bad manifest is refused by ``kubectl apply`` with no webhook to run.

Each :class:`CelRule` is the twin of a rule in :data:`tuneloop.api.spec.rules.RULES` (it names it
in ``twin``) and reports the same field path; a unit test checks that every rule the table marks
``cel`` has a twin here and every twin a rule. Rules that need the whole metric catalogue (a gate,
early-stopping or fairness metric that is not computed) are left to ``tuneloop validate`` and the
operator, which report them as ``InvalidSpec``: :data:`OPERATOR_ONLY_RULES` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from tuneloop.api import MAX_NAME_LENGTH
from tuneloop.api.methods import METHOD_TRAITS
from tuneloop.api.spec import TASK_METRICS


@dataclass(frozen=True)
class CelRule:
    """A CEL rule placed at a node of the schema."""

    at: tuple[str, ...]
    """Path of the node: property names, with ``[]`` for array items."""
    rule: str
    message: str
    field_path: str | None = None
    reason: str | None = None
    twin: str | None = field(kw_only=True)
    """The name of the rule in :data:`tuneloop.api.spec.rules.RULES` that refuses the same specs
    (None: the models check it on the field itself, or it compares with the old object)."""

    def render(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def _in_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _column_rule(role: str, tasks: tuple[str, ...]) -> CelRule:
    ok = " || ".join(f"self.task == '{t}'" for t in tasks)
    reads = " or ".join(tasks)
    return CelRule(
        ("spec",),
        f"!has(self.dataset.columns) || !has(self.dataset.columns.{role}) || {ok}",
        f"column '{role}' is used by task {reads} only; remove it or change spec.task",
        f".dataset.columns.{role}",
        twin="dataset columns fit the task",
    )


_METRICS_FIT = " || ".join(
    f"(self.task == '{task}' && self.evaluation.metrics.all(m, m in {_in_list(metrics)}))"
    for task, metrics in TASK_METRICS.items()
)

#: Every CEL rule in the CRD. Each has a twin in :data:`tuneloop.api.spec.rules.RULES` (or in the
#: field's own validation) reporting the same path.
CEL_RULES: Final[tuple[CelRule, ...]] = (
    CelRule(
        (),
        f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters: it becomes a label value and part of pod names",
        ".metadata.name",
        twin=None,
    ),
    CelRule(
        ("spec", "task"),
        "self == oldSelf",
        "spec.task is immutable; create a new FineTuneJob for another task",
        twin=None,
    ),
    CelRule(
        ("spec",),
        "!has(self.method) || !has(self.method.type) || self.method.type != 'qlora' || !has(self.resources)"
        " || !has(self.resources.gpus) || self.resources.gpus >= 1",
        "qlora needs a CUDA GPU: set resources.gpus >= 1 or use method.type: lora",
        ".resources.gpus",
        twin="a GPU for methods that need one",
    ),
    CelRule(
        ("spec",),
        "!has(self.dataset.balance) || self.task == 'sequence-classification'",
        "class balance applies to sequence-classification only; remove it",
        ".dataset.balance",
        twin="class balance for classification only",
    ),
    _column_rule("text", ("sequence-classification", "causal-lm")),
    _column_rule("label", ("sequence-classification",)),
    _column_rule("prompt", ("causal-lm",)),
    _column_rule("completion", ("causal-lm",)),
    _column_rule("messages", ("causal-lm",)),
    _column_rule("source", ("seq2seq",)),
    _column_rule("target", ("seq2seq",)),
    CelRule(
        ("spec",),
        f"!has(self.evaluation) || !has(self.evaluation.metrics) || {_METRICS_FIT}",
        "evaluation.metrics must fit the task: accuracy, f1, precision, recall (sequence-classification); "
        "perplexity, rouge, bleu (causal-lm); rouge, bleu (seq2seq)",
        ".evaluation.metrics",
        twin="evaluation metrics fit the task",
    ),
    CelRule(
        ("spec",),
        "!has(self.evaluation) || !has(self.evaluation.forgetting) || self.task != 'sequence-classification'",
        "the forgetting check compares general-domain perplexity, which a classifier does not have; "
        "use it with causal-lm or seq2seq",
        ".evaluation.forgetting",
        twin="the forgetting check needs perplexity",
    ),
    CelRule(
        ("spec",),
        "!has(self.output.save) || !has(self.method) || !has(self.method.type) || self.method.type != 'full'",
        "full fine-tuning saves full weights; output.save applies to PEFT methods only",
        ".output.save",
        twin="output.save for PEFT methods only",
    ),
    CelRule(
        ("spec",),
        "!has(self.hyperparameters) || !has(self.hyperparameters.packing) || !self.hyperparameters.packing"
        " || self.task == 'causal-lm'",
        "packing applies to causal-lm only",
        ".hyperparameters.packing",
        twin="packing for causal-lm only",
    ),
    CelRule(
        ("spec", "dataset", "columns"),
        "!has(self.prompt) || has(self.completion)",
        "'prompt' and 'completion' go together; set 'completion' too",
        ".completion",
        twin="prompt and completion go together",
    ),
    CelRule(
        ("spec", "dataset", "columns"),
        "!has(self.completion) || has(self.prompt)",
        "'prompt' and 'completion' go together; set 'prompt' too",
        ".prompt",
        twin="prompt and completion go together",
    ),
    CelRule(
        ("spec", "dataset", "columns"),
        "(has(self.messages) ? 1 : 0) + (has(self.prompt) || has(self.completion) ? 1 : 0)"
        " + (has(self.text) ? 1 : 0) <= 1",
        "set one causal-lm layout: chat 'messages', or 'prompt' with 'completion', or plain 'text'",
        twin="one causal-lm column layout",
    ),
    CelRule(
        ("spec", "dataset", "split"),
        "(has(self.validationUri) ? 0.0 : (has(self.validation) ? self.validation : 0.1))"
        " + (has(self.testUri) ? 0.0 : (has(self.test) ? self.test : 0.1)) < 1.0",
        "validation + test must leave some data for training (< 1)",
        twin="the splits leave training data",
    ),
    CelRule(
        ("spec", "dataset", "replay"),
        "has(self.uri) || (has(self.ratio) && self.ratio == 0.0)",
        "replay.ratio needs replay.uri: the general-domain data to mix in",
        ".uri",
        twin="replay needs its data",
    ),
    CelRule(
        ("spec",),
        "!has(self.dataset.augmentation) || self.task != 'causal-lm'"
        " || (has(self.dataset.columns) && has(self.dataset.columns.prompt))",
        "augmentation applies to causal-lm's prompt/completion layout only (the prompt is perturbed); "
        "set dataset.columns.prompt and completion, or remove augmentation",
        ".dataset.augmentation",
        twin="augmentation needs a prompt in causal-lm",
    ),
    CelRule(
        ("spec", "evaluation"),
        "!has(self.slices) || self.slices.all(s, self.slices.exists_one(t, t == s))",
        "evaluation.slices lists a column twice",
        ".slices",
        twin="slice columns",
    ),
    *(
        CelRule(
            ("spec", "method"),
            f"!has(self.{block}) || (has(self.type) && self.type in {_in_list(methods)})",
            f"{block} settings apply to method {' or '.join(methods)} only; remove the block or change the type",
            f".{block}",
            twin=twin,
        )
        for block, methods, twin in (
            *(
                (
                    b,
                    tuple(name for name, t in METHOD_TRAITS.items() if t.block == b),
                    "a settings block fits the method",
                )
                for b in dict.fromkeys(t.block for t in METHOD_TRAITS.values() if t.block is not None)
            ),
            (
                "unfreezing",
                tuple(name for name, t in METHOD_TRAITS.items() if t.unfreezing),
                "gradual unfreezing fits the method",
            ),
            (
                "layerwiseLrDecay",
                tuple(name for name, t in METHOD_TRAITS.items() if t.unfreezing),
                "layer-wise lr decay fits the method",
            ),
        )
    ),
    CelRule(
        ("spec",),
        "!has(self.output.save) || self.output.save != 'merged' || !has(self.method) || !has(self.method.type)"
        f" || !(self.method.type in {_in_list(tuple(n for n, t in METHOD_TRAITS.items() if t.peft and not t.merges))})",
        "this method cannot be merged into the base weights; use output.save: adapter",
        ".output.save",
        twin="merged needs a method that merges",
    ),
    CelRule(
        ("spec", "method"),
        "!has(self.lora) || !has(self.lora.useDora) || !self.lora.useDora || !has(self.type) || self.type != 'qlora'",
        "useDora applies to method lora only (DoRA on a 4-bit qlora base is not offered); use method.type: lora",
        ".lora.useDora",
        twin="no DoRA on a quantized base",
    ),
    CelRule(
        ("spec", "method", "prefixTuning"),
        "!has(self.initText)",
        "initText applies to prompt-tuning only; remove it",
        ".initText",
        twin="initText for prompt-tuning only",
    ),
    CelRule(
        ("spec", "promotion", "gates", "[]"),
        "has(self.min) || has(self.max) || has(self.minImprovement) || has(self.minGainOverBaseline)",
        "a gate needs at least one of min, max, minImprovement or minGainOverBaseline",
        twin="promotion gates",
    ),
    CelRule(
        ("spec", "promotion", "gates", "[]"),
        "!has(self.min) || !has(self.max) || self.min <= self.max",
        "min is above max",
        ".min",
        twin="promotion gates",
    ),
)

#: Rules checked by ``tuneloop validate`` and the operator (as ``InvalidSpec``) but not by
#: the API server: they need the derived metric catalogue, which is long to write in CEL
#: and cheap to get wrong there.
OPERATOR_ONLY_RULES: Final = (
    "spec.promotion.gates[*].metric names a computed metric",
    "spec.earlyStopping.metric names a computed metric",
    "spec.evaluation.fairness.metric names a computed metric",
    "spec.evaluation.slices[*] is not one of the task's columns (their defaults are per task)",
    "spec.retrain.schedule parses as a cron expression (the schema only bounds its length)",
)
