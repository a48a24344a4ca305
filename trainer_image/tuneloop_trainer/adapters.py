"""The peft config of each parameter-efficient method (:data:`PEFT_CONFIGS`), and bottleneck
adapters, which peft does not have.

Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) are not a peft method of their
own, and AdapterHub's ``adapters`` pins an older transformers. They are built here on peft's
LoRA machinery: :class:`BottleneckLayer` is a LoRA layer whose two matrices are the adapter's
down- and up-projection, applied to the wrapped layer's *output* with a nonlinearity between
them (``out + up(act(down(out)))``) instead of to its input. :class:`BottleneckLoraConfig` is
a ``LoraConfig`` with two more fields, so ``save_pretrained`` writes a standard peft adapter
directory (``adapter_config.json`` with ``peft_type: LORA`` and the ``bottleneck_*`` fields,
``adapter_model.safetensors`` with ``lora_A``/``lora_B`` weights and biases). Loading it needs
this module's layer: :func:`read_adapter_config` gives the config to pass to
``PeftModel.from_pretrained(model, directory, config=...)``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import peft
import torch
from peft.tuners.lora.layer import LoraLayer
from peft.utils import constants
from torch import nn
from torch.nn import functional
from transformers.pytorch_utils import Conv1D

from tuneloop.api.spec import BottleneckConfig, LoraConfig, LycorisConfig, Method, VeraConfig
from tuneloop_trainer.errors import UnsupportedModelError
from tuneloop_trainer.models.limits import virtual_tokens

_ACTIVATIONS: Final[dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "relu": functional.relu,
    "gelu": functional.gelu,
    "silu": functional.silu,
    "tanh": torch.tanh,
}
#: The field of ``adapter_config.json`` that marks a bottleneck adapter.
BOTTLENECK_MARK: Final = "bottleneck_reduction_factor"


@dataclass
class BottleneckLoraConfig(peft.LoraConfig):  # type: ignore[misc]  # peft is untyped
    """A ``LoraConfig`` whose layers are bottleneck adapters (see the module docstring)."""

    bottleneck_reduction_factor: int = field(default=16)
    bottleneck_nonlinearity: str = field(default="relu")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._register_custom_module({nn.Linear: BottleneckLayer, Conv1D: BottleneckLayer})


class BottleneckLayer(nn.Module, LoraLayer):  # type: ignore[misc]
    """A bottleneck adapter after a linear layer: ``y = base(x); y + up(act(down(y)))``.

    ``lora_A`` is the down-projection (output width → bottleneck), ``lora_B`` the
    up-projection, zero at the start so the wrapped model starts as the base model. Being
    non-linear, it has no weight delta: merging is refused.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckLoraConfig, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self.bottleneck_activation: dict[str, str] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, 0, 0, config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: peft.LoraConfig, **kwargs: Any) -> None:
        """Add an adapter (``r`` and ``lora_alpha`` are LoRA's: the size comes from the config)."""
        if not isinstance(config, BottleneckLoraConfig) or self.out_features is None:
            raise TypeError("a bottleneck layer needs a BottleneckLoraConfig and a linear base layer")
        width = int(self.out_features)
        size = max(1, width // config.bottleneck_reduction_factor)
        self.r[adapter_name] = size
        self.lora_alpha[adapter_name] = size
        self.scaling[adapter_name] = 1.0
        self.lora_dropout[adapter_name] = nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(width, size)
        up = nn.Linear(size, width)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.lora_B[adapter_name] = up
        self.bottleneck_activation[adapter_name] = config.bottleneck_nonlinearity
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            down, up = self.lora_A[name], self.lora_B[name]
            act = _ACTIVATIONS[self.bottleneck_activation[name]]
            hidden = result.to(next(down.parameters()).dtype)
            result = result + up(act(down(hidden))).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("a bottleneck adapter is non-linear and cannot be merged into the base weights")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise ValueError("a bottleneck adapter is non-linear and has no weight delta")

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


def bottleneck_targets(model_type: str, given: list[str] | None) -> list[str]:
    """The modules after which adapters go: ``given``, or the feed-forward output of every
    block (peft's table of feed-forward output modules, per architecture)."""
    if given:
        return list(given)
    found = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    if not found:
        raise UnsupportedModelError(
            f"no default bottleneck adapter placement is known for model type {model_type!r}; set "
            "method.bottleneck.targetModules to the blocks' output projections (e.g. [down_proj, o_proj])"
        )
    return list(found)


def _given(target_modules: list[str] | None) -> list[str] | None:
    """``targetModules`` as set (None when omitted or empty: the method's own default)."""
    return list(target_modules) if target_modules else None


def _lora(method: Method, task_type: Any, model_type: str, tokenizer_path: str | None) -> Any:
    lora = method.lora or LoraConfig()
    # "all-linear": every linear layer of the blocks, the output head excluded. The QLoRA
    # paper found adapting all of them matters more than the rank.
    targets = _given(lora.target_modules) or "all-linear"
    return peft.LoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_dora=lora.use_dora,
    )


