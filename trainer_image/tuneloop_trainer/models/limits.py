"""The longest input a model takes: its position embeddings, less what the method puts
before every input (the virtual tokens of prefix- and prompt-tuning).

A longer ``maxSeqLength`` would crash mid-training on the first long batch; it is lowered
at setup with a warning instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from tuneloop.api.methods import traits
from tuneloop.api.spec.method import Method, VirtualTokensConfig
from tuneloop_trainer.errors import InvalidConfigError

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
    method_traits = traits(method.type)
    if not method_traits.virtual_tokens or method_traits.attribute is None:
        return 0
    settings: VirtualTokensConfig | None = getattr(method, method_traits.attribute)
    return settings.num_virtual_tokens if settings else DEFAULT_VIRTUAL_TOKENS


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
        raise InvalidConfigError(
            f"method.{traits(method.type).block}.numVirtualTokens {virtual_tokens(method)} leaves no room for "
            f"input: {uri} has {limit.positions} positions; use fewer virtual tokens"
        )
    warning = (
        f"hyperparameters.maxSeqLength {requested} is more than {uri} takes ({limit.tokens} tokens: "
        f"{limit.reason}); using {limit.tokens}. Set maxSeqLength to {limit.tokens} or less to silence this warning"
    )
    return limit.tokens, warning
