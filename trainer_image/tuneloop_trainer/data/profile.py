"""The training data's profile, and how far it moved since the promoted run (data drift).

Each run saves a profile of its training split (``runs/<n>/report/data-profile.json``,
:meth:`tuneloop.contract.Layout.data_profile`): three distributions that are cheap to
compute, small to store and comparable between runs.

* ``labels``: training rows per label name (classification only);
* ``lengths``: rows per input length in tokens, in the fixed bins :data:`LENGTH_EDGES` (the
  same bins for every run, so two profiles line up without the raw lengths);
* ``tokens``: counts of the :data:`TOP_TOKENS` most frequent tokens, plus one ``other`` count
  for the rest.

The next run compares its profile with the promoted run's: the Jensen-Shannon **distance**
(the square root of the divergence) per distribution, base 2, from
:func:`scipy.spatial.distance.jensenshannon`, over the union of both profiles' keys. It is
0 for identical distributions and 1 for disjoint ones, symmetric, and a metric (so "twice as
far" means something). The overall score is the **largest** of the three: each distribution
says a different thing moved (what is asked, how long, in which words), and an average would
let two steady distributions hide the one that moved.

Limits, stated where they are reported too:

* rows are the training split's distinct user rows: replay rows and oversampled copies are
  left out (they are not new data); lengths and tokens come from at most
  :data:`MAX_PROFILE_ROWS` of them, chosen by content hash (the same rows in both runs when
  the data overlaps);
* a token that is in one run's top :data:`TOP_TOKENS` and in the other's long tail counts as
  0 there (its count is inside ``other``): the token distance errs upwards by at most the
  share of the ``other`` buckets, and is exact when each run uses fewer distinct tokens;
* lengths and tokens depend on the tokenizer: profiles made with different vocabularies
  (another base model) are compared on labels only, and the report says so;
* two samples of the same source are not identical: on small data (hundreds of rows) the
  token distance between two random halves of one dataset is already well above 0.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from tuneloop_trainer.data.examples import Example

PROFILE_FORMAT: Final = "tuneloop-data-profile/1"
#: Tokens whose counts are kept; the rest are counted together as ``other``.
TOP_TOKENS: Final = 2000
#: Rows tokenized for the length and token distributions (the labels count every row).
MAX_PROFILE_ROWS: Final = 100_000
#: Lower edges of the length bins, in tokens; the last bin is open (``8192+``).
LENGTH_EDGES: Final = (0, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
                       6144, 8192)  # fmt: skip
#: The distributions compared, in report order.
DISTRIBUTIONS: Final = ("labels", "lengths", "tokens")
DRIFT_METHOD: Final = (
    "Jensen-Shannon distance (base 2; 0 = same distribution, 1 = disjoint) per distribution over the union of "
    "both profiles' keys; the score is the largest of them"
)
#: The ``other`` bucket's key while comparing (no token string can be a tuple).
_OTHER: Final = ("other",)


def length_bin(tokens: int) -> str:
    """The name of the bin a length falls in: ``"0-3"``, ``"4-7"``, …, ``"8192+"``."""
    for lower, upper in itertools.pairwise(LENGTH_EDGES):
        if tokens < upper:
            return f"{lower}-{upper - 1}"
    return f"{LENGTH_EDGES[-1]}+"


def length_bins() -> list[str]:
    """Every bin's name, shortest first."""
    return [length_bin(edge) for edge in LENGTH_EDGES]


def input_text(example: Example) -> str:
    """What the model reads of a training row: the text fields joined (the label aside), or a
    conversation's contents."""
    fields = example.fields
    if "messages" in fields:
        return " ".join(str(m.get("content", "")) for m in fields["messages"])
    return " ".join(str(v) for k, v in fields.items() if k != "label")


