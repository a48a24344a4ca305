"""``dataset.replay.ratio``: each epoch draws its own replay rows, seeded by seed and epoch, so a
resumed run draws the same rows for the epoch it resumes in."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.trainer.test_data_prepare import make_spec, prepare, uri, write_jsonl
from tuneloop_trainer.data.examples import Example
from tuneloop_trainer.data.replay import EpochRows, ReplayMix

pytestmark = pytest.mark.unit


def pool(n: int) -> list[Example]:
    return [Example({"text": f"general {i}"}, f"uid{i}", replay=True) for i in range(n)]


def test_each_epoch_draws_other_rows_and_the_same_again_for_the_same_seed() -> None:
    mix = ReplayMix(pool(100), 10, seed=3)
    draws = [mix.draw(e) for e in range(4)]
    assert all(len(d) == len(set(d)) == 10 for d in draws)  # without replacement
    assert len({tuple(sorted(d)) for d in draws}) == 4  # a new draw per epoch, not one per run
    assert len(set().union(*draws)) > 20  # the epochs together see more of the pool than one draw
    # A resumed run (a new process, new objects) draws the same rows for the same epoch.
    assert [ReplayMix(pool(100), 10, seed=3).draw(e) for e in range(4)] == draws
    assert ReplayMix(pool(100), 10, seed=4).draw(0) != draws[0]


def test_a_small_pool_is_used_whole_then_repeated() -> None:
    mix = ReplayMix(pool(4), 10, seed=0)
    assert mix.with_replacement
    assert sorted(set(mix.draw(0))) == [0, 1, 2, 3] and len(mix.draw(0)) == 10


def test_epoch_rows_keep_every_user_row_and_add_that_epochs_draw() -> None:
    mix = ReplayMix(pool(50), 5, seed=1)
    rows = EpochRows(20, mix, epochs=3)
    replay_examples = rows.replay_examples()
    for epoch in range(3):
        indices = rows.rows(epoch)
        assert indices[:20] == list(range(20)) and len(indices) == 25
        # The features after the user's map back to exactly this epoch's draw.
        drawn = [replay_examples[i - 20].uid for i in indices[20:]]
        assert drawn == [mix.pool[i].uid for i in mix.draw(epoch)]
    assert rows.rows(0)[20:] != rows.rows(1)[20:]
    assert EpochRows(20, None, epochs=3).rows(2) == list(range(20))


def test_prepare_reports_rows_per_epoch(tmp_path: Path) -> None:
    main = write_jsonl(tmp_path / "main.jsonl", [{"text": f"domain text {i}"} for i in range(80)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"general text {i}"} for i in range(60)])
    data = prepare(make_spec(main, "causal-lm", replay={"uri": uri(general), "ratio": 0.2}))
    assert data.replay is not None and data.report.replay is not None
    doc = data.report.to_dict()["replay"]
    assert doc["rowsAdded"] == 20 == data.replay.rows_per_epoch and doc["perEpoch"] and doc["poolRows"] == 60
    assert data.report.sizes["train"] == len(data.train) + 20
