"""Shared helpers of the benchmarks: SST-2 data, child processes, peak memory."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def read_sst2(split: str) -> list[tuple[str, int]]:
    """SST-2 rows as (sentence, label); ``split`` is ``train`` or ``dev``."""
    rows = []
    for line in (SST2 / f"{split}.tsv").read_text().splitlines():
        if not line.strip():
            continue
        text, label = line.rsplit("\t", 1)
        rows.append((text, int(label)))
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, mode: str, workdir: Path, extra: list[str] | None = None) -> dict[str, Any]:
    """Run one side of a benchmark in its own process (so peak memory is its own)."""
    out = workdir / f"{mode}.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(script), "--child", mode, "--workdir", str(workdir), "--result", str(out)]
    subprocess.run(cmd + (extra or []), check=True, env=env)
    result: dict[str, Any] = json.loads(out.read_text())
    return result
