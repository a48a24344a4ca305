"""dataset.augmentation: the training split only, seeded, order-independent, counted in the report."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tuneloop.api.spec import Augmentation, FineTuneJobSpec
from tuneloop_trainer.augment import augment_examples, augment_training_split, perturb, variants_per_row
from tuneloop_trainer.data import Example, PreparedData, normalize_text, prepare_data

pytestmark = pytest.mark.unit

WORDS = "the quick brown fox jumps over a lazy dog while seven birds sing near the river bank".split()


def fetch(uri: str) -> list[Path]:
    return [Path(uri.removeprefix("file://"))]


def make_spec(data: Path, task: str = "sequence-classification", **augmentation: Any) -> FineTuneJobSpec:
    columns = {"prompt": "prompt", "completion": "completion"} if task == "causal-lm" else {}
    return FineTuneJobSpec.model_validate(
        {
            "task": task,
            "model": {"uri": "hf://org/model"},
            "dataset": {
                "uri": f"file://{data}",
                "columns": columns,
                "split": {"validation": 0.2, "test": 0.2},
                "augmentation": augmentation,
            },
            "hyperparameters": {"seed": 7},
            "output": {"uri": "file:///tmp/out/"},
        }
    )


def rows(n: int, task: str = "sequence-classification") -> list[dict[str, Any]]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))) + f" row{i}"
        if task == "sequence-classification":
            out.append({"text": text, "label": "pos" if i % 2 else "neg"})
        elif task == "seq2seq":
            out.append({"source": text, "target": f"summary {i}"})
        else:
            out.append({"prompt": text, "completion": f" answer {i}"})
    return out


def write(path: Path, data: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def prepared(tmp_path: Path, task: str = "sequence-classification", n: int = 100, **aug: Any) -> PreparedData:
    spec = make_spec(write(tmp_path / "d.jsonl", rows(n, task)), task, **aug)
    data = prepare_data(spec, fetch)
    augment_training_split(spec, data)
    return data


def snapshot(examples: list[Example]) -> list[tuple[str, str]]:
    return [(e.uid, json.dumps(e.fields, sort_keys=True)) for e in examples]


def test_only_the_training_split_grows_and_the_report_counts_the_rows(tmp_path: Path) -> None:
    spec = make_spec(write(tmp_path / "d.jsonl", rows(100)), ratio=1.0)
    plain = prepare_data(spec, fetch)
    train_before, val_before, test_before = list(plain.train), snapshot(plain.validation), snapshot(plain.test)
    fingerprint = plain.fingerprint

    result = augment_training_split(spec, plain)

    assert result is not None
    added = plain.train[len(train_before) :]
    assert plain.train[: len(train_before)] == train_before
    assert len(added) == result.rows_added > 0.9 * len(train_before)
    assert result.rows_added + sum(result.skipped.values()) == len(train_before)  # ratio 1: one try per row
    assert snapshot(plain.validation) == val_before and snapshot(plain.test) == test_before
    assert plain.fingerprint == fingerprint
    report = plain.report.to_dict()
    assert report["augmentation"]["rowsAdded"] == len(added)
    assert report["augmentation"]["sourceRows"] == len(train_before)
    assert report["split"]["sizes"]["train"] == len(plain.train)
    assert any(f"{len(added):,} rows added to train" in line for line in plain.report.summary_lines())
    # Variants keep the label and perturb only the text; none repeats a held-out input.
    originals = {e.fields["text"]: e for e in train_before}
    held = {normalize_text(e.fields["text"]) for e in (*plain.validation, *plain.test)}
    for example in added:
        assert example.fields["text"] not in originals
        assert normalize_text(example.fields["text"]) not in held
        assert example.fields["label"] in (0, 1)


def test_variants_keep_their_source_rows_label(tmp_path: Path) -> None:
    data = prepared(tmp_path, ratio=1.0)
    by_tag = {e.fields["text"].split()[-1]: e.fields["label"] for e in data.train if "row" in e.fields["text"]}
    for example in data.train:
        tags = [w for w in example.fields["text"].split() if w.startswith("row")]
        if len(set(tags)) == 1:  # a deletion may drop the tag; an insertion repeats it
            assert example.fields["label"] == by_tag[tags[0]]


def test_seeded_and_the_same_after_preparing_again(tmp_path: Path) -> None:
    first = snapshot(prepared(tmp_path, ratio=1.5).train)
    again = snapshot(prepared(tmp_path, ratio=1.5).train)  # what a resumed run does
    other_seed = snapshot(prepared(tmp_path, ratio=1.5, seed=99).train)
    assert first == again
    assert first != other_seed


def test_a_rows_variants_do_not_depend_on_row_order() -> None:
    settings = Augmentation(ratio=2.0)
    train = [Example({"text": " ".join(WORDS[i:] + WORDS[:i]), "label": 0}, f"uid{i}") for i in range(20)]
    added, _ = augment_examples(train, [], settings, role="text", seed=3)
    added_reversed, _ = augment_examples(train[::-1], [], settings, role="text", seed=3)
    assert sorted(snapshot(added)) == sorted(snapshot(added_reversed))


def test_fractional_ratio_draws_an_exact_seeded_share() -> None:
    uids = [f"u{i}" for i in range(200)]
    counts = variants_per_row(uids, 0.25, seed=1)
    assert sum(counts.values()) == 50
    assert set(counts.values()) == {0, 1}
    assert counts == variants_per_row(list(reversed(uids)), 0.25, seed=1)
    assert counts != variants_per_row(uids, 0.25, seed=2)
    assert set(variants_per_row(uids, 2.0, seed=1).values()) == {2}


def test_replay_rows_and_oversampled_copies_are_not_augmented() -> None:
    user = Example({"text": "a b c d e f g h", "label": 0}, "u1")
    replay = Example({"text": "general domain text here and there", "label": 0}, "r1", replay=True)
    added, result = augment_examples([user, user, replay], [], Augmentation(ratio=3.0), role="text", seed=0)
    assert result.source_rows == 1
    assert len(added) + sum(result.skipped.values()) == 3
    assert all("general" not in e.fields["text"] for e in added)


def test_variants_equal_to_a_held_out_input_are_left_out() -> None:
    train = [Example({"text": "alpha beta", "label": 0}, "u1")]
    held = [Example({"text": "beta alpha", "label": 1}, "v1")]  # the only possible swap
    added, result = augment_examples(train, held, Augmentation(operations=["swap"]), role="text", seed=0)
    assert added == []
    assert result.skipped == {"held_out": 1}


@pytest.mark.parametrize(
    ("operation", "check"),
    [
        ("swap", lambda before, after: sorted(before) == sorted(after) and before != after),
        ("delete", lambda before, after: len(after) == len(before) - 2 and set(after) <= set(before)),
        ("insert", lambda before, after: len(after) == len(before) + 2 and set(after) == set(before)),
    ],
)
def test_each_operation_changes_strength_share_of_the_words(operation: str, check: Any) -> None:
    text = " ".join(f"w{i}" for i in range(20))
    after = perturb(text, operation, 0.1, random.Random(5)).split()
    assert check(text.split(), after)


def test_single_word_inputs_are_left_unchanged() -> None:
    assert perturb("alone", "swap", 0.5, random.Random(0)) == "alone"
    assert perturb("alone", "delete", 0.5, random.Random(0)) == "alone"


@pytest.mark.parametrize(("task", "role"), [("seq2seq", "source"), ("causal-lm", "prompt")])
def test_generation_tasks_perturb_the_input_and_keep_the_answer(tmp_path: Path, task: str, role: str) -> None:
    data = prepared(tmp_path, task, n=60, ratio=1.0)
    answer = "target" if task == "seq2seq" else "completion"
    originals = {e.fields[answer]: e.fields[role] for e in data.train[: data.report.augmentation["sourceRows"]]}
    added = data.train[len(originals) :]
    assert added
    for example in added:
        assert example.fields[answer] in originals
        assert example.fields[role] != originals[example.fields[answer]]


def test_the_api_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    data = write(tmp_path / "d.jsonl", rows(10))
    with pytest.raises(ValidationError, match="prompt/completion layout"):
        FineTuneJobSpec.model_validate(
            {
                "task": "causal-lm",
                "model": {"uri": "hf://org/model"},
                "dataset": {"uri": f"file://{data}", "augmentation": {}},
                "output": {"uri": "file:///tmp/out/"},
            }
        )
    for bad in ({"ratio": 0}, {"ratio": 17}, {"strength": 0.9}, {"operations": []}, {"method": "wordnet"}):
        with pytest.raises(ValidationError):
            make_spec(data, **bad)
