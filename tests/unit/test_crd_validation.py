"""The CRD structural-schema validator mirrors the API server's checks of custom objects."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.harness.crd_validation import (
    REASON_UNKNOWN_FIELD,
    FieldError,
    apply_defaults,
    check_schema_rules,
    invalid_message,
    prune_unknown_fields,
    validate_custom_object,
)

pytestmark = pytest.mark.unit

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["task", "model"],
            "properties": {
                "task": {"type": "string", "enum": ["sequence-classification", "causal-lm", "seq2seq"]},
                "model": {
                    "type": "object",
                    "required": ["uri"],
                    "properties": {"uri": {"type": "string", "pattern": "^(hf|s3|file)://", "maxLength": 40}},
                },
                "method": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string", "default": "full"},
                        "lora": {
                            "type": "object",
                            "properties": {
                                "r": {"type": "integer", "minimum": 1, "maximum": 256},
                                "alpha": {"type": "integer", "default": 16},
                                "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": True, "maximum": 1},
                            },
                        },
                    },
                    "x-kubernetes-validations": [
                        {
                            "rule": "self.type != 'lora' || has(self.lora)",
                            "message": "method.lora is required when method.type is lora",
                            "fieldPath": ".lora",
                            "reason": "FieldValueRequired",
                        }
                    ],
                },
                "hyperparameters": {
                    "type": "object",
                    "properties": {
                        "learningRate": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
                        "epochs": {"type": "integer", "minimum": 1, "default": 3},
                        "seed": {"x-kubernetes-int-or-string": True},
                    },
                },
                "promotion": {
                    "type": "object",
                    "properties": {
                        "gates": {
                            "type": "array",
                            "maxItems": 3,
                            "items": {
                                "type": "object",
                                "required": ["metric"],
                                "properties": {
                                    "metric": {"type": "string", "minLength": 2},
                                    "min": {"type": "number", "nullable": True},
                                },
                            },
                            "x-kubernetes-validations": [
                                {"rule": "self.all(g, g.metric != 'loss')", "message": "loss cannot be a gate"}
                            ],
                        }
                    },
                },
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
                "suspend": {"type": "boolean"},
            },
        },
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}


def job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"task": "causal-lm", "model": {"uri": "hf://org/name"}}
    base.update(spec)
    return {
        "apiVersion": "tuneloop.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "x", "namespace": "default", "unknownMetaIsNotOurs": 1},
        "spec": base,
    }


def fields(errors: list[FieldError]) -> list[tuple[str, str]]:
    return [(e.field, e.reason) for e in errors]


def test_a_valid_object_has_no_errors() -> None:
    assert validate_custom_object(SCHEMA, job(hyperparameters={"learningRate": 2e-5, "epochs": 2})) == []


def test_field_error_is_a_frozen_dataclass_rendered_like_a_status_cause() -> None:
    error = FieldError("spec.x", "FieldValueInvalid", "Invalid value: 2: nope")
    assert dataclasses.is_dataclass(error)
    with pytest.raises(dataclasses.FrozenInstanceError):
        error.field = "spec.y"  # type: ignore[misc]
    assert str(error) == "spec.x: Invalid value: 2: nope"


def test_maximum_reports_the_field_path_value_and_bound() -> None:
    # The API server: `spec.hyperparameters.learningRate: Invalid value: 2: ... should be less than or equal to 1`.
    errors = validate_custom_object(SCHEMA, job(hyperparameters={"learningRate": 2}))
    assert errors == [
        FieldError(
            "spec.hyperparameters.learningRate",
            "FieldValueInvalid",
            "Invalid value: 2: spec.hyperparameters.learningRate in body should be less than or equal to 1",
        )
    ]


def test_exclusive_bounds_use_the_openapi_v3_0_boolean_form() -> None:
    errors = validate_custom_object(SCHEMA, job(hyperparameters={"learningRate": 0}))
    assert fields(errors) == [("spec.hyperparameters.learningRate", "FieldValueInvalid")]
    assert "should be greater than 0" in errors[0].message
    errors = validate_custom_object(SCHEMA, job(method={"type": "lora", "lora": {"dropout": 1.0}}))
    assert "should be less than 1" in errors[0].message


def test_type_mismatch_is_type_invalid_and_integers_accept_integral_floats() -> None:
    errors = validate_custom_object(SCHEMA, job(hyperparameters={"epochs": "3"}, suspend="yes"))
    assert fields(errors) == [
        ("spec.hyperparameters.epochs", "FieldValueTypeInvalid"),
        ("spec.suspend", "FieldValueTypeInvalid"),
    ]
    assert errors[0].message.endswith('must be of type integer: "string"')
    assert validate_custom_object(SCHEMA, job(hyperparameters={"epochs": 3.0})) == []
    assert fields(validate_custom_object(SCHEMA, job(hyperparameters={"epochs": True}))) == [
        ("spec.hyperparameters.epochs", "FieldValueTypeInvalid")
    ]


def test_enum_is_not_supported_with_the_list_of_values() -> None:
    errors = validate_custom_object(SCHEMA, job(task="translation"))
    assert errors[0].field == "spec.task"
    assert errors[0].reason == "FieldValueNotSupported"
    assert errors[0].message == (
        'Unsupported value: "translation": supported values: "sequence-classification", "causal-lm", "seq2seq"'
    )


def test_required_fields_are_reported_at_their_own_path() -> None:
    obj = job()
    del obj["spec"]["model"]["uri"]
    del obj["spec"]["task"]
    assert fields(validate_custom_object(SCHEMA, obj)) == [
        ("spec.task", "FieldValueRequired"),
        ("spec.model.uri", "FieldValueRequired"),
    ]


def test_list_items_are_addressed_by_index() -> None:
    obj = job(promotion={"gates": [{"metric": "f1"}, {"metric": "a"}, {"min": 0.5}]})
    errors = validate_custom_object(SCHEMA, obj)
    assert fields(errors) == [
        ("spec.promotion.gates[1].metric", "FieldValueInvalid"),
        ("spec.promotion.gates[2].metric", "FieldValueRequired"),
    ]
    assert "should be at least 2 chars long" in errors[0].message


def test_string_and_array_limits() -> None:
    obj = job(model={"uri": "http://example.com/" + "x" * 30}, promotion={"gates": [{"metric": "f1"}] * 4})
    errors = validate_custom_object(SCHEMA, obj)
    assert fields(errors) == [
        ("spec.model.uri", "FieldValueTooLong"),
        ("spec.model.uri", "FieldValueInvalid"),
        ("spec.promotion.gates", "FieldValueTooMany"),
    ]
    assert "should match '^(hf|s3|file)://'" in errors[1].message


def test_nullable_allows_null_and_non_nullable_rejects_it() -> None:
    assert validate_custom_object(SCHEMA, job(promotion={"gates": [{"metric": "f1", "min": None}]})) == []
    errors = validate_custom_object(SCHEMA, job(hyperparameters={"epochs": None}))
    assert fields(errors) == [("spec.hyperparameters.epochs", "FieldValueTypeInvalid")]


def test_unknown_fields_are_errors_unless_preserved() -> None:
    # Like fieldValidation=Strict: `unknown field "spec.hyperparameters.learningrate"`.
    obj = job(hyperparameters={"learningrate": 0.1}, extra={"anything": {"goes": 1}})
    errors = validate_custom_object(SCHEMA, obj)
    assert errors == [
        FieldError(
            "spec.hyperparameters.learningrate",
            REASON_UNKNOWN_FIELD,
            'unknown field "spec.hyperparameters.learningrate"',
        )
    ]
    # apiVersion/kind/metadata are implicit at the root; metadata is not validated here.
    assert validate_custom_object(SCHEMA, {**job(), "status": {"whatever": [1]}}) == []


def test_additional_properties_schema_validates_map_values() -> None:
    assert validate_custom_object(SCHEMA, job(labels={"a": "b"})) == []
    assert fields(validate_custom_object(SCHEMA, job(labels={"a": 1}))) == [("spec.labels.a", "FieldValueTypeInvalid")]


def test_int_or_string_accepts_both_and_nothing_else() -> None:
    assert validate_custom_object(SCHEMA, job(hyperparameters={"seed": 1})) == []
    assert validate_custom_object(SCHEMA, job(hyperparameters={"seed": "auto"})) == []
    assert fields(validate_custom_object(SCHEMA, job(hyperparameters={"seed": 1.5}))) == [
        ("spec.hyperparameters.seed", "FieldValueTypeInvalid")
    ]


def test_list_type_set_rejects_duplicates() -> None:
    assert fields(validate_custom_object(SCHEMA, job(tags=["a", "b", "a"]))) == [
        ("spec.tags[2]", "FieldValueDuplicate")
    ]


def test_list_type_map_rejects_duplicate_keys() -> None:
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
                "items": {"type": "object", "properties": {"name": {"type": "string"}, "v": {"type": "integer"}}},
            }
        },
    }
    errors = validate_custom_object(schema, {"items": [{"name": "a", "v": 1}, {"name": "a", "v": 2}]})
    assert fields(errors) == [("items[1]", "FieldValueDuplicate")]


def test_combinators_validate_values() -> None:
    schema = {
        "type": "object",
        "properties": {
            "split": {
                "type": "object",
                "properties": {"ratio": {"type": "number"}, "uri": {"type": "string"}},
                "oneOf": [{"required": ["ratio"]}, {"required": ["uri"]}],
            },
            "n": {"type": "integer", "not": {"enum": [13]}, "anyOf": [{"minimum": 10}, {"maximum": 0}]},
        },
    }
    assert validate_custom_object(schema, {"split": {"ratio": 0.1}, "n": 11}) == []
    errors = validate_custom_object(schema, {"split": {"ratio": 0.1, "uri": "s3://x"}, "n": 13})
    assert [(e.field, e.message.split(": ")[-1]) for e in errors] == [
        ("split", "split in body must validate one and only one schema (oneOf)"),
        ("n", "n in body must not validate the schema (not)"),
    ]
    assert "at least one schema (anyOf)" in validate_custom_object(schema, {"n": 5})[0].message


# ---- CEL (x-kubernetes-validations) -------------------------------------------------------


def cel_schema(*rules: dict[str, Any], prop: dict[str, Any] | None = None) -> dict[str, Any]:
    node: dict[str, Any] = prop or {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    return {"type": "object", "properties": {"spec": {**node, "x-kubernetes-validations": list(rules)}}}


@pytest.mark.parametrize(
    ("rule", "spec", "ok"),
    [
        ("has(self.model)", {"model": "x"}, True),
        ("has(self.model)", {}, False),
        ("self.gates.all(g, g.min > 0)", {"gates": [{"min": 1}, {"min": 0.5}]}, True),
        ("self.gates.all(g, g.min > 0)", {"gates": [{"min": 1}, {"min": 0}]}, False),
        ("self.gates.exists(g, g.metric == 'f1')", {"gates": [{"metric": "f1"}]}, True),
        ("self.gates.exists_one(g, g.metric == 'f1')", {"gates": [{"metric": "f1"}] * 2}, False),
        ("self.task in ['causal-lm', 'seq2seq']", {"task": "seq2seq"}, True),
        ("'lora' in self", {"lora": {}}, True),
        ("size(self.modules) <= 2", {"modules": ["q", "k", "v"]}, False),
        ("size(self.name) < 5", {"name": "abc"}, True),
        ("self.uri.matches('^s3://[a-z0-9.-]+/')", {"uri": "s3://bucket/x"}, True),
        ("self.uri.matches('^s3://[a-z0-9.-]+/')", {"uri": "hf://org/x"}, False),
        ("self.uri.startsWith('s3://') || self.uri.endsWith('.jsonl')", {"uri": "/data/x.jsonl"}, True),
        ("self.a < self.b", {"a": "abc", "b": "abd"}, True),
        ("self.lr > 0 && self.lr < 1.5 && self.epochs >= 1.0", {"lr": 2e-5, "epochs": 1}, True),
        ("self.name.lowerAscii() == 'abc'", {"name": "AbC"}, True),
        ("self.modules.map(m, m + '_proj').exists(m, m == 'q_proj')", {"modules": ["q"]}, True),
        ("!has(self.stop) || self.stop.split(',').size() == 2", {"stop": "a,b"}, True),
    ],
)
def test_cel_rules(rule: str, spec: dict[str, Any], ok: bool) -> None:
    errors = validate_custom_object(cel_schema({"rule": rule}), {"spec": spec})
    assert (errors == []) is ok, errors
    if not ok:
        assert errors == [FieldError("spec", "FieldValueInvalid", f'Invalid value: "object": failed rule: {rule}')]


def test_cel_message_message_expression_field_path_and_reason() -> None:
    schema = cel_schema(
        {"rule": "self.min <= self.max", "message": "min must not exceed max"},
        {
            "rule": "self.max <= 10",
            "messageExpression": "'max is ' + string(self.max) + ', at most 10'",
            "fieldPath": ".max",
        },
        {"rule": "has(self.uri)", "reason": "FieldValueRequired", "message": "uri is required", "fieldPath": ".uri"},
        {"rule": "self.min >= 0", "reason": "FieldValueForbidden", "message": "negative"},
    )
    errors = validate_custom_object(schema, {"spec": {"min": -20, "max": 11}})
    assert errors == [
        FieldError("spec.max", "FieldValueInvalid", 'Invalid value: "object": max is 11, at most 10'),
        FieldError("spec.uri", "FieldValueRequired", "Required value: uri is required"),
        FieldError("spec", "FieldValueForbidden", "Forbidden: negative"),
    ]
    errors = validate_custom_object(schema, {"spec": {"min": 5, "max": 1, "uri": "x"}})
    assert errors == [FieldError("spec", "FieldValueInvalid", 'Invalid value: "object": min must not exceed max')]


def test_cel_rules_on_nested_nodes_report_their_path() -> None:
    errors = validate_custom_object(SCHEMA, job(method={"type": "lora"}))
    assert errors == [
        FieldError(
            "spec.method.lora", "FieldValueRequired", "Required value: method.lora is required when method.type is lora"
        )
    ]
    errors = validate_custom_object(SCHEMA, job(promotion={"gates": [{"metric": "loss"}]}))
    assert errors == [
        FieldError("spec.promotion.gates", "FieldValueInvalid", 'Invalid value: "array": loss cannot be a gate')
    ]


def test_cel_runtime_errors_are_invalid() -> None:
    errors = validate_custom_object(cel_schema({"rule": "self.missing > 1"}), {"spec": {}})
    assert fields(errors) == [("spec", "FieldValueInvalid")]
    assert "self.missing > 1" in errors[0].message


def test_cel_is_skipped_on_nodes_with_schema_errors() -> None:
    schema = cel_schema({"rule": "self.n > 100"}, prop={"type": "object", "properties": {"n": {"type": "integer"}}})
    assert fields(validate_custom_object(schema, {"spec": {"n": "x"}})) == [("spec.n", "FieldValueTypeInvalid")]


def test_transition_rules_run_only_on_update_with_an_old_value() -> None:
    # `oldSelf` rules (e.g. immutability) are skipped on create and when the old value is absent.
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "task": {
                        "type": "string",
                        "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "task is immutable"}],
                    },
                    "runs": {
                        "type": "integer",
                        "x-kubernetes-validations": [{"rule": "self >= oldSelf", "message": "runs only grow"}],
                    },
                },
            }
        },
    }
    new = {"spec": {"task": "seq2seq", "runs": 1}}
    assert validate_custom_object(schema, new) == []
    assert validate_custom_object(schema, new, old={"spec": {}}) == []
    errors = validate_custom_object(schema, new, old={"spec": {"task": "causal-lm", "runs": 2}})
    assert errors == [
        FieldError("spec.task", "FieldValueInvalid", 'Invalid value: "string": task is immutable'),
        FieldError("spec.runs", "FieldValueInvalid", 'Invalid value: "integer": runs only grow'),
    ]
    assert validate_custom_object(schema, new, old={"spec": {"task": "seq2seq", "runs": 0}}) == []


def test_transition_rules_correlate_map_list_items_by_key() -> None:
    schema = {
        "type": "object",
        "properties": {
            "gates": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["metric"],
                "items": {
                    "type": "object",
                    "properties": {"metric": {"type": "string"}, "min": {"type": "number"}},
                    "x-kubernetes-validations": [{"rule": "self.min >= oldSelf.min", "message": "no lowering"}],
                },
            }
        },
    }
    old = {"gates": [{"metric": "f1", "min": 0.8}, {"metric": "acc", "min": 0.5}]}
    new = {"gates": [{"metric": "acc", "min": 0.4}, {"metric": "f1", "min": 0.9}, {"metric": "bleu", "min": 0.1}]}
    assert fields(validate_custom_object(schema, new, old)) == [("gates[0]", "FieldValueInvalid")]


def test_check_schema_rules_reports_rules_that_do_not_compile() -> None:
    schema = cel_schema({"rule": "self.a =="}, {"rule": "self.a == 1"})
    errors = check_schema_rules(schema)
    assert fields(errors) == [
        ("openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule", "FieldValueInvalid")
    ]


# ---- defaulting and pruning ---------------------------------------------------------------


def test_defaults_are_applied_where_the_parent_exists() -> None:
    obj = job(method={"lora": {"r": 8}})
    defaulted = apply_defaults(SCHEMA, obj)
    assert defaulted["spec"]["method"] == {"type": "full", "lora": {"r": 8, "alpha": 16}}
    assert "hyperparameters" not in defaulted["spec"]  # no parent, no default
    assert obj["spec"]["method"] == {"lora": {"r": 8}}  # the input is not modified
    with_parent = apply_defaults(SCHEMA, job(hyperparameters={}))
    assert with_parent["spec"]["hyperparameters"] == {"epochs": 3}


def test_defaults_replace_nulls_of_non_nullable_fields() -> None:
    defaulted = apply_defaults(SCHEMA, job(hyperparameters={"epochs": None}))
    assert defaulted["spec"]["hyperparameters"] == {"epochs": 3}
    kept = apply_defaults(SCHEMA, job(promotion={"gates": [{"metric": "f1", "min": None}]}))
    assert kept["spec"]["promotion"]["gates"] == [{"metric": "f1", "min": None}]


def test_defaults_in_list_items_and_map_values() -> None:
    schema = {
        "type": "object",
        "properties": {
            "gates": {
                "type": "array",
                "items": {"type": "object", "properties": {"mode": {"type": "string", "default": "min"}}},
            },
            "m": {"type": "object", "additionalProperties": {"type": "object", "properties": {"k": {"default": 1}}}},
        },
    }
    assert apply_defaults(schema, {"gates": [{}, {"mode": "max"}], "m": {"a": {}}}) == {
        "gates": [{"mode": "min"}, {"mode": "max"}],
        "m": {"a": {"k": 1}},
    }


def test_prune_unknown_fields_keeps_declared_and_preserved_ones() -> None:
    obj = job(hyperparameters={"learningrate": 0.1, "epochs": 1}, extra={"x": 1}, bogus=True)
    pruned, paths = prune_unknown_fields(SCHEMA, obj)
    assert paths == ["spec.bogus", "spec.hyperparameters.learningrate"]
    assert pruned["spec"]["hyperparameters"] == {"epochs": 1}
    assert pruned["spec"]["extra"] == {"x": 1}
    assert pruned["metadata"] == obj["metadata"]
    assert "bogus" in obj["spec"]  # the input is not modified


def test_invalid_message_matches_the_api_server_format() -> None:
    one = [FieldError("spec.hyperparameters.learningRate", "FieldValueInvalid", "Invalid value: 2: too big")]
    assert invalid_message("FineTuneJob", "tuneloop.dev", "x", one) == (
        'FineTuneJob.tuneloop.dev "x" is invalid: spec.hyperparameters.learningRate: Invalid value: 2: too big'
    )
    two = [*one, FieldError("spec.task", "FieldValueRequired", "Required value")]
    assert invalid_message("ConfigMap", "", "y", two) == (
        'ConfigMap "y" is invalid: [spec.hyperparameters.learningRate: Invalid value: 2: too big, '
        "spec.task: Required value]"
    )
