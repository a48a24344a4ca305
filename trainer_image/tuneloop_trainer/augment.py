"""Augmentation of the training split (``dataset.augmentation``): more rows from the same rows.

EDA-style (Wei and Zou, 2019, "Easy Data Augmentation"): a new row is a copy of a training row
whose input has a few words swapped, deleted, or repeated at another place. EDA's fourth
operation, synonym replacement, needs WordNet, which is a separate download that trainer pods
cannot make, so it is left out. nlpaug was considered: its random word augmenter does the same
offline, but its last release is from 2022, it pulls in pandas, requests and gdown, and it draws
from the process-wide ``random`` state, which would change the training order's random stream
and make variants depend on row order. The operations here are a few lines each.

Only the training split is augmented (never validation, test, out-of-domain or replay rows),
and only the input a model reads: a classifier's ``text``, a seq2seq ``source``, a causal LM's
``prompt``. Labels, targets and completions stay as written.

Determinism: each variant is drawn from a generator seeded by the seed, the row's content hash
and the variant's number, so a row's variants do not depend on the order of the rows or on any
other state, and a resumed run (which prepares its data again) trains on the same rows.
A variant that changes nothing, repeats another row of the training split, or equals a held-out
row's input (a leak into evaluation) is not added; the report counts each.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from tuneloop.api.spec import Augmentation, FineTuneJobSpec
from tuneloop_trainer.data import Example, PreparedData, normalize_text

#: Input role perturbed, per task (causal-lm: the prompt of a prompt/completion layout).
AUGMENTED_ROLE: Final[dict[str, str]] = {
    "sequence-classification": "text",
    "seq2seq": "source",
    "causal-lm": "prompt",
}


@dataclass
class AugmentationResult:
    """What an augmentation did: the settings, and how many rows it added or left out and why."""

    method: str
    role: str
    ratio: float
    strength: float
    seed: int
    source_rows: int
    """Distinct training rows it drew from (replay rows and oversampled copies aside)."""
    rows_added: int = 0
    by_operation: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    """Variants not added: ``unchanged`` (too few words to change), ``duplicate`` (the same as
    a training row or another variant), ``held_out`` (the same as a validation, test or
    out-of-domain input)."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "role": self.role,
            "ratio": self.ratio,
            "strength": self.strength,
            "seed": self.seed,
            "sourceRows": self.source_rows,
            "rowsAdded": self.rows_added,
            "byOperation": dict(sorted(self.by_operation.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "seconds": round(self.seconds, 3),
        }

    def summary_line(self) -> str:
        ops = ", ".join(f"{k} {v:,}" for k, v in sorted(self.by_operation.items()))
        line = (
            f"augmentation ({self.method}, ratio {self.ratio:g}, seed {self.seed}): {self.rows_added:,} rows added "
            f"to train from {self.source_rows:,}" + (f" ({ops})" if ops else "")
        )
        if self.skipped:
            line += "; not added: " + ", ".join(f"{v:,} {k.replace('_', '-')}" for k, v in sorted(self.skipped.items()))
        return line + f"; {self.seconds:.2f} s"


def perturb(text: str, operation: str, strength: float, rng: random.Random) -> str:
    """``text`` with ``operation`` applied to ``max(1, round(strength × words))`` words.

    Words are split at whitespace and joined with single spaces. ``swap`` exchanges two words
    at distinct positions that many times; ``delete`` removes that many words but always keeps
    one; ``insert`` puts a copy of a random word of the text at a random position that many
    times. A text with too few words for the operation comes back unchanged."""
    words = text.split()
    n = max(1, round(strength * len(words)))
    if operation == "swap":
        if len(words) < 2:
            return text
        for _ in range(n):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    elif operation == "delete":
        if len(words) < 2:
            return text
        drop = set(rng.sample(range(len(words)), min(n, len(words) - 1)))
        words = [w for i, w in enumerate(words) if i not in drop]
    elif operation == "insert":
        if not words:
            return text
        for _ in range(n):
            words.insert(rng.randint(0, len(words)), rng.choice(words))
    else:
        raise ValueError(f"unknown augmentation operation {operation!r}; known: swap, delete, insert")
    return " ".join(words)


def variants_per_row(uids: Sequence[str], ratio: float, seed: int) -> dict[str, int]:
    """How many variants each distinct row gets: ``floor(ratio)`` each, plus one for the
    ``round(frac(ratio) × rows)`` rows that come first in a seeded order of their content
    hashes (exact counts, independent of the rows' order)."""
    whole = math.floor(ratio)
    counts = dict.fromkeys(uids, whole)
    extra = round((ratio - whole) * len(uids))
    if extra:
        ranked = sorted(uids, key=lambda uid: hashlib.sha256(f"{seed}:augment-pick:{uid}".encode()).digest())
        for uid in ranked[:extra]:
            counts[uid] += 1
    return counts


def augment_examples(
    train: Sequence[Example],
    held_out: Iterable[Example],
    settings: Augmentation,
    *,
    role: str,
    seed: int,
) -> tuple[list[Example], AugmentationResult]:
    """The new rows for ``train`` (to append to it) and the report; ``train`` is not changed."""
    started = time.monotonic()
    distinct: dict[str, Example] = {}
    for example in train:
        if not example.replay and example.uid not in distinct and isinstance(example.fields.get(role), str):
            distinct[example.uid] = example
    result = AugmentationResult(
        settings.method, role, settings.ratio, settings.strength, seed, source_rows=len(distinct)
    )
    taken = {normalize_text(e.fields[role]) for e in distinct.values()}
    held = {normalize_text(str(e.fields[role])) for e in held_out if isinstance(e.fields.get(role), str)}
    operations = list(dict.fromkeys(settings.operations))
    added: list[Example] = []
    for uid, count in variants_per_row(list(distinct), settings.ratio, seed).items():
        example = distinct[uid]
        original = str(example.fields[role])
        for k in range(count):
            rng = random.Random(f"{seed}:augment:{uid}:{k}")  # noqa: S311 - data augmentation, not security
            operation = rng.choice(operations)
            text = perturb(original, operation, settings.strength, rng)
            key = normalize_text(text)
            if text == original or key == normalize_text(original):
                result.skipped["unchanged"] += 1
                continue
            if key in held:
                result.skipped["held_out"] += 1
                continue
            if key in taken:
                result.skipped["duplicate"] += 1
                continue
            taken.add(key)
            fields = {**example.fields, role: text}
            new_uid = hashlib.sha256(
                json.dumps({"augmented": fields}, sort_keys=True, ensure_ascii=False).encode()
            ).hexdigest()
            added.append(Example(fields, new_uid, example.group, slices=dict(example.slices)))
            result.by_operation[operation] += 1
    result.rows_added = len(added)
    result.seconds = time.monotonic() - started
    return added, result


def augment_training_split(spec: FineTuneJobSpec, data: PreparedData) -> AugmentationResult | None:
    """Apply ``spec.dataset.augmentation`` to ``data.train`` in place (new rows appended) and
    record it in the validation report; ``None`` when augmentation is off."""
    settings = spec.dataset.augmentation
    if settings is None:
        return None
    seed = settings.seed if settings.seed is not None else spec.hyperparameters.seed
    added, result = augment_examples(
        data.train,
        [*data.validation, *data.test, *data.out_of_domain],
        settings,
        role=AUGMENTED_ROLE[spec.task],
        seed=seed,
    )
    data.train.extend(added)
    report = data.report
    report.sizes["train"] = report.sizes.get("train", 0) + len(added)
    report.augmentation = result.to_dict()
    report.augmentation_line = result.summary_line()
    return result
