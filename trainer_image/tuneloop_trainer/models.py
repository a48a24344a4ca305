"""Load the base model for a task and wrap it with the configured adaptation method.

The model class follows the task: an encoder (BERT, MiniLM, DeBERTa) gets a classification
head, a decoder (GPT-2, Llama, Qwen) is trained as a causal language model, an
encoder-decoder (T5, BART) as a sequence-to-sequence model. A mismatch is refused before
any GPU time is spent, with a message that says which model families fit the task.

A model that cannot be used as it is (a classification head for another number of labels,
a truncated weights file, a config that does not parse) is a permanent
:class:`UnsupportedModelError` naming the file and what to do: retrying cannot help.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
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

from tuneloop.api.spec import METHOD_TRAITS, FineTuneJobSpec, LoraConfig, Method, ModelSource
from tuneloop_trainer.dropout import DropoutSetting, apply_dropout
from tuneloop_trainer.errors import InvalidConfigError, UnsupportedModelError

CONFIG_FILE = "config.json"

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
        if path.is_file():
            hint = f"use file://{path.parent}" if path.name == CONFIG_FILE else "save the model with save_pretrained"
            raise UnsupportedModelError(
                f"{uri} is a file: spec.model.uri must name the directory that holds {CONFIG_FILE}, not the file; "
                f"{hint}"
            )
        if not path.is_dir():
            raise UnsupportedModelError(f"model directory {path} does not exist (spec.model.uri {uri})")
        if not (path / CONFIG_FILE).is_file():
            raise UnsupportedModelError(
                f"model directory {path} holds no {CONFIG_FILE} (spec.model.uri {uri}); point spec.model.uri at a "
                "directory written by save_pretrained"
            )
        return ResolvedModel(str(path), None, uri)
    if scheme == "s3":
        import hashlib  # noqa: PLC0415

        dest = cache_dir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        download(uri, dest)  # a no-op when an earlier run downloaded it completely
        if not (dest / CONFIG_FILE).exists():
            raise UnsupportedModelError(
                f"{uri} holds no {CONFIG_FILE}; save the model there with save_pretrained (spec.model.uri names the "
                "prefix that holds config.json)"
            )
        return ResolvedModel(str(dest), None, uri)
    repo, _, at_revision = rest.partition("@")
    return ResolvedModel(repo, source.revision or at_revision or None, uri)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """A library's error message for ours: its first line, cut short."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _is_hub(resolved: ResolvedModel) -> bool:
    return resolved.uri.startswith("hf://")


def load_config(resolved: ResolvedModel) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(resolved.location, revision=resolved.revision)
    except (OSError, ValueError) as exc:
        if not _is_hub(resolved):
            where = (
                "downloaded from it" if resolved.uri.startswith("s3://") else f"at {resolved.location}/{CONFIG_FILE}"
            )
            raise UnsupportedModelError(
                f"cannot read the model config of {resolved.uri} ({CONFIG_FILE} {where}): {_first_line(exc)}; "
                "save the model again with save_pretrained"
            ) from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = "the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face Hub or its cache"
        raise UnsupportedModelError(
            f"cannot load model {resolved.uri} from {where}: {_first_line(exc)}. Check the name and "
            "revision, pre-populate the cache (HF_HOME), or point spec.model.uri at an s3:// or file:// copy"
        ) from None


