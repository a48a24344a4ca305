"""The cleaning rules every source goes through: label ids, ``minChars``, PII screening,
duplicates and ``maxTokens``, in that order (cheap checks first; tokens are counted only for
rows that survive everything else).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from tuneloop.api.spec.data import DataCleaning
from tuneloop_trainer.data.decode import TEXT_ROLES, Row
from tuneloop_trainer.data.examples import DataValidationError, Example, Kept, qualified
from tuneloop_trainer.data.labels import Labels, label_problem
from tuneloop_trainer.data.pii import PLACEHOLDERS, mask_pii
from tuneloop_trainer.data.report import ValidationReport

#: How many row references an error message lists.
MAX_REFS_IN_ERROR: Final = 10

_PUNCTUATION = re.compile(r"[^\w\s]|_")
_WHITESPACE = re.compile(r"\s+")


class Cleaner:
    """Cleans the rows of each source the same way, recording drops in the report; rows with
    personal data under ``screening.pii: fail`` are collected across every source first, so
    :meth:`fail_on_pii` can name them all at once."""

    def __init__(
        self,
        cleaning: DataCleaning,
        pii_action: str,
        report: ValidationReport,
        count_tokens: Callable[[Example], int] | None,
    ) -> None:
        self.cleaning = cleaning
        self.pii_action = pii_action
        self.report = report
        self.count_tokens = count_tokens
        self.pii_refs: list[str] = []
        self.pii_kinds: Counter[str] = Counter()
        self._length_rule = count_tokens is not None and cleaning.max_tokens is not None

    def clean(self, name: str, rows: list[Row], labels: Labels | None) -> list[Kept]:
        """Labels to ids, minChars, PII, duplicates, maxTokens, in that order."""
        src = self.report.sources[name]
        dedupe = self.cleaning.dedupe
        min_chars = self.cleaning.min_chars
        seen_exact: dict[str, str] = {}
        seen_normalized: dict[str, str] = {}
        kept: list[Kept] = []
        for row in rows:
            fields = row.fields
            label_name: str | None = None
            if labels is not None and row.label is not None:
                label_name = labels.canonical(row.label)
                if label_name is None:
                    src.drop("unknown_label", row.ref, label_problem(row.label, "is not a class id (ids start at 0)"))
                    continue
                if label_name not in labels.seen:
                    src.drop("unknown_label", row.ref, label_problem(label_name, "is not among the training labels"))
                    continue
            if min_chars is not None:
                length = len(_input_text(fields).strip())
                if length < min_chars:
                    src.drop("too_short", row.ref, f"{length} chars")
                    continue
            if self.pii_action != "off":
                masked, kinds = _mask_fields(fields)
                if kinds:
                    self.report.pii.add(qualified(name, row.ref), dict(kinds))
                    if self.pii_action == "drop":
                        src.drop("pii", row.ref, ", ".join(sorted(kinds)))
                        continue
                    if self.pii_action == "fail":
                        self.pii_refs.append(qualified(name, row.ref))
                        self.pii_kinds.update(kinds)
                        continue
                    fields = masked
            keyed = dict(fields)
            if label_name is not None:
                keyed["label"] = label_name
            exact = _canonical(keyed)
            folded = _normalized_fields(fields) if dedupe == "normalized" else fields
            content = _canonical(folded)
            if dedupe != "off":
                first = seen_exact.get(exact)
                if first is not None:
                    src.drop("duplicate_exact", row.ref, f"same as {first}")
                    continue
                if dedupe == "normalized":
                    normalized = content if label_name is None else _canonical({**folded, "label": label_name})
                    first = seen_normalized.get(normalized)
                    if first is not None:
                        src.drop("duplicate_normalized", row.ref, f"same as {first}")
                        continue
                    seen_normalized[normalized] = row.ref
                seen_exact[exact] = row.ref
            out_fields = dict(fields)
            if labels is not None and label_name is not None:
                out_fields["label"] = labels.id_of(label_name)
            example = Example(out_fields, hashlib.sha256(exact.encode()).hexdigest(), row.group, slices=row.slices)
            if self._length_rule:
                assert self.count_tokens is not None and self.cleaning.max_tokens is not None
                n_tokens = self.count_tokens(example)
                if n_tokens > self.cleaning.max_tokens:
                    src.drop("too_long", row.ref, f"{n_tokens} tokens")
                    continue
            kept.append(Kept(row.ref, example, name, content))
        src.kept = len(kept)
        return kept

    def fail_on_pii(self) -> None:
        """Raise naming every row with personal data, when ``screening.pii`` is ``fail``."""
        if not self.pii_refs:
            return
        n = len(self.pii_refs)
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.pii_kinds.items()))
        refs = ", ".join(self.pii_refs[:MAX_REFS_IN_ERROR]) + (
            f", … ({n - MAX_REFS_IN_ERROR} more)" if n > MAX_REFS_IN_ERROR else ""
        )
        placeholders = ", ".join(PLACEHOLDERS.values())
        raise DataValidationError(
            f"personal data found in {n} row{'s' if n != 1 else ''} ({kinds}) and dataset.screening.pii is fail: "
            f"{refs}; set dataset.screening.pii to mask (replace finds with {placeholders}) or drop "
            "(remove those rows), or remove the data at its source",
            self.report,
        )


def normalize_text(text: str) -> str:
    """The ``dedupe: normalized`` form: compatibility-folded, case-folded, punctuation
    removed and whitespace collapsed, so "Great movie!" and "great  movie" are one row."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _WHITESPACE.sub(" ", _PUNCTUATION.sub(" ", folded)).strip()


def _input_text(fields: dict[str, Any]) -> str:
    """What ``cleaning.minChars`` measures: the model's input (``text``, ``source``, a prompt with
    its completion, or a conversation's contents)."""
    if "messages" in fields:
        return "\n".join(m["content"] for m in fields["messages"])
    if "source" in fields:
        return str(fields["source"])
    if "prompt" in fields:
        return f"{fields['prompt']}{fields['completion']}"
    return str(fields.get("text", ""))


def _mask_fields(fields: dict[str, Any]) -> tuple[dict[str, Any], Counter[str]]:
    """Every text field (and every message's content) masked; labels are never screened."""
    found: Counter[str] = Counter()
    out: dict[str, Any] = {}
    for role, value in fields.items():
        if role == "messages":
            new_messages = []
            for m in value:
                content, kinds = mask_pii(m["content"])
                found.update(kinds)
                new_messages.append({"role": m["role"], "content": content})
            out[role] = new_messages
        elif role in TEXT_ROLES:
            text, kinds = mask_pii(value)
            found.update(kinds)
            out[role] = text
        else:
            out[role] = value
    return out, found


def _canonical(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _normalized_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role, value in fields.items():
        if role == "messages":
            out[role] = [{"role": m["role"], "content": normalize_text(m["content"])} for m in value]
        elif role in TEXT_ROLES:
            out[role] = normalize_text(value)
        else:
            out[role] = value
    return out
