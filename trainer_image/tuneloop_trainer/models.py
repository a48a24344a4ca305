"""Load the base model for a task and wrap it with the configured adaptation method.

The model class follows the task: an encoder (BERT, MiniLM, DeBERTa) gets a classification
head, a decoder (GPT-2, Llama, Qwen) is trained as a causal language model, an
encoder-decoder (T5, BART) as a sequence-to-sequence model. A mismatch is refused before
any GPU time is spent, with a message that says which model families fit the task.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from tuneloop.api.spec import FineTuneJobSpec, LoraConfig, Method, ModelSource
from tuneloop_trainer.errors import InvalidConfigError, UnsupportedModelError

log = logging.getLogger(__name__)

Family = Literal["encoder", "decoder", "encoder-decoder", "unknown"]

#: Which model families each task accepts, and the Auto class that loads it.
TASK_FAMILIES: dict[str, tuple[Family, ...]] = {
    "sequence-classification": ("encoder", "decoder", "encoder-decoder"),
    "causal-lm": ("decoder",),
    "seq2seq": ("encoder-decoder",),
}
_FIT_HINT = (
    "encoder models (BERT, MiniLM, DeBERTa) fit sequence-classification, decoder models (GPT-2, Llama, Qwen) "
    "fit causal-lm, encoder-decoder models (T5, BART) fit seq2seq"
)
_DROPOUT_ATTRIBUTES = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
    "dropout_rate",
    "dropout",
    "attention_dropout",
    "activation_dropout",
)


def model_family(config: PretrainedConfig) -> Family:
    """Classify an architecture from its config."""
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False) or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "encoder-decoder"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    return "unknown"


def check_fits_task(config: PretrainedConfig, task: str, uri: str) -> Family:
    """Refuse a model whose architecture does not fit the task."""
    family = model_family(config)
    model_type = getattr(config, "model_type", "?")
    if family not in TASK_FAMILIES[task]:
        raise UnsupportedModelError(
            f"{uri} is a{'n' if family[0] in 'aeiou' else ''} {family} model ({model_type}), which does not fit "
            f"task {task}: {_FIT_HINT}. Pick a model of the right family or change spec.task."
        )
    if task == "sequence-classification" and model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"{uri} ({model_type}) has no sequence-classification head in transformers; {_FIT_HINT}"
        )
    return family


@dataclass
class ResolvedModel:
    """Where a model's files are, as ``from_pretrained`` wants them."""

    location: str
    """A local directory, or a hub repository id."""
    revision: str | None
    uri: str
    """The URI the user wrote, for messages."""


def resolve_model(source: ModelSource, download: Callable[[str, Path], Path], cache_dir: Path) -> ResolvedModel:
    """Map ``spec.model.uri`` to something ``from_pretrained`` loads.

    ``download(uri, dest)`` mirrors an ``s3://`` prefix into ``dest`` (done once per URI:
    the directory is keyed by the URI and reused by later runs on the same node).
    """
    uri = source.uri
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        path = Path(rest)
        if not path.is_dir():
            raise UnsupportedModelError(f"model directory {path} does not exist (spec.model.uri {uri})")
        return ResolvedModel(str(path), None, uri)
    if scheme == "s3":
        import hashlib  # noqa: PLC0415

        dest = cache_dir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        if not (dest / "config.json").exists():
            download(uri, dest)
        if not (dest / "config.json").exists():
            raise UnsupportedModelError(f"{uri} holds no config.json; save the model there with save_pretrained")
        return ResolvedModel(str(dest), None, uri)
    repo, _, at_revision = rest.partition("@")
    return ResolvedModel(repo, source.revision or at_revision or None, uri)


def load_config(resolved: ResolvedModel) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(resolved.location, revision=resolved.revision)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = "the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face Hub or its cache"
        raise UnsupportedModelError(
            f"cannot load model {resolved.uri} from {where}: {str(exc).splitlines()[0]}. Check the name and "
            "revision, pre-populate the cache (HF_HOME), or point spec.model.uri at an s3:// or file:// copy"
        ) from None


