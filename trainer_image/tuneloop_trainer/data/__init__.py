"""The trainer's data pipeline: load, validate, clean and split, with a validation report.

Pure Python (pyarrow for Parquet only): it runs before a model is loaded or a GPU is
touched, so bad data fails a run in seconds rather than after the first checkpoint.
"""

from __future__ import annotations

from tuneloop_trainer.data.clean import normalize_text
from tuneloop_trainer.data.examples import DataValidationError, Example, PreparedData
from tuneloop_trainer.data.pii import PLACEHOLDERS, PiiMatch, find_pii, luhn_valid, mask_pii
from tuneloop_trainer.data.prepare import prepare_data
from tuneloop_trainer.data.report import DROP_REASONS, ValidationReport
from tuneloop_trainer.data.split import split_bucket

__all__ = [
    "DROP_REASONS",
    "PLACEHOLDERS",
    "DataValidationError",
    "Example",
    "PiiMatch",
    "PreparedData",
    "ValidationReport",
    "find_pii",
    "luhn_valid",
    "mask_pii",
    "normalize_text",
    "prepare_data",
    "split_bucket",
]
