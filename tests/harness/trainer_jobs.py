"""Tiny trainer jobs for the trainer's integration tests: rows, a manifest on a tiny model, and
running it in this process (:func:`run_recipe`) or as a user would (:func:`run_job`).

Every job trains on CPU with small hyperparameters; ``tiny_model_dir`` (the fixture of
:mod:`tests.harness.model_fixtures`) supplies the models.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.manifests import ROOT
from tuneloop.api import FineTuneJob
from tuneloop_trainer.progress import Sinks
from tuneloop_trainer.recipe import FineTuneRecipe, RunContext, RunResult

WORDS = (
    "the cat sat on the mat and the dog ran in the park while a bird sang "
    "good great fine happy bad sad poor awful day night river tree house"
).split()


def rows_for(task: str, layout: str, n: int = 80, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows for ``task`` (and, for causal LM, ``layout``: text, prompt or messages) whose label
    or answer follows the word "good" or "bad" in the text."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        positive = i % 2 == 0
        words.insert(rng.randint(0, len(words)), "good" if positive else "bad")
        text = " ".join(words) + f" {i}"
        if task == "sequence-classification":
            rows.append({"text": text, "label": "pos" if positive else "neg", "group": "a" if i % 3 else "b"})
        elif task == "seq2seq":
            rows.append({"source": text, "target": " ".join(words[:3])})
        elif layout == "prompt":
            rows.append({"prompt": f"Q: {text}\nA:", "completion": " yes" if positive else " no"})
        elif layout == "messages":
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": "yes" if positive else "no"},
                    ]
                }
            )
        else:
            rows.append({"text": text})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FAMILY = {"sequence-classification": "bert", "causal-lm": "gpt2", "seq2seq": "t5"}


def manifest(task: str, model_dir: Path, data: Path, out: Path, layout: str = "text", **spec: Any) -> dict[str, Any]:
    """A small CPU job; each ``spec`` field replaces that field, or (a dict) is merged into it."""
    columns = (
        {
            "prompt": {"prompt": "prompt", "completion": "completion"},
            "messages": {"messages": "messages"},
            "text": {},
        }.get(layout, {})
        if task == "causal-lm"
        else {}
    )
    body: dict[str, Any] = {
        "task": task,
        "model": {"uri": f"file://{model_dir}"},
        "dataset": {
            "uri": f"file://{data}",
            "columns": columns,
            "split": {"validation": 0.15, "test": 0.15},
            "screening": {"pii": "off"},
        },
        "hyperparameters": {"epochs": 2, "batchSize": 8, "maxSeqLength": 48, "learningRate": 5e-3, "seed": 1},
        "output": {"uri": f"file://{out}/"},
        "resources": {"gpus": 0},
    }
    for key, value in spec.items():
        body[key] = value if not isinstance(value, dict) else {**body.get(key, {}), **value}
    return {"apiVersion": "tuneloop.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"}, "spec": body}


def tiny_job(
    task: str,
    model_dir: Path,
    tmp_path: Path,
    layout: str = "text",
    *,
    n: int = 80,
    rows: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """:func:`manifest` of a job on ``rows`` (default: :func:`rows_for` ``n`` rows) written to
    ``tmp_path/d.jsonl``, with its output in ``tmp_path/out``."""
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(task, layout, n=n) if rows is None else rows)
    return manifest(task, model_dir, data, tmp_path / "out", layout, **spec)


def job_file(tmp_path: Path, m: dict[str, Any], name: str = "job.yaml") -> Path:
    """The manifest written as YAML to ``tmp_path/name``."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(m))
    return path


def run_recipe(m: dict[str, Any], tmp_path: Path, *sinks: Any, work_dir: Path | None = None) -> RunResult:
    """Run 1 of the job in this process, reporting to ``sinks``: work and cache in ``tmp_path/work``
    and ``tmp_path/cache``, or in ``work_dir`` and ``work_dir/cache``."""
    job = FineTuneJob.from_manifest(m)
    work, cache = (tmp_path / "work", tmp_path / "cache") if work_dir is None else (work_dir, work_dir / "cache")
    ctx = RunContext(
        job=job,
        run=1,
        output_uri=job.spec.output.uri,
        work_dir=work,
        sinks=Sinks(list(sinks)),
        cache_dir=cache,
    )
    return FineTuneRecipe(ctx).run()


def run_cli(
    args: list[str],
    *,
    module: str = "tuneloop",
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """``python -m module *args``, its output captured (``env``: the whole environment)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
        env=env,
    )


def run_job(
    m: dict[str, Any], tmp_path: Path, *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`tuneloop run job.yaml`, as a user types it (termination message to tmp_path/termination-log;
    ``env`` adds to the environment)."""
    job = job_file(tmp_path, m)
    env = {**os.environ, "TUNELOOP_TERMINATION_LOG": str(tmp_path / "termination-log"), **(env or {})}
    return run_cli(["run", str(job)], env=env)


def wait_for(condition: Callable[[], object], timeout: float) -> None:
    """Poll ``condition`` every 0.1 s until it is true; ``AssertionError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def heartbeat_step(out: Path) -> int:
    """The step of run 1's heartbeat under ``out`` (0 before the first)."""
    try:
        return int(json.loads((out / "runs/1/status.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0
