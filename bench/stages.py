"""Benchmark: what the trainer's optional stages cost, as a fraction of one training epoch.

Same SST-2 setup as ``classification.py`` (all-MiniLM-L6-v2, full fine-tuning, same
hyperparameters). Two runs of our trainer, each in its own process:

- **stages**: ``evaluation.baselines`` on and ``dataset.labelIssues: report``. Each stage's
  seconds are read from what the run itself records (``model-card.json``: baselines and error
  analysis; ``validation-report.json``: length statistics and label issues) and divided by the
  training time of one epoch (the training steps' own seconds, as in ``classification.py``).
- **dp**: the same job with ``privacy: {targetEpsilon}`` (DP-SGD, Opacus) and the baselines
  off; its training time and accuracy against the stages run's.

    .venv/bin/python bench/stages.py [--epochs 1] [--limit N] [--epsilon 8] [--no-dp]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classification import HP, ours_manifest, prepare
from common import peak_rss_mb, run_child, train_ours


def _find(directory: Path, name: str) -> dict[str, Any]:
    found = sorted(directory.rglob(name))
    if not found:
        raise SystemExit(f"{name} not found under {directory}")
    data: dict[str, Any] = json.loads(found[0].read_text())
    return data


def _get(data: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` present (the JSON files use camelCase; accept snake_case too)."""
    for key in keys:
        if key in data:
            return data[key]
    return None


def run_stages(workdir: Path, epochs: int) -> dict[str, Any]:
    manifest = ours_manifest(workdir, epochs)
    manifest["spec"]["evaluation"]["baselines"] = True
    manifest["spec"]["dataset"]["labelIssues"] = "report"
    result, steps = train_ours(manifest, workdir)
    out = workdir / "ours-out"
    card = _find(out, "model-card.json")
    report = _find(out, "validation-report.json")
    baselines = _get(card, "baselines") or {}
    seconds = dict(baselines.get("seconds") or {})
    issues = _get(report, "labelIssues", "label_issues") or {}
    lengths = _get(report, "lengths") or {}
    analysis = _get(card, "errorAnalysis", "error_analysis") or {}
    probe: dict[str, Any] = next((b for b in baselines.get("baselines", []) if b["name"] == "probe"), {})
    return {
        **steps,
        "dev_accuracy": result.metrics["accuracy"],
        "probe_accuracy": probe.get("metrics", {}).get("accuracy"),
        "label_issues_found": issues.get("found"),
        "label_issues_checked": issues.get("checked"),
        "stage_seconds": {
            "features (one forward pass: train + evaluated split)": seconds.get("features", 0.0),
            "majority baseline": seconds.get("majority", 0.0),
            "probe fit + score": seconds.get("probe", 0.0),
            "label issues (5-fold probe + Cleanlab)": float(issues.get("seconds") or 0.0),
            "length statistics": float(lengths.get("seconds") or 0.0),
            "error analysis": float(analysis.get("seconds") or 0.0),
        },
        "peak_rss_mb": peak_rss_mb(),
    }


def run_dp(workdir: Path, epochs: int, epsilon: float, lr: float | None) -> dict[str, Any]:
    manifest = ours_manifest(workdir, epochs)
    manifest["spec"]["privacy"] = {"targetEpsilon": epsilon}
    if lr is not None:
        manifest["spec"]["hyperparameters"]["learningRate"] = lr
    result, steps = train_ours(manifest, workdir)
    return {
        **steps,
        "dev_accuracy": result.metrics["accuracy"],
        "epsilon": result.metrics.get("privacy_epsilon"),
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training rows")
    parser.add_argument("--epsilon", type=float, default=8.0, help="targetEpsilon of the DP run")
    parser.add_argument("--dp-lr", type=float, default=None, help="learning rate of the DP run (default: the same)")
    parser.add_argument("--no-dp", action="store_true", help="skip the DP run")
    parser.add_argument("--child", choices=("stages", "dp"))
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.child:
        if args.child == "stages":
            result = run_stages(args.workdir, args.epochs)
        else:
            result = run_dp(args.workdir, args.epochs, args.epsilon, args.dp_lr)
        args.result.write_text(json.dumps(result))
        return
    extra = ["--epochs", str(args.epochs), "--epsilon", str(args.epsilon)]
    extra += ["--dp-lr", str(args.dp_lr)] if args.dp_lr is not None else []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.limit)
        stages = run_child(Path(__file__), "stages", workdir, extra)
        dp = None
        if not args.no_dp:
            for name in ("ours-out", "ours-work"):  # the DP run starts afresh
                if (workdir / name).exists():
                    (workdir / name).rename(workdir / f"stages-{name}")
            dp = run_child(Path(__file__), "dp", workdir, extra)
    epoch = stages["train_seconds"] / args.epochs
    print(f"one training epoch: {epoch:.1f} s (training steps only)")
    print(f"{'stage':55}{'seconds':>10}{'of an epoch':>14}")
    for name, seconds in stages["stage_seconds"].items():
        print(f"{name:55}{seconds:>10.2f}{100 * seconds / epoch:>13.1f}%")
    s = stages["stage_seconds"]
    names = list(s)
    probe_and_cleanlab = sum(s[n] for n in names[:4])
    verdict = "met" if probe_and_cleanlab < 0.5 * epoch else "NOT met"
    print(
        f"probe + Cleanlab (features, baselines, label issues): {probe_and_cleanlab:.1f} s = "
        f"{probe_and_cleanlab / epoch:.2f} epoch; target < 0.5 epoch: {verdict}"
    )
    print(
        f"probe accuracy {stages['probe_accuracy']}, fine-tuned {stages['dev_accuracy']:.4f}; label issues "
        f"{stages['label_issues_found']} of {stages['label_issues_checked']} training rows"
    )
    if dp is not None:
        print(f"{'':22}{'non-DP':>12}{'DP':>12}{'ratio':>10}")
        for key, label, fmt in (
            ("train_seconds", "train time (s)", "{:.1f}"),
            ("tokens_per_second", "tokens/s", "{:,.0f}"),
            ("peak_rss_mb", "peak memory (MB)", "{:,.0f}"),
        ):
            print(f"{label:22}{fmt.format(stages[key]):>12}{fmt.format(dp[key]):>12}{dp[key] / stages[key]:>9.2f}x")
        print(f"{'dev accuracy':22}{stages['dev_accuracy']:>12.4f}{dp['dev_accuracy']:>12.4f}")
        lr = args.dp_lr if args.dp_lr is not None else HP["lr"]
        print(f"DP: targetEpsilon {args.epsilon}, spent ε {dp['epsilon']}, learning rate {lr}")
    print(
        f"(SST-2, all-MiniLM-L6-v2, full fine-tuning, {args.epochs} epoch(s), batch {HP['batch_size']}, "
        f"lr {HP['lr']}, seed {HP['seed']}, CPU)"
    )


if __name__ == "__main__":
    main()
