"""DP-SGD on the make-run example: does a private run learn the example's signal?

The `make run` job (all-MiniLM-L6-v2, LoRA, the synthetic product reviews of
``tuneloop_trainer.example``) with ``privacy: {targetEpsilon: 8, maxGradNorm: 1}`` and
``method.lora.r: 4`` (``--method`` sets another ``spec.method``, as JSON); class weights are
off (``balance`` is refused with privacy: weights from
the training labels make each row's loss depend on the others). Prints the test accuracy, the
majority-class and linear-probe baselines the run measured itself, and the ε it spent.

    .venv/bin/python bench/dp_example.py --rows 2400 --lr 2e-2 --epochs 6 --batch 256 \
        --method '{"type": "lora", "lora": {"r": 4, "targetModules": ["query", "value"]}}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from tuneloop.api import FineTuneJob
from tuneloop_trainer.example import write_example
from tuneloop_trainer.progress import Sinks
from tuneloop_trainer.recipe import FineTuneRecipe, RunContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2400)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--method", default='{"type": "lora", "lora": {"r": 4}}', help="spec.method as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        m = yaml.safe_load(write_example(root / "example", rows=args.rows).read_text())
        spec = m["spec"]
        spec["hyperparameters"].update({"learningRate": args.lr, "epochs": args.epochs, "batchSize": args.batch})
        spec["method"] = json.loads(args.method)
        spec["dataset"].pop("balance")
        spec["privacy"] = {"targetEpsilon": args.epsilon, "maxGradNorm": 1.0}
        spec["output"] = {"uri": f"file://{root / 'out'}/"}
        job = FineTuneJob.from_manifest(m)
        ctx = RunContext(
            job=job, run=1, output_uri=job.spec.output.uri, work_dir=root / "work", sinks=Sinks([]),
            cache_dir=root / "cache",
        )  # fmt: skip
        started = time.monotonic()
        result = FineTuneRecipe(ctx).run()
        keys = ("accuracy", "f1", "baseline_majority_accuracy", "baseline_probe_accuracy", "gain_over_baseline")
        out = {k: round(float(v), 4) for k, v in result.metrics.items() if k in keys or k == "privacy_epsilon"}
        print(json.dumps({"args": vars(args), "seconds": round(time.monotonic() - started), **out}))


if __name__ == "__main__":
    main()
