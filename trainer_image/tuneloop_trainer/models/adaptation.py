"""Wrap a loaded model with its parameter-efficient method (peft), refusing at setup what
would only fail in the first training step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tuneloop.api.methods import traits
from tuneloop.api.spec import Method
from tuneloop_trainer.errors import UnsupportedModelError
from tuneloop_trainer.models.families import Family


def peft_task_type(task: str) -> Any:
    """peft's task type for ``spec.task``."""
    from peft import TaskType  # noqa: PLC0415

    return {
        "sequence-classification": TaskType.SEQ_CLS,
        "causal-lm": TaskType.CAUSAL_LM,
        "seq2seq": TaskType.SEQ_2_SEQ_LM,
    }[task]


def _smoke_forward(model: nn.Module, task: str, method: str, family: Family) -> None:
    """One tiny forward pass, for methods whose support depends on the model's forward
    signature (prefix tuning feeds past key values, which e.g. BERT-style encoders in
    transformers 5 do not take): fail at setup, with advice, not in the first step."""
    ids = torch.tensor([[1, 2, 3]])
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq":
        kwargs["labels"] = ids
    try:
        with torch.no_grad():
            model(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UnsupportedModelError(
            f"{method} does not work with this {family} model ({getattr(model.config, 'model_type', '?')}): "
            f"{str(exc).splitlines()[0]}; use prompt-tuning or lora instead"
        ) from None


def apply_method(model: nn.Module, method: Method, task: str, family: Family, tokenizer_path: str) -> nn.Module:
    """Wrap the model for a parameter-efficient method (one that trains every weight, ``full``,
    returns it unchanged). ``tokenizer_path``: where prompt tuning's init text is tokenized."""
    method_traits = traits(method.type)
    if not method_traits.peft:
        return model
    import peft  # noqa: PLC0415

    from tuneloop_trainer import adapters  # noqa: PLC0415 - imports peft

    if method_traits.quantized_base:
        model = peft.prepare_model_for_kbit_training(model)
    config = adapters.peft_config(
        method, peft_task_type(task), str(getattr(model.config, "model_type", "")), tokenizer_path=tokenizer_path
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except (ValueError, TypeError) as exc:  # TypeError: a module type the method does not adapt
        raise UnsupportedModelError(
            f"cannot apply {method.type} to this {family} model: {str(exc).splitlines()[0]}; set the target "
            f"modules explicitly (method.{method_traits.block or method.type}.targetModules)"
        ) from None
    if method_traits.virtual_tokens:
        _smoke_forward(wrapped, task, method.type, family)
    return wrapped
