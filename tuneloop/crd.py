"""Generate the FineTuneJob CRD (and the API reference) from the pydantic models.

``python -m tuneloop.crd`` (or ``tuneloop crd``) rewrites ``crds/finetunejobs.tuneloop.dev.yaml``,
its copy in the Helm chart (``helm/tuneloop/crds/``) and ``docs/api.md``; ``--check`` and a test
fail when a committed file drifts from the models.

Plain pydantic JSON Schema is not a *structural* schema, which the API server requires.
:func:`structural` turns one into the other: ``$ref`` inlined, ``title`` dropped,
``anyOf``-with-null turned into ``nullable``, ``int | str`` into
``x-kubernetes-int-or-string``, JSON-Schema-2020 ``exclusiveMinimum: x`` into the
OpenAPI-3.0 ``minimum: x, exclusiveMinimum: true``, object and array defaults dropped
(the API server would apply them and rewrite every manifest), and
``additionalProperties: false`` removed (the API server rejects unknown fields itself
under ``fieldValidation=Strict``, kubectl's default).

Cross-field rules become CEL ``x-kubernetes-validations`` (:data:`CEL_RULES`), each
with the same field path :mod:`tuneloop.api.spec` reports. Rules that need the whole
metric catalogue (a gate, early-stopping or fairness metric that is not computed) are
left to ``tuneloop validate`` and the operator, which reports them as ``InvalidSpec``:
:data:`OPERATOR_ONLY_RULES` lists them.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from tuneloop.api import (
    CATEGORIES,
    GROUP,
    KIND,
    MAX_NAME_LENGTH,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJobSpec,
    FineTuneJobStatus,
)
from tuneloop.api.spec import METHOD_TRAITS, TASK_METRICS

CRD_FILENAME: Final = f"{PLURAL}.{GROUP}.yaml"
#: The copy in the Helm chart, relative to the repository root.
HELM_CRD_PATH: Final = Path("helm", "tuneloop", "crds", CRD_FILENAME)
Schema = dict[str, Any]


@dataclass(frozen=True)
class CelRule:
    """A CEL rule placed at a node of the schema."""

    at: tuple[str, ...]
    """Path of the node: property names, with ``[]`` for array items."""
    rule: str
    message: str
    field_path: str | None = None
    reason: str | None = None

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
    )


_METRICS_FIT = " || ".join(
    f"(self.task == '{task}' && self.evaluation.metrics.all(m, m in {_in_list(metrics)}))"
    for task, metrics in TASK_METRICS.items()
)

#: Every CEL rule in the CRD. Each has a twin in :func:`tuneloop.api.spec._spec_issues`
#: (or in the field's own validation) reporting the same path.
CEL_RULES: Final[tuple[CelRule, ...]] = (
    CelRule(
        (),
        f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters: it becomes a label value and part of pod names",
        ".metadata.name",
    ),
    CelRule(
        ("spec", "task"),
        "self == oldSelf",
        "spec.task is immutable; create a new FineTuneJob for another task",
    ),
    CelRule(
        ("spec",),
        "!has(self.method) || !has(self.method.type) || self.method.type != 'qlora' || !has(self.resources)"
        " || !has(self.resources.gpus) || self.resources.gpus >= 1",
        "qlora needs a CUDA GPU: set resources.gpus >= 1 or use method.type: lora",
        ".resources.gpus",
    ),
    CelRule(
        ("spec",),
        "!has(self.dataset.balance) || self.task == 'sequence-classification'",
        "class balance applies to sequence-classification only; remove it",
        ".dataset.balance",
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
    ),
    CelRule(
        ("spec",),
        "!has(self.evaluation) || !has(self.evaluation.forgetting) || self.task != 'sequence-classification'",
        "the forgetting check compares general-domain perplexity, which a classifier does not have; "
        "use it with causal-lm or seq2seq",
        ".evaluation.forgetting",
    ),
    CelRule(
        ("spec",),
        "!has(self.output.save) || !has(self.method) || !has(self.method.type) || self.method.type != 'full'",
        "full fine-tuning saves full weights; output.save applies to PEFT methods only",
        ".output.save",
    ),
    CelRule(
        ("spec",),
        "!has(self.hyperparameters) || !has(self.hyperparameters.packing) || !self.hyperparameters.packing"
        " || self.task == 'causal-lm'",
        "packing applies to causal-lm only",
        ".hyperparameters.packing",
    ),
    CelRule(
        ("spec", "dataset", "columns"),
        "!has(self.prompt) || has(self.completion)",
        "'prompt' and 'completion' go together; set 'completion' too",
        ".completion",
    ),
    CelRule(
        ("spec", "dataset", "columns"),
        "!has(self.completion) || has(self.prompt)",
        "'prompt' and 'completion' go together; set 'prompt' too",
        ".prompt",
    ),
    CelRule(
        ("spec", "dataset", "columns"),
        "(has(self.messages) ? 1 : 0) + (has(self.prompt) || has(self.completion) ? 1 : 0)"
        " + (has(self.text) ? 1 : 0) <= 1",
        "set one causal-lm layout: chat 'messages', or 'prompt' with 'completion', or plain 'text'",
    ),
    CelRule(
        ("spec", "dataset", "split"),
        "(has(self.validationUri) ? 0.0 : (has(self.validation) ? self.validation : 0.1))"
        " + (has(self.testUri) ? 0.0 : (has(self.test) ? self.test : 0.1)) < 1.0",
        "validation + test must leave some data for training (< 1)",
    ),
    CelRule(
        ("spec", "dataset", "replay"),
        "has(self.uri) || (has(self.ratio) && self.ratio == 0.0)",
        "replay.ratio needs replay.uri: the general-domain data to mix in",
        ".uri",
    ),
    CelRule(
        ("spec",),
        "!has(self.dataset.augmentation) || self.task != 'causal-lm'"
        " || (has(self.dataset.columns) && has(self.dataset.columns.prompt))",
        "augmentation applies to causal-lm's prompt/completion layout only (the prompt is perturbed); "
        "set dataset.columns.prompt and completion, or remove augmentation",
        ".dataset.augmentation",
    ),
    CelRule(
        ("spec", "evaluation"),
        "!has(self.slices) || self.slices.all(s, self.slices.exists_one(t, t == s))",
        "evaluation.slices lists a column twice",
        ".slices",
    ),
    *(
        CelRule(
            ("spec", "method"),
            f"!has(self.{block}) || (has(self.type) && self.type in {_in_list(methods)})",
            f"{block} settings apply to method {' or '.join(methods)} only; remove the block or change the type",
            f".{block}",
        )
        for block, methods in (
            *(
                (field, tuple(name for name, t in METHOD_TRAITS.items() if t.block == field))
                for field in dict.fromkeys(t.block for t in METHOD_TRAITS.values() if t.block is not None)
            ),
            ("unfreezing", tuple(name for name, t in METHOD_TRAITS.items() if t.unfreezing)),
            ("layerwiseLrDecay", tuple(name for name, t in METHOD_TRAITS.items() if t.unfreezing)),
        )
    ),
    CelRule(
        ("spec",),
        "!has(self.output.save) || self.output.save != 'merged' || !has(self.method) || !has(self.method.type)"
        f" || !(self.method.type in {_in_list(tuple(n for n, t in METHOD_TRAITS.items() if t.peft and not t.merges))})",
        "this method cannot be merged into the base weights; use output.save: adapter",
        ".output.save",
    ),
    CelRule(
        ("spec", "method"),
        "!has(self.lora) || !has(self.lora.useDora) || !self.lora.useDora || !has(self.type) || self.type != 'qlora'",
        "useDora applies to method lora only (DoRA on a 4-bit qlora base is not offered); use method.type: lora",
        ".lora.useDora",
    ),
    CelRule(
        ("spec", "method", "prefixTuning"),
        "!has(self.initText)",
        "initText applies to prompt-tuning only; remove it",
        ".initText",
    ),
    CelRule(
        ("spec", "promotion", "gates", "[]"),
        "has(self.min) || has(self.max) || has(self.minImprovement)",
        "a gate needs at least one of min, max or minImprovement",
    ),
    CelRule(
        ("spec", "promotion", "gates", "[]"),
        "!has(self.min) || !has(self.max) || self.min <= self.max",
        "min is above max",
        ".min",
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


# --- structural schema ------------------------------------------------------------


def _clean_text(text: str) -> str:
    text = text.replace("``", "`")
    return re.sub(r"\s*\n\s*", " ", text).strip()


def structural(schema: Schema, defs: dict[str, Schema] | None = None) -> Schema:
    """Turn a pydantic JSON Schema node into a Kubernetes structural schema node."""
    defs = schema.get("$defs", {}) if defs is None else defs
    node = dict(schema)
    node.pop("$defs", None)
    node.pop("title", None)

    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        resolved = structural(target, defs)
        if "description" in node:  # the field's own description wins over the class's
            resolved["description"] = node.pop("description")
        resolved.update({k: v for k, v in node.items() if k not in ("default",)})
        if "default" in node:
            resolved["default"] = node["default"]
        node = resolved

    for key in ("anyOf", "oneOf"):
        if key not in node:
            continue
        options = node.pop(key)
        non_null = [o for o in options if o.get("type") != "null"]
        nullable = len(non_null) < len(options)
        if len(non_null) == 1:
            inner = structural(non_null[0], defs)
            desc = node.get("description")
            merged = {**inner, **{k: v for k, v in node.items() if k != "description"}}
            if desc or "description" in inner:
                merged["description"] = desc or inner["description"]
            node = merged
        elif {o.get("type") for o in non_null} == {"integer", "string"}:
            node["x-kubernetes-int-or-string"] = True
        else:
            raise ValueError(f"cannot express union {options!r} in a structural schema")
        if nullable:
            node["nullable"] = True
            if node.get("default") is None:
                node.pop("default", None)

    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, inclusive, step in (("exclusiveMinimum", "minimum", 1), ("exclusiveMaximum", "maximum", -1)):
        if bound in node and not isinstance(node[bound], bool):
            value = node.pop(bound)
            if node.get("type") == "integer":  # x > 0 reads better as x >= 1
                node[inclusive] = value + step
            else:
                node[inclusive] = value
                node[bound] = True
    if isinstance(node.get("default"), dict | list):
        node.pop("default")
    if "description" in node:
        node["description"] = _clean_text(node["description"])
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.pop("default", None)

    if "properties" in node:
        node["type"] = "object"
        node.pop("additionalProperties", None)
        node["properties"] = {k: structural(v, defs) for k, v in node["properties"].items()}
    elif isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = structural(node["additionalProperties"], defs)
    if "items" in node:
        node["items"] = structural(node["items"], defs)
    return _ordered(node)


_KEY_ORDER: Final = (
    "description",
    "type",
    "nullable",
    "x-kubernetes-int-or-string",
    "enum",
    "default",
    "format",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "maxProperties",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-validations",
)


def _ordered(node: Schema) -> Schema:
    known: Schema = {k: node[k] for k in _KEY_ORDER if k in node}
    return {**known, **{k: v for k, v in node.items() if k not in known}}


def _node_at(root: Schema, path: tuple[str, ...]) -> Schema:
    node = root
    for part in path:
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def openapi_schema() -> Schema:
    """The ``openAPIV3Schema`` of the CRD's one version."""
    spec = structural(FineTuneJobSpec.model_json_schema(by_alias=True, mode="validation"))
    status = structural(FineTuneJobStatus.model_json_schema(by_alias=True, mode="validation"))
    root: Schema = {
        "description": "A fine-tuning job that retrains, evaluates and promotes continuously. "
        "`kubectl explain finetunejob.spec` describes every field.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "description": "APIVersion of this object: tuneloop.dev/v1alpha1.",
                "type": "string",
            },
            "kind": {"description": "Kind of this object: FineTuneJob.", "type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    for rule in CEL_RULES:
        node = _node_at(root, rule.at)
        node.setdefault("x-kubernetes-validations", []).append(rule.render())
    return copy.deepcopy(root)


PRINTER_COLUMNS: Final = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Phase of the job."},
    {
        "name": "Run",
        "type": "integer",
        "jsonPath": ".status.currentRun.number",
        "description": "Current run.",
    },
    {
        "name": "Progress",
        "type": "integer",
        "jsonPath": ".status.currentRun.progress.progressPercentage",
        "description": "Percent of the current run's steps done.",
    },
    {
        "name": "Loss",
        "type": "number",
        "jsonPath": ".status.currentRun.progress.loss",
        "description": "Latest training loss.",
    },
    {
        "name": "Promoted",
        "type": "integer",
        "jsonPath": ".status.promoted.run",
        "description": "The run whose model is promoted (empty: no model yet).",
    },
    {
        "name": "Metric",
        "type": "string",
        "jsonPath": ".status.metric",
        "description": "Headline metric of the latest run.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "tuneloop", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER: Final = (
    "# GENERATED by `python -m tuneloop.crd` from tuneloop/api — do not edit by hand.\n"
    "# A test fails when this file drifts from the models.\n"
)


def render_crd() -> str:
    """The CRD as the YAML committed in ``crds/``."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    """Write the CRD and the API reference (``--check``: fail if they are out of date)."""
    from tuneloop.apidoc import render_api_reference  # noqa: PLC0415  (keeps import of crd light)

    parser = argparse.ArgumentParser(prog="tuneloop crd", description=main.__doc__)
    parser.add_argument("--root", type=Path, default=Path(), help="repository root (default: .)")
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args(argv)
    crd_text = render_crd()
    outputs = {
        args.root / "crds" / CRD_FILENAME: crd_text,
        # The Helm chart installs the same CRD from its own crds/ folder (Helm reads no file outside the chart).
        args.root / HELM_CRD_PATH: crd_text,
        args.root / "docs" / "api.md": render_api_reference(),
    }
    stale = [path for path, text in outputs.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date; run `tuneloop crd` and commit the result", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
