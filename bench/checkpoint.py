"""Benchmark: checkpoint stall (async vs sync) and commit latency after SIGTERM, against moto S3.

1. Stall per checkpoint, same ~100 MB model state, same moto S3 server, in one process:
   ours (``CheckpointManager.save``: the step loop pays only for the local snapshot, the
   upload runs in the background while training continues) vs the synchronous baseline
   (the same save with ``blocking=True``: snapshot and upload before the next step).
2. Commit latency after SIGTERM: a real trainer process (the same ~100 MB model, full
   fine-tuning) gets SIGTERM mid-run; measured from the signal to the checkpoint's
   manifest being visible in S3. Kubernetes' default grace period is 30 s; target p95 < 25 s.

    .venv/bin/python bench/checkpoint.py [--trials 5] [--saves 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(directory: Path) -> int:
    """A GPT-2-style model of about 100 MB (fp32) with the tiny test tokenizer."""
    from common import save_gpt2

    from tests.harness.tiny_models import build_tiny_tokenizer

    tok = build_tiny_tokenizer("gpt2")
    model = save_gpt2(
        directory,
        tok,
        n_positions=128,
        n_embd=512,
        n_layer=8,
        n_head=8,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return sum(p.numel() * p.element_size() for p in model.parameters())


def stall(endpoint: str, bucket: str, model_dir: Path, saves: int, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from tuneloop.api.spec import Storage as StorageSettings
    from tuneloop.storage import Storage
    from tuneloop_trainer.checkpoints import CheckpointManager, CheckpointState, capture_rng

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (4, 64))

    def train_step() -> float:
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - t0

    def state() -> CheckpointState:
        return CheckpointState(
            tensors={n: p.detach() for n, p in model.named_parameters()},
            objects={"optimizer": optimizer.state_dict(), "rng": capture_rng()},
            meta={"step": 0},
        )

    storage = Storage.for_uri(f"s3://{bucket}/x", StorageSettings(endpoint=endpoint))
    results: dict[str, Any] = {}
    train_step()  # warm up, and create optimizer state so checkpoints are full-size
    for mode in ("sync", "async"):
        manager = CheckpointManager(storage, f"s3://{bucket}/{mode}/checkpoints", work / mode, keep=2)
        stalls, steps = [], []
        for i in range(saves):
            steps.append(train_step())
            t0 = time.perf_counter()
            manager.save(i + 1, state(), blocking=(mode == "sync"))
            stalls.append(time.perf_counter() - t0)
            # Training goes on while the upload runs: 15 steps (~5 s here) between checkpoints.
            for _ in range(15):
                steps.append(train_step())
        manager.close()
        results[mode] = {
            "stall_seconds": statistics.median(stalls),
            "step_seconds": statistics.median(steps),
            "bytes": manager.last_bytes,
            "blocked_per_interval": sum(stalls) / saves,
        }
    results["bounded"] = bounded_stall(
        manager_for=lambda: CheckpointManager(storage, f"s3://{bucket}/bounded/checkpoints", work / "bounded", keep=2),
        train_step=train_step,
        state=state,
        intervals=saves,
    )
    return results


def bounded_stall(manager_for: Any, train_step: Any, state: Any, intervals: int) -> dict[str, Any]:
    """Ours as the trainer's loop runs it: asynchronous uploads under the one-interval bound
    (``recipe.cadence.Cadence``: a snapshot taken early by the last upload's duration, and a
    wait for the upload in flight rather than go one interval past the newest complete
    checkpoint), over the same number of intervals of 16 steps. Reports the loop's blocked time
    per interval (snapshots plus waits), the snapshots taken and the most steps ever at risk."""
    from tuneloop_trainer.recipe.cadence import Cadence

    every = 16
    manager = manager_for()
    cadence = Cadence(every_steps=every, every_seconds=None, durable_time=time.monotonic())
    pending: tuple[int, float] | None = None
    blocked, waits, snapshots, at_risk, recent = 0.0, [], 0, 0, []

    def settle() -> None:
        nonlocal pending
        assert pending is not None
        manager.wait()
        cadence.durable(*pending)
        pending = None

    for step in range(1, intervals * every + 1):
        recent.append(train_step())
        mean = statistics.fmean(recent[-10:])
        t0 = time.perf_counter()
        for _ in range(2):  # as recipe.checkpointing's _checkpoint_and_hold
            if pending is not None and manager.upload_done():
                settle()
            if pending is None and cadence.due(
                step, time.monotonic(), step_seconds=mean, upload_seconds=manager.last_flight_seconds
            ):
                pending = (step, time.monotonic())
                manager.save(step, state())
                snapshots += 1
            if pending is None or cadence.hold(step, time.monotonic(), step_seconds=mean) is None:
                break
            w0 = time.perf_counter()
            settle()
            waits.append(time.perf_counter() - w0)
        blocked += time.perf_counter() - t0
        at_risk = max(at_risk, step - cadence.durable_step)
    manager.close()
    return {
        "blocked_per_interval": blocked / intervals,
        "snapshots": snapshots,
        "waits": waits,
        "max_steps_at_risk": at_risk,
        "every": every,
    }


def sigterm_latency(endpoint: str, bucket: str, model_dir: Path, trials: int, work: Path) -> list[float]:
    import boto3
    import yaml

    from tuneloop_trainer.example import job_manifest

    data = work / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"the cat sat on the mat number {i} today"}) + "\n" for i in range(400))
    )
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    latencies = []
    for trial in range(trials):
        prefix = f"latency/{trial}/"
        manifest = job_manifest(
            "bench-ckpt",
            task="causal-lm",
            model_uri=f"file://{model_dir}",
            dataset={"uri": f"file://{data}", "screening": {"pii": "off"}},
            method={"type": "full"},
            hyperparameters={"epochs": 50, "batchSize": 8, "maxSeqLength": 64, "packing": False},
            storage={"endpoint": endpoint, "addressingStyle": "path"},
            output={"uri": f"s3://{bucket}/{prefix}", "checkpoint": {"everyMinutes": 60}},
        )
        job = work / f"job-{trial}.yaml"
        job.write_text(yaml.safe_dump(manifest))
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneloop_trainer", "run", str(job), "--run", "1"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        status_key = f"{prefix}runs/1/status.json"
        while True:  # wait until training runs (a heartbeat with a step)
            try:
                body = json.loads(client.get_object(Bucket=bucket, Key=status_key)["Body"].read())
                if body.get("step", 0) >= 2:
                    break
            except client.exceptions.NoSuchKey:
                pass
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read() if proc.stderr else "trainer ended early")
            time.sleep(0.2)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        while True:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}runs/1/checkpoints/")
            if any(o["Key"].endswith("/manifest.json") for o in listed.get("Contents", [])):
                latencies.append(time.perf_counter() - t0)
                break
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("no checkpoint within 120 s of SIGTERM")
            time.sleep(0.05)
        proc.wait(timeout=120)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5, help="SIGTERM trials (0: the stall part only)")
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    for key in ("AWS_CA_BUNDLE", "AWS_PROFILE"):
        os.environ.pop(key, None)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "HF_HUB_OFFLINE": "1",
        }
    )
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
            work = Path(tmp)
            size = build_model(work / "model")
            result = stall(endpoint, "bench", work / "model", args.saves, work)
            latencies = sigterm_latency(endpoint, "bench", work / "model", args.trials, work) if args.trials else []
    finally:
        server.stop()
    sync, async_ = result["sync"], result["async"]
    print(
        f"model parameters: {size / 1e6:.0f} MB fp32; checkpoint with optimizer state: "
        f"{async_['bytes'] / 1e6:.0f} MB; moto S3 on 127.0.0.1; 2 CPU cores"
    )
    print(f"{'':34}{'sync (baseline)':>16}{'async (ours)':>14}{'ratio':>8}")
    print(
        f"{'training-loop stall per checkpoint':34}{sync['stall_seconds']:>15.2f}s{async_['stall_seconds']:>13.2f}s"
        f"{async_['stall_seconds'] / sync['stall_seconds']:>7.0%}"
    )
    print(f"{'median training step':34}{sync['step_seconds']:>15.2f}s{async_['step_seconds']:>13.2f}s")
    bounded = result["bounded"]
    print(
        f"as the trainer runs it (async under the one-interval bound, every {bounded['every']} steps): "
        f"loop blocked {bounded['blocked_per_interval']:.2f}s per interval against "
        f"{sync['blocked_per_interval']:.2f}s sync and {async_['blocked_per_interval']:.2f}s unbounded async "
        f"(ratio to sync {bounded['blocked_per_interval'] / sync['blocked_per_interval']:.0%}); "
        f"{bounded['snapshots']} snapshots in {args.saves} intervals; waits at the bound: "
        f"{', '.join(f'{w:.2f}s' for w in bounded['waits']) or 'none'}; most steps at risk "
        f"{bounded['max_steps_at_risk']} (bound {bounded['every']})"
    )
    if not latencies:
        return
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    print(
        f"SIGTERM -> manifest visible in S3 over {len(latencies)} trials: "
        f"{', '.join(f'{x:.1f}s' for x in latencies)}; p50 {statistics.median(latencies):.1f}s, p95 {p95:.1f}s"
    )


if __name__ == "__main__":
    main()
