"""The numeric formats a model trains and loads in: accelerate's mixed precision, and the
4-bit base model of methods that quantize it."""

from __future__ import annotations

from typing import Any, Literal

import torch

from tuneloop_trainer.errors import InvalidConfigError


def mixed_precision(precision: str) -> Literal["no", "bf16", "fp16"]:
    """accelerate's mixed-precision mode for ``hyperparameters.precision``."""
    cuda = torch.cuda.is_available()
    if precision == "fp32":
        return "no"
    if precision == "auto":
        if not cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if not cuda:
        raise InvalidConfigError(
            f"hyperparameters.precision {precision} needs a CUDA GPU and none is visible; use precision: auto"
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise InvalidConfigError("this GPU does not support bf16; use precision: fp16 or auto")
    return "bf16" if precision == "bf16" else "fp16"


def four_bit_config() -> Any:
    """The NF4 double-quantized 4-bit config a ``quantized_base`` method loads the base model with
    (bitsandbytes; refused without a CUDA GPU)."""
    if not torch.cuda.is_available():
        raise InvalidConfigError(
            "method qlora loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU, and none is "
            "visible; use method.type: lora here, or run on a GPU node"
        )
    try:
        import bitsandbytes  # noqa: F401, PLC0415
    except ImportError:
        raise InvalidConfigError("method qlora needs the bitsandbytes package in the trainer image") from None
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )
