"""Which model family an architecture is, and which families each task takes.

The model class follows the task: an encoder (BERT, MiniLM, DeBERTa) gets a classification
head, a decoder (GPT-2, Llama, Qwen) is trained as a causal language model, an
encoder-decoder (T5, BART) as a sequence-to-sequence model. A mismatch is refused before
any GPU time is spent, with a message that says which model families fit the task.
"""

from __future__ import annotations

from typing import Literal

from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from tuneloop_trainer.errors import UnsupportedModelError

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