def _ia3(method: Method, task_type: Any, model_type: str, tokenizer_path: str | None) -> Any:
    targets = _given(method.ia3.target_modules if method.ia3 else None)
    return peft.IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=[] if targets else None)


def _vera(method: Method, task_type: Any, model_type: str, tokenizer_path: str | None) -> Any:
    vera = method.vera or VeraConfig()
    # save_projection: the adapter reloads without re-drawing the random matrices
    return peft.VeraConfig(
        task_type=task_type,
        r=vera.r,
        vera_dropout=vera.dropout,
        target_modules=_given(vera.target_modules),
        save_projection=True,
    )


def _lycoris(config_cls: Any, settings: LycorisConfig | None, task_type: Any) -> Any:
    settings = settings or LycorisConfig()
    return config_cls(
        task_type=task_type, r=settings.r, alpha=settings.alpha, target_modules=_given(settings.target_modules)
    )


def _loha(method: Method, task_type: Any, model_type: str, tokenizer_path: str | None) -> Any:
    return _lycoris(peft.LoHaConfig, method.loha, task_type)


def _lokr(method: Method, task_type: Any, model_type: str, tokenizer_path: str | None) -> Any:
    return _lycoris(peft.LoKrConfig, method.lokr, task_type)


def _bottleneck(method: Method, task_type: Any, model_type: str, tokenizer_path: str | None) -> Any:
    bottleneck = method.bottleneck or BottleneckConfig()
    return BottleneckLoraConfig(
        task_type=task_type,
        target_modules=bottleneck_targets(model_type, _given(bottleneck.target_modules)),
        bottleneck_reduction_factor=bottleneck.reduction_factor,
        bottleneck_nonlinearity=bottleneck.nonlinearity,
    )


def _prefix_tuning(method: Method, task_type: Any, model_type: str, tokenizer_path: str | None) -> Any:
    return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=virtual_tokens(method))


def _prompt_tuning(method: Method, task_type: Any, model_type: str, tokenizer_path: str | None) -> Any:
    settings = method.prompt_tuning
    config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=virtual_tokens(method))
    if settings is not None and settings.init_text:
        config.prompt_tuning_init = peft.PromptTuningInit.TEXT
        config.prompt_tuning_init_text = settings.init_text
        config.tokenizer_name_or_path = tokenizer_path
    return config


#: (method, peft task type, the model's ``model_type``, tokenizer directory) → peft config.
PeftConfigBuilder = Callable[[Method, Any, str, str | None], Any]
#: The peft config builder of every parameter-efficient method (``spec.method.type``).
PEFT_CONFIGS: Final[Mapping[str, PeftConfigBuilder]] = MappingProxyType(
    {
        "lora": _lora,
        "qlora": _lora,  # the same adapter, on a base that the loader quantized
        "ia3": _ia3,
        "vera": _vera,
        "loha": _loha,
        "lokr": _lokr,
        "bottleneck": _bottleneck,
        "prefix-tuning": _prefix_tuning,
        "prompt-tuning": _prompt_tuning,
    }
)


def peft_config(method: Method, task_type: Any, model_type: str, *, tokenizer_path: str | None = None) -> Any:
    """The peft config of a parameter-efficient ``method`` for a model of ``model_type``
    (``tokenizer_path``: where prompt tuning's ``initText`` is tokenized, when it is set)."""
    return PEFT_CONFIGS[method.type](method, task_type, model_type, tokenizer_path)


def read_adapter_config(directory: Path) -> tuple[Any, str | None]:
    """The peft config saved in ``directory``, and this API's method name when it is one of
    this module's (``bottleneck``), else None (the caller maps peft's type)."""
    path = directory / "adapter_config.json"
    raw = json.loads(path.read_text())
    if isinstance(raw, dict) and BOTTLENECK_MARK in raw:
        known = {f.name for f in fields(BottleneckLoraConfig) if f.init}
        return BottleneckLoraConfig(**{k: v for k, v in raw.items() if k in known}), "bottleneck"
    return peft.PeftConfig.from_pretrained(str(directory)), None


@contextmanager
def quiet_bias_warning(method_type: str) -> Iterator[None]:
    """Saving a bottleneck adapter: peft takes 1-D ``lora_A``/``lora_B`` tensors for DeepSpeed or
    FSDP shards that were not gathered and warns; a bottleneck's biases are 1-D by design."""
    with warnings.catch_warnings():
        if method_type == "bottleneck":
            warnings.filterwarnings("ignore", message=r"Adapter '[^']*': \d+ LoRA tensor\(s\) have invalid shape")
        yield
