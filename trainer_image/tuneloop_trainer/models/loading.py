"""Load the base model for a task, refusing weights that cannot train, and wrap it with the
configured adaptation method: what :class:`LoadedModel` holds is ready to train.

A model that cannot be used as it is (a classification head for another number of labels,
mismatched shapes, NaN weights) is a permanent :class:`UnsupportedModelError` naming what
to do: retrying cannot help.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from tuneloop.api.methods import traits
from tuneloop.api.spec import FineTuneJobSpec
from tuneloop_trainer.dropout import DropoutSetting, apply_dropout
from tuneloop_trainer.errors import InvalidConfigError, UnsupportedModelError
from tuneloop_trainer.models.adaptation import apply_method
from tuneloop_trainer.models.families import Family, check_fits_task
from tuneloop_trainer.models.files import (
    ResolvedModel,
    check_weight_files,
    corrupt_weights,
    load_config,
    load_tokenizer,
)
from tuneloop_trainer.models.precision import four_bit_config

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to train."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    family: Family
    resolved: ResolvedModel
    config: PretrainedConfig
    dropout: DropoutSetting | None = None
    """What ``hyperparameters.dropout`` set (``None``: not asked for)."""
    fresh_weights: list[str] = field(default_factory=list)
    """Weights of the pretrained backbone (not a task head) that the checkpoint did not hold:
    transformers initialised them at random (see :func:`fresh_backbone_weights`)."""

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total


def load_model(
    spec: FineTuneJobSpec,
    resolved: ResolvedModel,
    *,
    label_names: Sequence[str] | None = None,
    config: PretrainedConfig | None = None,
) -> LoadedModel:
    """Load the base model for ``spec.task`` and apply ``spec.method`` (``config``: one already
    loaded with :func:`load_config`, to avoid reading it twice)."""
    config = config if config is not None else load_config(resolved)
    family = check_fits_task(config, spec.task, resolved.uri)
    dropout = apply_dropout(config, spec.hyperparameters.dropout) if spec.hyperparameters.dropout is not None else None
    # Mismatched shapes are loaded (not raised as a bare RuntimeError) and then refused with a
    # message: the loading info names them.
    kwargs: dict[str, Any] = {
        "config": config,
        "revision": resolved.revision,
        "ignore_mismatched_sizes": True,
        "output_loading_info": True,
    }
    if traits(spec.method.type).quantized_base:
        kwargs["quantization_config"] = four_bit_config()
    tokenizer = load_tokenizer(resolved, family)
    fresh: list[str] = []
    model = load_for_task(spec.task, resolved, config, tokenizer, label_names, kwargs=kwargs, fresh=fresh)
    if spec.hyperparameters.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    model = apply_method(model, spec.method, spec.task, family, resolved.location)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=family,
        resolved=resolved,
        config=config,
        dropout=dropout,
        fresh_weights=fresh,
    )


def load_for_task(
    task: str,
    resolved: ResolvedModel,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    label_names: Sequence[str] | None,
    *,
    kwargs: dict[str, Any],
    fresh: list[str] | None = None,
) -> Any:
    """``from_pretrained`` with the task's Auto class, refusing corrupt and mismatched weights;
    ``fresh`` receives the backbone weights the checkpoint lacked (:func:`fresh_backbone_weights`)."""
    check_weight_files(resolved)
    auto: Any
    if task == "sequence-classification":
        if not label_names:
            raise InvalidConfigError("sequence-classification needs at least one label")
        check_classification_head(config, len(label_names), resolved.uri)
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id  # decoders classify from the last non-pad token
        auto = AutoModelForSequenceClassification
    elif task == "causal-lm":
        auto = AutoModelForCausalLM
    else:
        auto = AutoModelForSeq2SeqLM
    try:
        model, info = auto.from_pretrained(resolved.location, **kwargs)
    except (SafetensorError, pickle.UnpicklingError, EOFError) as exc:
        raise corrupt_weights("a weights file", resolved, exc) from None
    except RuntimeError as exc:
        if "PytorchStreamReader" not in str(exc):  # anything else (out of memory...) stays retryable
            raise
        raise corrupt_weights("a weights file (pytorch_model.bin)", resolved, exc) from None
    _refuse_mismatched(info.get("mismatched_keys") or (), resolved.uri, task)
    _refuse_non_finite(model, resolved.uri)
    missing = fresh_backbone_weights(model, info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        log.warning("%s lacks backbone weights, initialised at random: %s%s", resolved.uri, missing[0], more)
        if fresh is not None:
            fresh.extend(missing)
    return model


def fresh_backbone_weights(model: nn.Module, missing_keys: Iterable[str]) -> list[str]:
    """The missing weights that belong to the pretrained backbone (under ``base_model_prefix``),
    not to a task head a checkpoint may rightly lack (``classifier``, ``score``): a tensor renamed or
    dropped from a damaged or mismatched checkpoint, which transformers silently initialises at
    random — the run would fine-tune a partly random model."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return sorted(k for k in missing_keys if prefix and k.startswith(f"{prefix}."))


def _refuse_non_finite(model: nn.Module, uri: str) -> None:
    """Weights that are NaN or infinite (a corrupted file, a diverged checkpoint) cannot train: every
    loss is NaN, and the run would crash deep inside a library (a retryable exit 1), over and over."""
    # A float32 sum per tensor: NaN or ±inf anywhere makes it non-finite, and unlike isfinite(p) it
    # allocates no mask the size of the tensor (a large embedding on a full GPU).
    bad = [
        name
        for name, p in model.named_parameters()
        if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p.sum(dtype=torch.float32)))
    ]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UnsupportedModelError(
            f"the weights of {uri} hold NaN or infinite values: {bad[0]}{more}; the file is corrupt or was saved "
            "from a run that diverged: save a healthy model again with save_pretrained and upload it (spec.model.uri)"
        )


def check_classification_head(config: PretrainedConfig, num_labels: int, uri: str) -> None:
    """Refuse a checkpoint whose sequence-classification head has another number of labels.

    Re-initialising the head (``ignore_mismatched_sizes``) would silently throw away the
    trained head and keep a mapping of ids to names that no longer holds; a user who wants
    that should start from the model without its head, and say so.
    """
    heads = [a for a in getattr(config, "architectures", None) or [] if a.endswith("ForSequenceClassification")]
    if heads and config.num_labels != num_labels:
        raise UnsupportedModelError(
            f"{uri} has a sequence-classification head ({heads[0]}) with {config.num_labels} labels, but the data "
            f"has {num_labels} labels; use a base model without a task head (the encoder saved with "
            f"AutoModel.save_pretrained), a checkpoint whose head has {num_labels} labels, or data with the same "
            f"{config.num_labels} labels"
        )


def _refuse_mismatched(mismatched: Any, uri: str, task: str) -> None:
    """Weights whose shape differs from the model built for the task (another head, vocabulary...)."""
    found = sorted(mismatched, key=lambda m: (not str(m[0]).endswith(".weight"), str(m[0])))  # weights say more
    if not found:
        return
    key, ckpt, model = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise UnsupportedModelError(
        f"the weights of {uri} do not fit a {task} model: {key} is {tuple(ckpt)} in the checkpoint but "
        f"{tuple(model)} in the model{more}; use a base model without a task head, or one saved for this task"
    )