def load_tokenizer(resolved: ResolvedModel, family: Family) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token and right padding for training."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, revision=resolved.revision)
    except Exception as exc:  # tokenizers raises plain Exceptions for a broken tokenizer.json
        if _is_hub(resolved) and isinstance(exc, OSError):
            raise  # the Hub or the network: let the run be retried
        raise UnsupportedModelError(
            f"cannot load the tokenizer of {resolved.uri}: {_first_line(exc)}; save the tokenizer next to the model "
            "(tokenizer.save_pretrained into the same directory) and upload it again"
        ) from None
    if tokenizer.pad_token is None:
        # Decoders often ship without one; the EOS token is a safe stand-in because padded
        # positions are excluded from attention and loss anyway.
        if tokenizer.eos_token is None:
            raise UnsupportedModelError(f"the tokenizer of {resolved.uri} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


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


#: Model types whose learned positions start after the padding index (RoBERTa's scheme), so
#: ``pad_token_id + 1`` of their ``max_position_embeddings`` never hold a token.
_PADDING_OFFSET_POSITIONS = frozenset(
    {
        "camembert",
        "data2vec-text",
        "ibert",
        "layoutlmv3",
        "lilt",
        "longformer",
        "luke",
        "markuplm",
        "mpnet",
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
        "xmod",
    }
)
#: Model types with relative position information only: positions set no length limit
#: (old T5 configs carry an ``n_positions`` that the model never uses).
_RELATIVE_POSITIONS = frozenset({"t5", "mt5", "umt5", "longt5", "switch_transformers"})
#: Virtual tokens of prefix- and prompt-tuning when the method's settings leave them out.
DEFAULT_VIRTUAL_TOKENS = 20


def virtual_tokens(method: Method) -> int:
    """Tokens that prefix- or prompt-tuning put before every input (0 for other methods)."""
    if method.type == "prefix-tuning":
        return method.prefix_tuning.num_virtual_tokens if method.prefix_tuning else DEFAULT_VIRTUAL_TOKENS
    if method.type == "prompt-tuning":
        return method.prompt_tuning.num_virtual_tokens if method.prompt_tuning else DEFAULT_VIRTUAL_TOKENS
    return 0


@dataclass(frozen=True)
class InputLimit:
    """The longest input a model takes, from its position embeddings."""

    tokens: int
    """Tokens of input that fit (may be 0 or less when virtual tokens take every position)."""
    positions: int
    """The model's position embeddings."""
    reason: str
    """How ``tokens`` follows from the config, for messages."""


def max_input_tokens(config: PretrainedConfig, method: Method) -> InputLimit | None:
    """What ``hyperparameters.maxSeqLength`` may be for this model and method; None when the
    model has no absolute positions (T5, DeBERTa-v3) or does not say.

    Virtual tokens count against the limit: prompt tuning prepends them to the input
    embeddings, and prefix tuning's key/value prefix shifts a decoder's positions.
    """
    model_type = getattr(config, "model_type", "")
    if model_type in _RELATIVE_POSITIONS:
        return None
    if model_type.startswith("deberta") and not getattr(config, "position_biased_input", True):
        return None
    positions = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions maps here
    if not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0:
        return None
    tokens, reason = positions, f"{positions} position embeddings"
    if model_type in _PADDING_OFFSET_POSITIONS:
        pad = getattr(config, "pad_token_id", None)
        offset = (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
        tokens -= offset
        reason += f", of which the first {offset} are reserved ({model_type} positions start after the padding index)"
    virtual = virtual_tokens(method)
    if virtual:
        tokens -= virtual
        reason += f", less {virtual} virtual tokens of {method.type}"
    return InputLimit(tokens, positions, reason)


def fit_max_seq_length(requested: int, config: PretrainedConfig, method: Method, uri: str) -> tuple[int, str | None]:
    """``maxSeqLength`` capped at what the model takes, and the warning to show when it was lowered.

    A longer sequence would crash mid-training (an index past the position embeddings),
    possibly hours in, on the first long batch; lowering it at setup is what the user meant.
    """
    limit = max_input_tokens(config, method)
    if limit is None or requested <= limit.tokens:
        return requested, None
    if limit.tokens < 1:
        field = "prefixTuning" if method.type == "prefix-tuning" else "promptTuning"
        raise InvalidConfigError(
            f"method.{field}.numVirtualTokens {virtual_tokens(method)} leaves no room for input: {uri} has "
            f"{limit.positions} positions; use fewer virtual tokens"
        )
    warning = (
        f"hyperparameters.maxSeqLength {requested} is more than {uri} takes ({limit.tokens} tokens: "
        f"{limit.reason}); using {limit.tokens}. Set maxSeqLength to {limit.tokens} or less to silence this warning"
    )
    return limit.tokens, warning


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
    if spec.method.type == "qlora":
        kwargs["quantization_config"] = _four_bit_config()
    tokenizer = load_tokenizer(resolved, family)
    fresh: list[str] = []
    model = _load_for_task(spec.task, resolved, config, tokenizer, label_names, kwargs=kwargs, fresh=fresh)
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


def _load_for_task(
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
        raise _corrupt_weights("a weights file", resolved, exc) from None
    except RuntimeError as exc:
        if "PytorchStreamReader" not in str(exc):  # anything else (out of memory...) stays retryable
            raise
        raise _corrupt_weights("a weights file (pytorch_model.bin)", resolved, exc) from None
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


def check_weight_files(resolved: ResolvedModel) -> None:
    """Open the header of each ``*.safetensors`` file of a local model: a truncated or corrupt
    file (an upload cut short) fails here, named, instead of inside ``from_pretrained``."""
    directory = Path(resolved.location)
    if _is_hub(resolved) or not directory.is_dir():
        return
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise UnsupportedModelError(
            f"model directory {resolved.uri} holds no weights (no *.safetensors or pytorch_model.bin next to its "
            "config.json); save the model with save_pretrained and upload the whole directory (spec.model.uri)"
        )
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise _corrupt_weights(f"weights file {path.name}", resolved, exc) from None


def _corrupt_weights(what: str, resolved: ResolvedModel, exc: BaseException) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what} of {resolved.uri} is truncated or corrupt ({_first_line(exc)}); save the model again with "
        "save_pretrained and upload it again (spec.model.uri)"
    )


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
            use_dora=lora.use_dora,
        )
    elif method.type == "ia3":
        targets = method.ia3.target_modules if method.ia3 and method.ia3.target_modules else None
        config = peft.IA3Config(
            task_type=task_type, target_modules=targets, feedforward_modules=[] if targets else None
        )
    elif method.type in ("vera", "loha", "lokr", "bottleneck"):
        from tuneloop_trainer import adapters  # noqa: PLC0415 - imports peft

        config = adapters.peft_config(method, task_type, str(getattr(model.config, "model_type", "")))
    elif method.type == "prefix-tuning":
        config = peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=virtual_tokens(method))
    else:
        settings = method.prompt_tuning
        config = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=virtual_tokens(method))
        if settings is not None and settings.init_text:
            config.prompt_tuning_init = peft.PromptTuningInit.TEXT
            config.prompt_tuning_init_text = settings.init_text
            config.tokenizer_name_or_path = tokenizer_path
    try:
        wrapped = peft.get_peft_model(model, config)
    except (ValueError, TypeError) as exc:  # TypeError: a module type the method does not adapt
        raise UnsupportedModelError(
            f"cannot apply {method.type} to this {family} model: {str(exc).splitlines()[0]}; set the target "
            f"modules explicitly (method.{_block(method)}.targetModules)"
        ) from None
    if METHOD_TRAITS[method.type].virtual_tokens:
        _smoke_forward(wrapped, task, method.type, family)
    return wrapped


