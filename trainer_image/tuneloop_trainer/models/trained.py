"""Models a run saved (an adapter or full weights), loaded back to be evaluated beside a new
candidate: the promoted model, compared on the same test split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from tuneloop.api.methods import traits
from tuneloop.api.spec import FineTuneJobSpec, Method
from tuneloop_trainer.errors import UnsupportedModelError
from tuneloop_trainer.models.adaptation import peft_task_type
from tuneloop_trainer.models.families import check_fits_task
from tuneloop_trainer.models.files import CONFIG_FILE, ResolvedModel, first_line, load_config, load_tokenizer
from tuneloop_trainer.models.loading import load_for_task
from tuneloop_trainer.models.precision import four_bit_config

ADAPTER_CONFIG_FILE = "adapter_config.json"
#: peft's adapter types, as this API's method names.
_PEFT_METHODS: dict[str, str] = {
    "LORA": "lora",
    "IA3": "ia3",
    "VERA": "vera",
    "LOHA": "loha",
    "LOKR": "lokr",
    "PREFIX_TUNING": "prefix-tuning",
    "PROMPT_TUNING": "prompt-tuning",
}
#: Weights of a classification head in a saved adapter (BERT's ``classifier``, decoders'
#: ``score``, RoBERTa's and BART's ``…out_proj``): their first dimension is the label count.
_HEAD_WEIGHTS = ("classifier.weight", "score.weight", "out_proj.weight")


@dataclass
class TrainedModel:
    """A model that a run saved (an adapter applied to its base model, or full weights), loaded
    to be evaluated beside a new candidate."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    """The base model's config (adapters) or the model's own."""
    method: Method
    """The adapter's type and virtual tokens (``full`` for full weights): what limits its inputs."""
    kind: Literal["adapter", "full"]
    label_names: list[str] | None
    """Classification: the class name of each of the model's outputs, in order."""


def load_trained_model(
    spec: FineTuneJobSpec,
    directory: Path,
    uri: str,
    base: ResolvedModel,
    label_names: Sequence[str] | None,
) -> TrainedModel:
    """Load a model saved by ``save_pretrained`` in ``directory`` (``uri`` names it in messages)
    for ``spec.task``, for evaluation only.

    An adapter (``adapter_config.json``) is applied to ``base``; full or merged weights
    (``config.json``) load as they are. ``label_names`` are the class names the model was
    trained with, when known (classification): a full model's config names its outputs itself;
    an adapter's head only has a size, so the names are taken from ``label_names`` when their
    number matches. Raises :class:`UnsupportedModelError` saying what does not fit.
    """
    if (directory / ADAPTER_CONFIG_FILE).is_file():
        return _load_adapter(spec, directory, uri, base, label_names)
    if (directory / CONFIG_FILE).is_file():
        return _load_full(spec, directory, uri, label_names)
    raise UnsupportedModelError(
        f"{uri} holds neither {ADAPTER_CONFIG_FILE} (an adapter) nor {CONFIG_FILE} (full weights)"
    )


def _load_adapter(
    spec: FineTuneJobSpec, directory: Path, uri: str, base: ResolvedModel, label_names: Sequence[str] | None
) -> TrainedModel:
    import peft  # noqa: PLC0415

    from tuneloop_trainer import adapters  # noqa: PLC0415 - imports peft

    try:
        peft_config, own_method = adapters.read_adapter_config(directory)
    except (OSError, ValueError, TypeError) as exc:
        raise UnsupportedModelError(f"cannot read {ADAPTER_CONFIG_FILE} of {uri}: {first_line(exc)}") from None
    wanted = str(peft_task_type(spec.task).value)
    found = peft_config.task_type
    found = None if found is None else str(getattr(found, "value", found))
    if found is not None and found != wanted:
        raise UnsupportedModelError(f"{uri} is an adapter for task type {found}, not for {spec.task} ({wanted})")
    peft_type = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
    method_name = own_method or _PEFT_METHODS.get(peft_type)
    if method_name is None:
        raise UnsupportedModelError(f"{uri} is a {peft_type} adapter, which this trainer does not load")
    method_traits = traits(method_name)
    method = Method.model_validate(
        {"type": method_name}
        | (
            {method_traits.block: {"numVirtualTokens": int(peft_config.num_virtual_tokens)}}
            if method_traits.virtual_tokens and method_traits.block
            else {}
        )
    )
    config = load_config(base)
    family = check_fits_task(config, spec.task, base.uri)
    names: list[str] | None = None
    if spec.task == "sequence-classification":
        outputs = adapter_head_size(directory)
        if label_names and (outputs is None or outputs == len(label_names)):
            names = list(label_names)
        else:
            raise UnsupportedModelError(
                f"the classification head of {uri} has {outputs} outputs and the names of its classes are not "
                "known (its run's data profile is missing or has another number of labels)"
            )
    try:
        tokenizer = load_tokenizer(ResolvedModel(str(directory), None, uri), family)
    except UnsupportedModelError:  # an adapter saved without its tokenizer: the base model's
        tokenizer = load_tokenizer(base, family)
    kwargs: dict[str, Any] = {
        "config": config,
        "revision": base.revision,
        "ignore_mismatched_sizes": True,
        "output_loading_info": True,
    }
    if traits(spec.method.type).quantized_base:  # the candidate's base is 4-bit: evaluate on the same footing
        kwargs["quantization_config"] = four_bit_config()
    model = load_for_task(spec.task, base, config, tokenizer, names, kwargs=kwargs)
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(directory), is_trainable=False, config=peft_config)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UnsupportedModelError(
            f"cannot apply the adapter {uri} to {base.uri}: {first_line(exc)} (was it trained on another base "
            "model? set baseModelUri in promoted.json)"
        ) from None
    return TrainedModel(wrapped, tokenizer, config, method, "adapter", names)


def _load_full(spec: FineTuneJobSpec, directory: Path, uri: str, label_names: Sequence[str] | None) -> TrainedModel:
    resolved = ResolvedModel(str(directory), None, uri)
    config = load_config(resolved)
    family = check_fits_task(config, spec.task, uri)
    names: list[str] | None = None
    if spec.task == "sequence-classification":
        n = int(getattr(config, "num_labels", 0) or 0)
        id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
        names = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
        if all(name == f"LABEL_{i}" for i, name in enumerate(names)) and label_names and len(label_names) == n:
            names = list(label_names)  # saved without names: transformers' placeholders
    tokenizer = load_tokenizer(resolved, family)
    kwargs: dict[str, Any] = {"config": config, "ignore_mismatched_sizes": True, "output_loading_info": True}
    model = load_for_task(spec.task, resolved, config, tokenizer, names, kwargs=kwargs)
    return TrainedModel(model, tokenizer, config, Method(type="full"), "full", names)


def adapter_head_size(directory: Path) -> int | None:
    """Outputs of the classification head saved in an adapter (``None``: none found, or not in
    safetensors)."""
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.endswith(_HEAD_WEIGHTS) and "lora_" not in key:
                    return int(f.get_slice(key).get_shape()[0])
    except (SafetensorError, OSError) as exc:
        raise UnsupportedModelError(f"the adapter weights {path.name} are unreadable: {first_line(exc)}") from None
    return None
