"""Pytest fixtures for tiny models: built once per session (per xdist worker) and shared.

torch and transformers are imported only when a model is first requested, so registering this
plugin in ``tests/conftest.py`` costs sessions that never use it nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

if TYPE_CHECKING:
    from tests.harness.tiny_models import Family


class TinyModelDirFactory(Protocol):
    def __call__(self, family: Family, *, num_labels: int = 2, seed: int = 0, base_only: bool = False) -> Path: ...


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModelDirFactory:
    """A factory: ``tiny_model_dir("gpt2")`` → a directory holding that tiny model and tokenizer.

    Each distinct ``(family, num_labels, seed, base_only)`` is built once per session and the same
    path is returned afterwards, so treat the directory as read-only (copy it to modify it).
    """
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple[Family, int, int, bool], Path] = {}

    def factory(family: Family, *, num_labels: int = 2, seed: int = 0, base_only: bool = False) -> Path:
        key = (family, num_labels, seed, base_only)
        if key not in built:
            # Imported here: registering this plugin must not cost every test session a torch import.
            from tests.harness.tiny_models import build_tiny_model

            name = f"{family}-labels{num_labels}-seed{seed}{'-base' if base_only else ''}"
            built[key] = build_tiny_model(family, root / name, num_labels=num_labels, seed=seed, base_only=base_only)
        return built[key]

    return factory
