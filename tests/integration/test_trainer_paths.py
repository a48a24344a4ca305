"""Paths users rely on, each through a whole `tuneloop run` on tiny models: an hf:// model from a
pre-filled offline cache (and revision pinning), the out-of-domain set and gates on its ``ood_``
metrics, the forgetting check (exit 13 when it fails), fairness per group with its limit, and the
length report in the validation report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.harness.trainer_jobs import manifest, rows_for, run_job, tiny_job, write_jsonl
from tuneloop.contract import ExitCode

pytestmark = pytest.mark.integration

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "out" / "runs" / "1"


def card(tmp_path: Path) -> dict[str, Any]:
    return json.loads((run_dir(tmp_path) / "model-card.json").read_text())


def summary(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "termination-log").read_text())


def hf_cache(tmp_path: Path, model_dir: Path, repo: str) -> Path:
    """HF_HOME holding ``repo`` the way huggingface_hub lays out its cache: the files under
    ``snapshots/<commit>/`` and ``refs/main`` naming that commit."""
    home = tmp_path / "hf-home"
    entry = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, entry / "snapshots" / COMMIT)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)
    return home


@pytest.mark.parametrize("pin", ["none", "revision", "at-suffix"])
def test_hf_model_from_a_prefilled_offline_cache(tiny_model_dir, tmp_path, pin: str) -> None:
    home = hf_cache(tmp_path, tiny_model_dir("bert"), "tiny-org/tiny-bert")
    m = tiny_job("sequence-classification", Path("/unused"), tmp_path, hyperparameters={"epochs": 1})
    m["spec"]["model"] = {"uri": "hf://tiny-org/tiny-bert" + (f"@{COMMIT}" if pin == "at-suffix" else "")}
    if pin == "revision":
        m["spec"]["model"]["revision"] = COMMIT
    result = run_job(m, tmp_path, env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert card(tmp_path)["baseModel"].startswith("hf://tiny-org/tiny-bert")
    assert (run_dir(tmp_path) / "model").is_dir()
    assert "accuracy" in summary(tmp_path)["metrics"]


def test_hf_model_at_a_wrong_revision_fails_clearly(tiny_model_dir, tmp_path) -> None:
    home = hf_cache(tmp_path, tiny_model_dir("bert"), "tiny-org/tiny-bert")
    m = tiny_job("sequence-classification", Path("/unused"), tmp_path)
    m["spec"]["model"] = {"uri": "hf://tiny-org/tiny-bert", "revision": "v9.9"}
    result = run_job(m, tmp_path, env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == ExitCode.UNSUPPORTED_MODEL, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot load model hf://tiny-org/tiny-bert from the local Hugging Face cache (HF_HUB_OFFLINE=1)" in last
    assert "Check the name and revision" in last
    assert "Traceback" not in result.stderr
    assert summary(tmp_path)["reason"] == "UnsupportedModel"


def classification_with_ood(tiny_model_dir, tmp_path, **spec: Any) -> dict[str, Any]:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text"))
    # Another "domain": the same labels, words from elsewhere around the signal word.
    ood = [
        {**r, "text": r["text"].replace("the", "zq").replace("cat", "xv")}
        for r in rows_for("sequence-classification", "text", n=30, seed=5)
    ]
    ood_file = write_jsonl(tmp_path / "ood.jsonl", ood)
    return manifest(
        "sequence-classification",
        tiny_model_dir("bert"),
        data,
        tmp_path / "out",
        evaluation={"outOfDomain": {"uri": f"file://{ood_file}"}},
        **spec,
    )


def test_out_of_domain_metrics_are_reported_and_gated(tiny_model_dir, tmp_path) -> None:
    m = classification_with_ood(
        tiny_model_dir, tmp_path, promotion={"gates": [{"metric": "ood_accuracy", "min": 1.01}]}
    )
    result = run_job(m, tmp_path)
    assert result.returncode == ExitCode.GATE_FAILED, result.stderr[-3000:]
    got = summary(tmp_path)
    for name in ("ood_accuracy", "ood_f1", "ood_precision", "ood_recall", "ood_eval_loss"):
        assert 0 <= got["metrics"][name] < 1e6, name
    assert got["result"] == "GateFailed"
    assert "ood_accuracy" in got["message"]
    (gate,) = got["gates"]
    assert gate == {"metric": "ood_accuracy", "passed": False, "value": got["metrics"]["ood_accuracy"]}
    c = card(tmp_path)
    assert set(c["outOfDomain"]) >= {"ood_accuracy", "ood_f1"}
    assert "### Out of domain" in (run_dir(tmp_path) / "model-card.md").read_text()


def test_a_gate_on_ood_metrics_that_holds_passes(tiny_model_dir, tmp_path) -> None:
    m = classification_with_ood(
        tiny_model_dir,
        tmp_path,
        promotion={"gates": [{"metric": "ood_eval_loss", "max": 1e6}]},
        hyperparameters={"epochs": 1},
    )
    result = run_job(m, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(tmp_path)["gates"][0]["passed"] is True


def forgetting_job(tiny_model_dir, tmp_path, max_increase: float) -> dict[str, Any]:
    # Trained on the test vocabulary; the general-domain text uses other words, whose
    # probability training takes away: the tuned model's perplexity on it rises.
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("causal-lm", "text", n=60))
    general = write_jsonl(
        tmp_path / "general.jsonl",
        [{"text": f"quantum zebra {i} vortex lumen xylophone jasmine orbit kettle"} for i in range(12)],
    )
    return manifest(
        "causal-lm",
        tiny_model_dir("gpt2"),
        data,
        tmp_path / "out",
        method={"type": "full"},
        hyperparameters={"epochs": 3, "learningRate": 1e-2},
        evaluation={"forgetting": {"uri": f"file://{general}", "maxIncrease": max_increase}},
    )


def test_forgetting_beyond_the_limit_exits_13(tiny_model_dir, tmp_path) -> None:
    result = run_job(forgetting_job(tiny_model_dir, tmp_path, 0.0), tmp_path)
    assert result.returncode == ExitCode.GATE_FAILED, result.stderr[-3000:]
    assert "base model perplexity on general-domain data" in result.stdout + result.stderr
    got = summary(tmp_path)
    assert got["result"] == "GateFailed"
    assert got["message"].startswith("not to be promoted: forgetting: general-domain perplexity rose +")
    forgetting = card(tmp_path)["forgetting"]
    base, tuned = forgetting["base"], forgetting["tuned"]
    assert tuned > base > 1
    assert got["metrics"]["forgetting_increase"] == pytest.approx(tuned / base - 1, abs=1e-6)
    assert forgetting["passed"] is False
    assert (run_dir(tmp_path) / "model").is_dir()  # written, just not to be promoted


def test_forgetting_within_the_limit_passes(tiny_model_dir, tmp_path) -> None:
    result = run_job(forgetting_job(tiny_model_dir, tmp_path, 1000.0), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    forgetting = card(tmp_path)["forgetting"]
    assert forgetting["passed"] is True
    assert summary(tmp_path)["metrics"]["forgetting_increase"] == pytest.approx(
        forgetting["tuned"] / forgetting["base"] - 1, abs=1e-6
    )


@pytest.mark.parametrize(("max_gap", "code"), [(0.0, ExitCode.GATE_FAILED), (1.0, 0)])
def test_fairness_per_group_and_its_limit(tiny_model_dir, tmp_path, max_gap: float, code: int) -> None:
    # rows_for gives each row a group "a" or "b". In the test data group "b" holds only rows whose
    # text carries the positive signal, labelled negative: a model that learned the signal fails
    # them all, one that predicts a single class scores 0 or 1 on "b" and 0.5 on "a". No model
    # scores both groups alike.
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text"))
    test_rows = [
        {**r, "label": "neg"} if r["group"] == "b" else r
        for r in rows_for("sequence-classification", "text", n=60, seed=9)
        if r["group"] == "a" or r["label"] == "pos"
    ]
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    m = manifest(
        "sequence-classification",
        tiny_model_dir("bert"),
        data,
        tmp_path / "out",
        dataset={"split": {"validation": 0.2, "testUri": f"file://{test}"}},
        evaluation={"fairness": {"groupColumn": "group", "metric": "accuracy", "maxGap": max_gap}},
        hyperparameters={"epochs": 1},
    )
    result = run_job(m, tmp_path)
    assert result.returncode == code, result.stderr[-3000:]
    fairness = card(tmp_path)["fairness"]
    assert fairness["metric"] == "accuracy"
    assert set(fairness["perGroup"]) == {"a", "b"}
    assert fairness["counts"] == {
        "a": sum(r["group"] == "a" for r in test_rows),
        "b": sum(r["group"] == "b" for r in test_rows),
    }
    gap = max(fairness["perGroup"].values()) - min(fairness["perGroup"].values())
    assert fairness["gap"] == pytest.approx(gap) and gap > 0
    assert summary(tmp_path)["metrics"]["fairness_gap"] == pytest.approx(gap, abs=1e-6)
    assert fairness["passed"] is (code == 0)
    if code:
        assert "fairness:" in summary(tmp_path)["message"]


def test_length_report_and_truncation_warning(tiny_model_dir, tmp_path) -> None:
    rows = rows_for("sequence-classification", "text")
    for r in rows[::4]:  # a quarter of the rows are far past maxSeqLength
        r["text"] = r["text"] + " " + " ".join(["river tree house"] * 30)
    m = tiny_job(
        "sequence-classification",
        tiny_model_dir("bert"),
        tmp_path,
        rows=rows,
        hyperparameters={"epochs": 1, "maxSeqLength": 32},
    )
    result = run_job(m, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir(tmp_path) / "report" / "validation-report.json").read_text())
    lengths = report["lengths"]
    assert lengths["maxSeqLength"] == 32
    train = lengths["splits"]["train"]
    assert train["tokens"]["max"] > 32 and train["truncated"]["rows"] > 0
    assert 0.1 < train["truncated"]["share"] < 0.5
    assert set(lengths["splits"]) == {"train", "validation", "test"}
    console = result.stdout + result.stderr
    assert "lengths (train, tokens): p50 " in console
    assert "warning: maxSeqLength 32 truncates" in console
    assert any(w.startswith("maxSeqLength 32 truncates") for w in report["warnings"])
    md = (run_dir(tmp_path) / "model-card.md").read_text()
    assert "### Lengths" in md and "### Warnings" in md
