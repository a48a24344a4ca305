"""``dataset.replay``: general-domain rows mixed into each training epoch, drawn afresh per epoch.

An epoch of ``n`` user rows gets ``round(ratio × n / (1 − ratio))`` replay rows, so that replay
is ``ratio`` of the epoch. Each epoch draws its own rows from the pool (without replacement
while the pool is large enough; otherwise every pool row once and the rest repeated), with a
generator seeded by ``hyperparameters.seed`` and the epoch: the same seed gives the same rows,
and a run resumed mid-epoch draws the rows of the epoch it resumes in again, identically.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuneloop_trainer.data.examples import Example


def replay_rows_wanted(ratio: float, n_train: int) -> int:
    """Replay rows per epoch that make them ``ratio`` of it."""
    return round(ratio * n_train / (1 - ratio))


@dataclass
class ReplayMix:
    """The replay pool and how many of its rows each epoch gets."""

    pool: list[Example]
    """Cleaned general-domain rows (held-out content removed), each with ``replay=True``."""
    rows_per_epoch: int
    seed: int

    @property
    def with_replacement(self) -> bool:
        return self.rows_per_epoch > len(self.pool)

    def draw(self, epoch: int) -> list[int]:
        """Indices into :attr:`pool` of the rows epoch ``epoch`` (0-based) trains on."""
        if not self.pool or self.rows_per_epoch <= 0:
            return []
        rng = random.Random(f"{self.seed}:replay:{epoch}")  # noqa: S311 - sampling, not security
        indices = range(len(self.pool))
        if not self.with_replacement:
            return rng.sample(indices, self.rows_per_epoch)
        return [*indices, *rng.choices(indices, k=self.rows_per_epoch - len(self.pool))]


class EpochRows:
    """Which training features each epoch uses: every user row, and that epoch's replay draw.

    Replay rows are tokenized once, for the epochs the run can reach (features ``n_user`` on);
    :meth:`rows` maps an epoch to feature indices."""

    def __init__(self, n_user: int, mix: ReplayMix | None, epochs: int) -> None:
        self.n_user = n_user
        self.mix = mix
        self._draws = {e: mix.draw(e) for e in range(epochs)} if mix is not None else {}
        needed = sorted({i for draw in self._draws.values() for i in draw})
        self.pool_rows: list[int] = needed
        """Pool indices to tokenize, in the order their features follow the user rows'."""
        self._feature = {pool_index: n_user + k for k, pool_index in enumerate(needed)}

    def replay_examples(self) -> list[Example]:
        assert self.mix is not None or not self.pool_rows
        return [self.mix.pool[i] for i in self.pool_rows] if self.mix is not None else []

    def rows(self, epoch: int) -> list[int]:
        """Feature indices of epoch ``epoch``: the user rows, then its replay rows."""
        return [*range(self.n_user), *(self._feature[i] for i in self._draws.get(epoch, []))]
