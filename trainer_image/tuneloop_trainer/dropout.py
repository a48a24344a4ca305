"""``hyperparameters.dropout``: one dropout probability, set through the model's config.

transformers builds a model's dropout layers from its config, under names that differ per
architecture (BERT ``hidden_dropout_prob``, DistilBERT ``dropout`` and ``seq_classif_dropout``,
GPT-2 ``resid_pdrop``, T5 ``dropout_rate``…). Rather than a fixed list, every config attribute
whose name says dropout (``*dropout*``, ``*_pdrop``) and whose value is a probability is set,
before the model is built, in each of three kinds:

* ``attention``: on the attention probabilities (``attention_probs_dropout_prob``,
  ``attention_dropout``, ``attn_pdrop``);
* ``hidden``: on embeddings, residual and feed-forward outputs (``hidden_dropout_prob``,
  ``dropout``, ``dropout_rate``, ``resid_pdrop``, ``embd_pdrop``, ``activation_dropout``);
* ``classifier``: in task heads (``classifier_dropout``, ``seq_classif_dropout``, ``qa_dropout``,
  ``summary_first_dropout``); a head's ``None`` ("use the hidden dropout") is set too.

All three get the same value. Sub-configs (``text_config``, ``encoder``/``decoder`` of composite
models) are set alike. Not dropout, and left alone: LayerDrop (``layerdrop``) and stochastic depth
(``drop_path_rate``). A config with none of these has no dropout to set: :attr:`DropoutSetting.warning`
says so (the run prints it and keeps it in the model card's notes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PretrainedConfig

Kind = Literal["attention", "hidden", "classifier"]

_NAME = re.compile(r"dropout|_pdrop$")
_ATTENTION = re.compile(r"attn|attention")
_CLASSIFIER = re.compile(r"classif|qa_|summary|head")


def dropout_kind(name: str) -> Kind:
    if _CLASSIFIER.search(name):
        return "classifier"
    if _ATTENTION.search(name):
        return "attention"
    return "hidden"


@dataclass
class DropoutSetting:
    """What ``hyperparameters.dropout`` changed in a model's config."""

    value: float
    model_type: str
    changed: dict[Kind, list[str]] = field(default_factory=dict)
    """Config attributes set, by kind (``sub.name`` for a sub-config's)."""

    @property
    def names(self) -> list[str]:
        return [n for names in self.changed.values() for n in names]

    @property
    def warning(self) -> str | None:
        if self.names:
            return None
        return (
            f"hyperparameters.dropout={self.value:g} has no effect: the {self.model_type or 'model'} config exposes no "
            "dropout probability to set (the model has no dropout layers, or hard-codes them)"
        )

    def summary(self) -> str:
        """One line for the console."""
        if not self.names:
            return self.warning or ""
        kinds = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in self.changed.items())
        return f"dropout {self.value:g} set on {kinds}"


def _is_probability(value: Any) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0


def apply_dropout(config: PretrainedConfig, value: float) -> DropoutSetting:
    """Set every dropout probability of ``config`` (and its sub-configs) to ``value``."""
    setting = DropoutSetting(float(value), str(getattr(config, "model_type", "") or ""))
    _apply(config, float(value), "", setting, depth=0)
    return setting


def _apply(config: PretrainedConfig, value: float, prefix: str, setting: DropoutSetting, *, depth: int) -> None:
    for name in sorted(vars(config)):
        current = getattr(config, name)
        if isinstance(current, PretrainedConfig) and depth < 2:
            _apply(current, value, f"{prefix}{name}.", setting, depth=depth + 1)
            continue
        if name.startswith("_") or not _NAME.search(name):
            continue
        kind = dropout_kind(name)
        if not (_is_probability(current) or (current is None and kind == "classifier")):
            continue
        setattr(config, name, value)
        setting.changed.setdefault(kind, []).append(prefix + name)