def tokenizer_fingerprint(vocabulary: Mapping[str, int]) -> str:
    """Identifies a tokenizer's vocabulary: profiles with different fingerprints count lengths
    and tokens in different units."""
    canonical = json.dumps(sorted(vocabulary.items()), ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class DataProfile:
    """The profile of one run's training data (see the module docstring)."""

    rows: int
    """Distinct training rows (replay rows and oversampled copies left out)."""
    sampled_rows: int
    """Rows tokenized for ``lengths`` and ``tokens`` (at most :data:`MAX_PROFILE_ROWS`)."""
    tokenizer: str
    """:func:`tokenizer_fingerprint` of the tokenizer that counted lengths and tokens."""
    labels: dict[str, int] | None
    """Rows per label name (classification; ``None`` for other tasks)."""
    label_names: list[str] | None
    """Class names in class-id order (what the model's outputs mean)."""
    lengths: dict[str, int]
    """Rows per length bin (every bin, empty ones included)."""
    tokens: dict[str, int]
    """Counts of the most frequent tokens."""
    other_tokens: int
    """Tokens not in ``tokens``."""
    top_k: int = TOP_TOKENS
    run: int | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values()) + self.other_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "run": self.run,
            "rows": self.rows,
            "sampledRows": self.sampled_rows,
            "tokenizer": self.tokenizer,
            "labels": None if self.labels is None else dict(self.labels),
            "labelNames": None if self.label_names is None else list(self.label_names),
            "lengthEdges": list(LENGTH_EDGES),
            "lengths": dict(self.lengths),
            "tokens": {"topK": self.top_k, "top": dict(self.tokens), "other": self.other_tokens},
        }

    @classmethod
    def from_dict(cls, data: Any) -> DataProfile:
        """Read a profile back; ``ValueError`` saying what is wrong when it is not one."""
        if not isinstance(data, Mapping):
            raise ValueError("it is not a JSON object")
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"its format is {data.get('format')!r}, not {PROFILE_FORMAT!r}")
        if list(data.get("lengthEdges") or []) != list(LENGTH_EDGES):
            raise ValueError("its length bins differ from this trainer's")
        tokens = data.get("tokens")
        if not isinstance(tokens, Mapping):
            raise ValueError("'tokens' is not an object")
        labels = data.get("labels")
        names = data.get("labelNames")
        run = data.get("run")
        try:
            return cls(
                rows=_count(data.get("rows"), "rows"),
                sampled_rows=_count(data.get("sampledRows"), "sampledRows"),
                tokenizer=str(data.get("tokenizer") or ""),
                labels=None if labels is None else _counts(labels, "labels"),
                label_names=None if names is None else [str(n) for n in _list(names, "labelNames")],
                lengths=_counts(data.get("lengths"), "lengths"),
                tokens=_counts(tokens.get("top"), "tokens.top"),
                other_tokens=_count(tokens.get("other"), "tokens.other"),
                top_k=_count(tokens.get("topK", TOP_TOKENS), "tokens.topK"),
                run=None if run is None else _count(run, "run"),
            )
        except TypeError as exc:
            raise ValueError(str(exc)) from None


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{name!r} is not a count")
    return value


def _counts(value: Any, name: str) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name!r} is not an object of counts")
    return {str(k): _count(v, f"{name}.{k}") for k, v in value.items()}


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{name!r} is not a list")
    return value


def build_profile(
    examples: Iterable[Example],
    *,
    tokenize: Callable[[Sequence[str]], Sequence[Sequence[Hashable]]],
    tokenizer: str,
    label_names: Sequence[str] | None,
    token_name: Callable[[Hashable], str] = str,
    top_k: int = TOP_TOKENS,
    max_rows: int = MAX_PROFILE_ROWS,
    batch_size: int = 1000,
    run: int | None = None,
) -> DataProfile:
    """Profile training rows.

    ``tokenize`` turns texts into their tokens (without special tokens): ids, or anything
    hashable, which ``token_name`` names (only the kept ones are named: counting ids and naming
    2,000 of them is much faster than naming every token); ``tokenizer`` is its
    :func:`tokenizer_fingerprint`. ``label_names`` maps class ids to names
    (classification; ``None`` otherwise). Replay rows and repeated uids (oversampled copies) are
    left out.
    """
    if top_k < 1 or max_rows < 1:
        raise ValueError(f"top_k and max_rows must be positive, got {top_k} and {max_rows}")
    distinct: dict[str, Example] = {}
    for example in examples:
        if not example.replay:
            distinct.setdefault(example.uid, example)
    rows = list(distinct.values())
    labels: dict[str, int] | None = None
    if label_names is not None:
        by_id = Counter(int(e.fields["label"]) for e in rows if "label" in e.fields)
        labels = {name: by_id.get(i, 0) for i, name in enumerate(label_names)}
    # uids are content hashes, so the smallest ones are a uniform sample, and the same rows are
    # chosen again when the next run's data still holds them.
    sample = sorted(rows, key=lambda e: e.uid)[:max_rows]
    lengths = dict.fromkeys(length_bins(), 0)
    counts: Counter[Hashable] = Counter()
    for start in range(0, len(sample), batch_size):
        texts = [input_text(e) for e in sample[start : start + batch_size]]
        for tokens in tokenize(texts):
            lengths[length_bin(len(tokens))] += 1
            counts.update(tokens)
    # Ties are broken by the token, so the same data always keeps the same tokens.
    kept = sorted(counts.items(), key=lambda kv: (-kv[1], repr(kv[0])))[:top_k]
    top: dict[str, int] = {}
    for token, count in kept:
        name = token_name(token)
        top[name] = top.get(name, 0) + count
    return DataProfile(
        rows=len(rows),
        sampled_rows=len(sample),
        tokenizer=tokenizer,
        labels=labels,
        label_names=None if label_names is None else list(label_names),
        lengths=lengths,
        tokens=top,
        other_tokens=sum(counts.values()) - sum(top.values()),
        top_k=top_k,
        run=run,
    )