def load_tokenizer(resolved: ResolvedModel, family: Family) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token and right padding for training."""
    tokenizer = AutoTokenizer.from_pretrained(resolved.location, revision=resolved.revision)
    if tokenizer.pad_token is None:
        # Decoders often ship without one; the EOS token is a safe stand-in because padded
        # positions are excluded from attention and loss anyway.
        if tokenizer.eos_token is None:
            raise UnsupportedModelError(f"the tokenizer of {resolved.uri} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _override_dropout(config: PretrainedConfig, dropout: float) -> list[str]:
    changed = []
    for name in _DROPOUT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, float | int) and not isinstance(value, bool):
            setattr(config, name, float(dropout))
            changed.append(name)
    return changed


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


@dataclass
class LoadedModel:
    """A model ready to train."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    family: Family
    resolved: ResolvedModel
    config: PretrainedConfig

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
    if spec.hyperparameters.dropout is not None:
        changed = _override_dropout(config, spec.hyperparameters.dropout)
        log.info("dropout set to %s on %s", spec.hyperparameters.dropout, ", ".join(changed) or "nothing")
    kwargs: dict[str, Any] = {"config": config, "revision": resolved.revision}
    if spec.method.type == "qlora":
        kwargs["quantization_config"] = _four_bit_config()
    tokenizer = load_tokenizer(resolved, family)
    if spec.task == "sequence-classification":
        if not label_names:
            raise InvalidConfigError("sequence-classification needs at least one label")
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id  # decoders classify from the last non-pad token
        model = AutoModelForSequenceClassification.from_pretrained(resolved.location, **kwargs)
    elif spec.task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(resolved.location, **kwargs)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(resolved.location, **kwargs)
    if spec.hyperparameters.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    model = apply_method(model, spec.method, spec.task, family, resolved.location)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, resolved=resolved, config=config)


def _four_bit_config() -> Any:
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


def _peft_task_type(task: str) -> Any:
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
    """Wrap the model for a parameter-efficient method (``full`` returns it unchanged)."""
    if method.type == "full":
        return model
    import peft  # noqa: PLC0415

    task_type = _peft_task_type(task)
    config: Any
    if method.type in ("lora", "qlora"):
        lora = method.lora or LoraConfig()
        if method.type == "qlora":
            model = peft.prepare_model_for_kbit_training(model)
        config = peft.LoraConfig(
            task_type=task_type,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            # "all-linear": every linear layer of the blocks, the output head excluded. The
            # QLoRA paper found adapting all of them matters more than the rank.
            target_modules=list(lora.target_modules) if lora.target_modules else "all-linear",
        )
    elif method.type == "ia3":
        targets = method.ia3.target_modules if method.ia3 and method.ia3.target_modules else None
        config = peft.IA3Config(
            task_type=task_type, target_modules=targets, feedforward_modules=[] if targets else None
        )
    elif method.type == "prefix-tuning":
        tokens = method.prefix_tuning.num_virtual_tokens if method.prefix_tuning else 20
        config = peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=tokens)
    else:
        settings = method.prompt_tuning
        tokens = settings.num_virtual_tokens if settings else 20
        config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=tokens)
        if settings is not None and settings.init_text:
            config.prompt_tuning_init = peft.PromptTuningInit.TEXT
            config.prompt_tuning_init_text = settings.init_text
            config.tokenizer_name_or_path = tokenizer_path
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:
        raise UnsupportedModelError(
            f"cannot apply {method.type} to this {family} model: {str(exc).splitlines()[0]}; set the target "
            "modules explicitly (method.lora.targetModules / method.ia3.targetModules)"
        ) from None
    if method.type in ("prefix-tuning", "prompt-tuning"):
        _smoke_forward(wrapped, task, method.type, family)
    return wrapped
