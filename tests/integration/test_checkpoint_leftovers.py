"""Partial checkpoints newer than the last save: kept while training may still replace them,
removed once training has ended (found by the reliability suite, scenario 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_checkpoints import Backend, backend, manager, tiny_state

__all__ = ["backend"]  # the fixture, imported to be used here

pytestmark = pytest.mark.integration


def test_remove_incomplete_drops_every_partial_checkpoint_and_keeps_complete_ones(
    backend: Backend, tmp_path: Path
) -> None:
    mgr = manager(backend, tmp_path, keep=2)
    mgr.save(4, tiny_state(4), blocking=True)
    mgr.save(8, tiny_state(8), blocking=True)
    # What killed attempts leave: data files without a manifest (newer than the last save, where
    # retention leaves them for the next save of that step), and a manifest missing a file.
    backend.put("step-00000010/model.safetensors", b"half an upload")
    mgr.save(12, tiny_state(12), blocking=True)
    backend.put("step-00000013/model.safetensors", b"a SIGTERM checkpoint cut short")
    for name in ("model.safetensors", "meta.json", "manifest.json"):
        backend.put(f"step-00000014/{name}", backend.get(f"step-00000012/{name}"))
    assert backend.steps() == ["step-00000008", "step-00000012", "step-00000013", "step-00000014"]
    assert [c.step for c in mgr.complete()] == [8, 12]

    assert mgr.remove_incomplete() == [13, 14]
    assert backend.steps() == ["step-00000008", "step-00000012"]
    loaded = mgr.load()
    assert loaded is not None and loaded[0].step == 12
    assert mgr.remove_incomplete() == []