# --- models a run saved, loaded back for evaluation ---------------------------------------

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
        raise UnsupportedModelError(f"cannot read {ADAPTER_CONFIG_FILE} of {uri}: {_first_line(exc)}") from None
    wanted = str(_peft_task_type(spec.task).value)
    found = peft_config.task_type
    found = None if found is None else str(getattr(found, "value", found))
    if found is not None and found != wanted:
        raise UnsupportedModelError(f"{uri} is an adapter for task type {found}, not for {spec.task} ({wanted})")
    peft_type = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
    method_name = own_method or _PEFT_METHODS.get(peft_type)
    if method_name is None:
        raise UnsupportedModelError(f"{uri} is a {peft_type} adapter, which this trainer does not load")
    method = Method.model_validate(
        {"type": method_name}
        | (
            {_camel_method(method_name): {"numVirtualTokens": int(peft_config.num_virtual_tokens)}}
            if METHOD_TRAITS[method_name].virtual_tokens
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
    if spec.method.type == "qlora":  # the candidate's base is 4-bit: evaluate on the same footing
        kwargs["quantization_config"] = _four_bit_config()
    model = _load_for_task(spec.task, base, config, tokenizer, names, kwargs=kwargs)
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(directory), is_trainable=False, config=peft_config)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UnsupportedModelError(
            f"cannot apply the adapter {uri} to {base.uri}: {_first_line(exc)} (was it trained on another base "
            "model? set baseModelUri in promoted.json)"
        ) from None
    return TrainedModel(wrapped, tokenizer, config, method, "adapter", names)


def _block(method: Method) -> str:
    """The settings field of ``method`` (``lora``, ``ia3``, …), for messages."""
    return METHOD_TRAITS[method.type].block or method.type


def _camel_method(name: str) -> str:
    return "prefixTuning" if name == "prefix-tuning" else "promptTuning"


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
    model = _load_for_task(spec.task, resolved, config, tokenizer, names, kwargs=kwargs)
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
        raise UnsupportedModelError(f"the adapter weights {path.name} are unreadable: {_first_line(exc)}") from None
    return None
