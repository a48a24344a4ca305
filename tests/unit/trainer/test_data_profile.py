"""The data profile and the data-drift score on distributions whose distances are known."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from tuneloop_trainer.data import Example
from tuneloop_trainer.data.profile import (
    LENGTH_EDGES,
    DataProfile,
    build_profile,
    data_drift,
    js_distance,
    length_bin,
    tokenizer_fingerprint,
)

pytestmark = pytest.mark.unit

NAMES = ["neg", "pos"]


def words(texts: Sequence[str]) -> list[list[str]]:
    """A whitespace tokenizer: the tokens are the words."""
    return [t.split() for t in texts]


def example(text: str, label: int | None = None, *, uid: str | None = None, replay: bool = False) -> Example:
    fields: dict[str, object] = {"text": text}
    if label is not None:
        fields["label"] = label
    return Example(fields, uid or f"{text}|{label}", replay=replay)


def profile(
    rows: list[Example], *, tokenizer: str = "words", label_names: list[str] | None = NAMES, top_k: int = 50
) -> DataProfile:
    return build_profile(rows, tokenize=words, tokenizer=tokenizer, label_names=label_names, top_k=top_k)


def js_by_formula(p: Sequence[float], q: Sequence[float]) -> float:
    """The Jensen-Shannon distance (base 2) written out, independent of scipy."""
    sp, sq = sum(p), sum(q)
    p = [x / sp for x in p]
    q = [x / sq for x in q]
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

    def kl(a: Sequence[float]) -> float:
        return sum(x * math.log2(x / y) for x, y in zip(a, m, strict=True) if x > 0)

    return math.sqrt((kl(p) + kl(q)) / 2)


def test_js_distance_identical_disjoint_and_a_known_shift() -> None:
    assert js_distance({"a": 3, "b": 1}, {"a": 6, "b": 2}) == 0.0  # counts, not shares: same distribution
    assert js_distance({"a": 1, "b": 1}, {"c": 5, "d": 1}) == pytest.approx(1.0)
    # Half the mass moves from a to c: JSD = 1/2 bit, so the distance is sqrt(1/2).
    shifted = js_distance({"a": 1, "b": 1}, {"b": 1, "c": 1})
    assert shifted == pytest.approx(math.sqrt(0.5)) == pytest.approx(js_by_formula([1, 1, 0], [0, 1, 1]))
    assert js_distance({"a": 9, "b": 1}, {"a": 5, "b": 5}) == pytest.approx(js_by_formula([9, 1], [5, 5]))
    with pytest.raises(ValueError, match="positive total"):
        js_distance({"a": 0}, {"a": 1})


def test_length_bins_are_fixed() -> None:
    assert [length_bin(n) for n in (0, 3, 4, 7, 8, 8191, 8192, 10**6)] == [
        "0-3",
        "0-3",
        "4-7",
        "4-7",
        "8-11",
        "6144-8191",
        "8192+",
        "8192+",
    ]
    assert LENGTH_EDGES[0] == 0 and list(LENGTH_EDGES) == sorted(set(LENGTH_EDGES))


def test_profile_counts_distinct_user_rows_only() -> None:
    rows = [
        example("good day", 1),
        example("good day", 1),  # an oversampled copy: same uid
        example("bad bad night river", 0),
        example("general text from elsewhere", 0, replay=True),
    ]
    got = profile(rows, top_k=2)
    assert got.rows == 2 and got.sampled_rows == 2
    assert got.labels == {"neg": 1, "pos": 1}
    assert got.lengths["0-3"] == 1 and got.lengths["4-7"] == 1 and sum(got.lengths.values()) == 2
    assert got.tokens == {"bad": 2, "day": 1}  # ties broken by the token
    assert got.other_tokens == 3 and got.total_tokens == 6
    assert profile([example("x y", None)], label_names=None).labels is None


def test_profile_samples_by_content_hash_when_large() -> None:
    rows = [example(f"word{i} word", i % 2, uid=f"{i:04x}") for i in range(100)]
    got = build_profile(rows, tokenize=words, tokenizer="words", label_names=NAMES, max_rows=10)
    assert got.rows == 100 and got.sampled_rows == 10
    assert sum(got.labels.values()) == 100  # labels count every row
    assert sum(got.lengths.values()) == 10
    assert got.tokens["word"] == 10


def test_profile_round_trips_and_refuses_what_is_not_one() -> None:
    original = profile([example("good day", 1), example("bad night", 0)])
    back = DataProfile.from_dict(original.to_dict())
    assert back == original
    with pytest.raises(ValueError, match="format"):
        DataProfile.from_dict({**original.to_dict(), "format": "something/2"})
    with pytest.raises(ValueError, match="length bins"):
        DataProfile.from_dict({**original.to_dict(), "lengthEdges": [0, 10]})
    with pytest.raises(ValueError, match="'rows' is not a count"):
        DataProfile.from_dict({**original.to_dict(), "rows": -1})
    with pytest.raises(ValueError, match="not a JSON object"):
        DataProfile.from_dict([1, 2])


def test_drift_of_identical_data_is_zero() -> None:
    rows = [example("good day in the park", 1), example("bad night by the river", 0)]
    drift = data_drift(profile(rows), profile(list(reversed(rows))), against_run=3)
    assert drift.score == 0.0
    assert drift.distances == {"labels": 0.0, "lengths": 0.0, "tokens": 0.0}
    assert drift.to_dict()["againstRun"] == 3


def test_drift_of_disjoint_data_is_one() -> None:
    before = profile([example("good day", 1), example("great fine", 1)])
    after = profile([example("awful rain storm wind cold", 0), example("poor sad grey dull dark", 0)])
    drift = data_drift(after, before, against_run=1)
    assert drift.distances == pytest.approx({"labels": 1.0, "lengths": 1.0, "tokens": 1.0})
    assert drift.score == pytest.approx(1.0)


def test_drift_of_a_known_partial_shift() -> None:
    """Labels 50/50 → 25/75; the same two-word texts, one word of each changed."""
    before = profile([example("a b", 0), example("a c", 0), example("a d", 1), example("a e", 1)])
    after = profile([example("a b", 0), example("a x", 1), example("a d", 1), example("a e", 1)])
    drift = data_drift(after, before, against_run=1)
    assert drift.distances["labels"] == pytest.approx(js_by_formula([1, 3], [2, 2]))
    assert drift.distances["lengths"] == 0.0  # every text is two words, before and after
    # tokens: a:4, b, c, d, e:1 each before; a:4, b, x, d, e:1 each after.
    assert drift.distances["tokens"] == pytest.approx(js_by_formula([4, 1, 1, 1, 1, 0], [4, 1, 0, 1, 1, 1]))
    assert drift.score == max(drift.distances.values()) == drift.distances["tokens"]
    assert f"data drift vs promoted run 1: {drift.score:.3f}" in drift.summary_line()


def test_long_tails_are_compared_through_the_other_bucket() -> None:
    before = profile([example("a a a b c", 0), example("d e", 1)], top_k=1)  # a:3, other: b c d e
    after = profile([example("a a a f g", 0), example("h i", 1)], top_k=1)  # a:3, other: f g h i
    drift = data_drift(after, before, against_run=1)
    assert drift.distances["tokens"] == 0.0  # the same shape at this resolution: a limit, stated
    assert any("top 1 tokens" in note for note in drift.notes)


def test_another_tokenizer_compares_labels_only() -> None:
    rows = [example("good day", 1), example("bad night", 0)]
    drift = data_drift(profile(rows, tokenizer="A"), profile(rows[:1], tokenizer="B"), against_run=2)
    assert set(drift.distances) == {"labels"}
    assert drift.score == drift.distances["labels"] > 0
    assert any("another vocabulary" in note for note in drift.notes)
    no_labels = data_drift(
        profile(rows, tokenizer="A", label_names=None), profile(rows, tokenizer="B", label_names=None), against_run=2
    )
    assert no_labels.score is None and "no distribution" in no_labels.reason
    assert "not measured" in no_labels.summary_line()


def test_tokenizer_fingerprint_follows_the_vocabulary() -> None:
    assert tokenizer_fingerprint({"a": 0, "b": 1}) == tokenizer_fingerprint({"b": 1, "a": 0})
    assert tokenizer_fingerprint({"a": 0, "b": 1}) != tokenizer_fingerprint({"a": 1, "b": 0})


def test_token_ids_are_counted_and_only_the_kept_ones_named() -> None:
    vocabulary = {0: "a", 1: "b", 2: "c"}
    named: list[object] = []

    def name(token: object) -> str:
        named.append(token)
        return vocabulary[int(str(token))]

    got = build_profile(
        [example("one", 0), example("two", 1)],
        tokenize=lambda texts: [[0, 0, 1, 2] for _ in texts],
        token_name=name,
        tokenizer="ids",
        label_names=NAMES,
        top_k=2,
    )
    assert got.tokens == {"a": 4, "b": 2} and got.other_tokens == 2
    assert sorted(map(str, named)) == ["0", "1"]