def js_distance(p: Mapping[Any, float], q: Mapping[Any, float]) -> float:
    """Jensen-Shannon distance (base 2) between two distributions given as counts or weights
    by key, over the union of their keys (a key one lacks weighs 0 there). Both must have a
    positive total."""
    from scipy.spatial.distance import jensenshannon  # type: ignore[import-untyped]  # noqa: PLC0415

    keys = sorted(set(p) | set(q), key=repr)
    a = np.array([float(p.get(k, 0.0)) for k in keys])
    b = np.array([float(q.get(k, 0.0)) for k in keys])
    if (a < 0).any() or (b < 0).any() or a.sum() <= 0 or b.sum() <= 0:
        raise ValueError("distributions need non-negative weights with a positive total")
    value = float(jensenshannon(a, b, base=2))
    # sqrt of a divergence that rounding took a hair below 0 is NaN: that is identical data.
    return 0.0 if math.isnan(value) else min(1.0, value)


@dataclass
class DataDrift:
    """How far this run's training data is from the promoted run's."""

    against_run: int
    score: float | None
    """The largest distance; ``None`` when nothing could be compared (``reason`` says why)."""
    distances: dict[str, float] = field(default_factory=dict)
    """Per distribution: ``labels``, ``lengths``, ``tokens`` (those that could be compared)."""
    notes: list[str] = field(default_factory=list)
    reason: str = ""
    """Why there is no score."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "againstRun": self.against_run,
            "score": None if self.score is None else round(self.score, 6),
            "distances": {k: round(v, 6) for k, v in self.distances.items()},
            "method": DRIFT_METHOD,
            "notes": list(self.notes),
            "reason": self.reason,
        }

    def summary_line(self) -> str:
        """One line for the run log and the validation report."""
        if self.score is None:
            return f"data drift vs promoted run {self.against_run}: not measured: {self.reason}"
        parts = ", ".join(f"{k} {v:.3f}" for k, v in self.distances.items())
        return (
            f"data drift vs promoted run {self.against_run}: {self.score:.3f} "
            f"(Jensen-Shannon distance, 0 = same, 1 = disjoint; {parts})"
        )


def data_drift(current: DataProfile, promoted: DataProfile, against_run: int) -> DataDrift:
    """Compare two profiles (see the module docstring for what is compared and how)."""
    distances: dict[str, float] = {}
    notes: list[str] = []
    if current.labels and promoted.labels and sum(current.labels.values()) and sum(promoted.labels.values()):
        distances["labels"] = js_distance(current.labels, promoted.labels)
    same_units = current.tokenizer == promoted.tokenizer
    if not same_units:
        notes.append(
            f"run {against_run} counted tokens with another vocabulary (another base model?): length and token "
            "distributions are in different units and were not compared"
        )
    else:
        if sum(current.lengths.values()) and sum(promoted.lengths.values()):
            distances["lengths"] = js_distance(current.lengths, promoted.lengths)
        if current.total_tokens and promoted.total_tokens:
            mine: dict[Any, float] = {**current.tokens, _OTHER: current.other_tokens}
            theirs: dict[Any, float] = {**promoted.tokens, _OTHER: promoted.other_tokens}
            distances["tokens"] = js_distance(mine, theirs)
            if current.other_tokens or promoted.other_tokens:
                notes.append(
                    f"tokens: the top {current.top_k} tokens of each run are compared, the rest as one 'other' "
                    "count; a token frequent in one run and rare in the other weighs 0 there, so the distance errs "
                    "upwards a little"
                )
    ordered: dict[str, float] = {k: distances[k] for k in DISTRIBUTIONS if k in distances}
    if not ordered:
        return DataDrift(against_run, None, {}, notes, reason="no distribution could be compared")
    return DataDrift(against_run, max(ordered.values()), ordered, notes)
