"""What sets one fine-tuning method apart from the others, as a table of traits.

Code that behaves differently per method (the spec's cross-field rules, the CRD's CEL
rules, the trainer's loading, batching, evaluation and saving) asks a method's traits
here, never compares its name: adding a method is adding a row. The method names are the
values of ``spec.method.type`` (``tuneloop.api.spec.method.MethodType``); a unit test checks that
every one has a row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final


@dataclass(frozen=True)
class MethodTraits:
    """What sets one fine-tuning method apart from the others: checks ask a method's traits,
    never its name."""

    learning_rate: float
    """Peak learning rate when ``hyperparameters.learningRate`` is omitted."""
    block: str | None
    """The camelCase field of ``spec.method`` holding the method's settings (None: none)."""
    peft: bool = True
    """An adapter trained on a frozen base model (saved alone unless ``output.save: merged``);
    False: every weight of the model is trained and saved (full fine-tuning)."""
    target_modules: bool = False
    """The adapter wraps named modules (``targetModules``; omitted: the architecture's defaults)."""
    merges: bool = False
    """The trained adapter folds into the base weights (``output.save: merged``)."""
    virtual_tokens: bool = False
    """Trained tokens are put before every input (they take positions; no sequence packing;
    generation one example at a time)."""
    unfreezing: bool = False
    """Gradual unfreezing and layer-wise learning-rate decay apply (they act on base weights)."""
    quantized_base: bool = False
    """The base model is loaded in 4 bits (bitsandbytes NF4) under the adapter; a saved adapter
    is evaluated on a 4-bit base too."""
    needs_gpu: bool = False
    """Needs a CUDA GPU (``resources.gpus >= 1``)."""
    dp_sgd: bool = False
    """DP-SGD (``spec.privacy``) is offered: Opacus computes the per-example gradients of what
    the method trains, and the trainer's tests cover it."""

    @property
    def attribute(self) -> str | None:
        """The snake_case attribute of ``Method`` holding the settings (``block`` in Python)."""
        if self.block is None:
            return None
        return "".join(f"_{c.lower()}" if c.isupper() else c for c in self.block)


#: Every method's traits, keyed by ``spec.method.type``. Learning rates: small for full
#: fine-tuning (large updates destroy pretrained features), larger for adapters, whose few
#: fresh parameters start from zero or random values; largest for methods that train a
#: handful of scales or tokens.
METHOD_TRAITS: Final[Mapping[str, MethodTraits]] = MappingProxyType(
    {
        "full": MethodTraits(2.0e-5, None, peft=False, unfreezing=True, dp_sgd=True),
        "lora": MethodTraits(2.0e-4, "lora", target_modules=True, merges=True, dp_sgd=True),
        "qlora": MethodTraits(2.0e-4, "lora", target_modules=True, merges=True, quantized_base=True, needs_gpu=True),
        "ia3": MethodTraits(3.0e-3, "ia3", target_modules=True, merges=True),
        "prefix-tuning": MethodTraits(1.0e-2, "prefixTuning", virtual_tokens=True),
        "prompt-tuning": MethodTraits(3.0e-2, "promptTuning", virtual_tokens=True),
        "vera": MethodTraits(4.0e-3, "vera", target_modules=True, merges=True),
        "loha": MethodTraits(2.0e-4, "loha", target_modules=True, merges=True),
        "lokr": MethodTraits(2.0e-4, "lokr", target_modules=True, merges=True),
        "bottleneck": MethodTraits(1.0e-4, "bottleneck", target_modules=True),
    }
)
#: The parameter-efficient methods (every one but ``full``).
PEFT_METHODS: Final = frozenset(name for name, t in METHOD_TRAITS.items() if t.peft)
#: Learning rates used when ``hyperparameters.learningRate`` is omitted.
DEFAULT_LEARNING_RATES: Final[Mapping[str, float]] = MappingProxyType(
    {name: t.learning_rate for name, t in METHOD_TRAITS.items()}
)


def traits(method_type: str) -> MethodTraits:
    """The traits of ``method_type`` (a ``spec.method.type``); KeyError for an unknown one."""
    return METHOD_TRAITS[method_type]
