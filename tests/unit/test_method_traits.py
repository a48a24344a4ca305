"""The method traits table (tuneloop.api.methods): a row for every ``spec.method.type``, and
the answers the name comparisons it replaced gave."""

from __future__ import annotations

from typing import get_args

import pytest

from tuneloop.api.methods import DEFAULT_LEARNING_RATES, METHOD_TRAITS, PEFT_METHODS, MethodTraits, traits
from tuneloop.api.spec import Method

pytestmark = pytest.mark.unit

#: The method types the API accepts (the Literal of ``Method.type``).
API_METHODS = frozenset(get_args(Method.model_fields["type"].annotation))


def test_every_api_method_has_a_row_and_no_other() -> None:
    assert API_METHODS
    assert set(METHOD_TRAITS) == API_METHODS
    for name in API_METHODS:
        assert isinstance(traits(name), MethodTraits)
    with pytest.raises(KeyError):
        traits("adapter-of-the-week")


def test_the_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        METHOD_TRAITS["full"] = METHOD_TRAITS["lora"]  # type: ignore[index]


@pytest.mark.parametrize("name", sorted(API_METHODS))
def test_traits_answer_as_the_name_comparisons_did(name: str) -> None:
    t = traits(name)
    # method.type == "full": every weight trained, saved as full weights, unfreezing applies
    assert (not t.peft) == (name == "full")
    assert t.unfreezing == (name == "full")
    assert (name in PEFT_METHODS) == (name != "full")
    # method.type in ("prefix-tuning", "prompt-tuning"): packing off, generation one by one
    assert t.virtual_tokens == (name in ("prefix-tuning", "prompt-tuning"))
    # method.type == "qlora": the base model in 4 bits, on a GPU
    assert t.quantized_base == (name == "qlora")
    assert t.needs_gpu == (name == "qlora")
    # DP-SGD: method.type in ("full", "lora")
    assert t.dp_sgd == (name in ("full", "lora"))
    # output.save: merged is refused for bottleneck (non-linear) and the virtual-token methods
    assert t.merges == (name in ("lora", "qlora", "ia3", "vera", "loha", "lokr"))
    assert t.target_modules == (name in ("lora", "qlora", "ia3", "vera", "loha", "lokr", "bottleneck"))
    assert DEFAULT_LEARNING_RATES[name] == t.learning_rate > 0


@pytest.mark.parametrize("name", sorted(API_METHODS))
def test_settings_block_is_a_field_of_method(name: str) -> None:
    t = traits(name)
    expected = {
        "full": None,
        "qlora": "lora",
        "prefix-tuning": "prefixTuning",
        "prompt-tuning": "promptTuning",
    }.get(name, name)
    assert t.block == expected
    if t.attribute is None:
        return
    field = Method.model_fields[t.attribute]
    assert field.alias == t.block
