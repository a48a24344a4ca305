"""Training, validation and test splits, decided by content rather than position.

Each row's split comes from a hash of its content and ``split.seed``, not from its position
or a shuffle, so appending rows never moves an old row into another split: a model
retrained on grown data is never tested on rows it was trained on before. Separate
validation/test sets (``split.validationUri``/``testUri``) replace the hashed share, and
training rows whose content is held out are dropped as leaks.
"""

from __future__ import annotations

import hashlib

from tuneloop.api.spec.data import DatasetSplit
from tuneloop_trainer.data.examples import Kept, qualified
from tuneloop_trainer.data.report import ValidationReport


def split_bucket(seed: int, uid: str) -> float:
    """A row's position in [0, 1), from its content and the split seed only (never its position)."""
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    return int.from_bytes(digest, "big") / 2**256


def split_rows(
    split: DatasetSplit,
    main: list[Kept],
    val_uri: list[Kept] | None,
    test_uri: list[Kept] | None,
    report: ValidationReport,
) -> tuple[list[Kept], list[Kept], list[Kept]]:
    """Train, validation and test rows: the training data by hash, plus the separate sets."""
    v_share = split.validation if val_uri is None else 0.0
    t_share = split.test if test_uri is None else 0.0
    report.split_method = {
        "validation": "uri" if val_uri is not None else "hash",
        "test": "uri" if test_uri is not None else "hash",
    }
    train: list[Kept] = []
    val: list[Kept] = list(val_uri or [])
    test: list[Kept] = list(test_uri or [])
    for kept in main:
        bucket = split_bucket(split.seed, kept.example.uid)
        if bucket < t_share:
            test.append(kept)
        elif bucket < t_share + v_share:
            val.append(kept)
        else:
            train.append(kept)
    return train, val, test


def drop_leaks(rows: list[Kept], held_out: list[Kept], report: ValidationReport, source: str) -> list[Kept]:
    """Drop rows whose content (label aside) is also held out: a separate validation/test
    set that overlaps training measures memory, not generalisation."""
    if not rows or not held_out:
        return rows
    held: dict[str, str] = {}
    for k in held_out:
        held.setdefault(k.content, qualified(k.source, k.ref))
    src = report.sources[source]
    kept: list[Kept] = []
    for k in rows:
        twin = held.get(k.content)
        if twin is not None:
            src.drop("leak", k.ref, f"same as {twin}")
        else:
            kept.append(k)
    src.kept -= len(rows) - len(kept)
    return kept
