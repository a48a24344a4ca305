"""The distributed launcher keeps the trainer's exit-code contract (torchrun alone ends with 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.operator import free_port
from tuneloop_trainer.launch import exit_code_for

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([0, 0], 0),
        ([1, 11], 11),  # a permanent code of any worker wins: not retried
        ([143, 13], 13),
        ([-9, 0], 137),  # a worker killed by SIGKILL: retryable, as a pod would report it
        ([143, 143], 143),
        ([0, 2], 2),
    ],
)
def test_the_pods_exit_code_follows_the_contract(codes: list[int], expected: int) -> None:
    assert exit_code_for(codes) == expected


WORKER = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
mode = os.environ["MODE"]
if mode == "permanent" and rank == 1:
    sys.exit(11)
if mode == "term":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    open(os.path.join(os.environ["READY_DIR"], str(rank)), "w").close()
    time.sleep(60)
time.sleep(0.5)
"""


def launch(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    # The flags the operator renders (see render.trainer_command), on one node.
    argv = [
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "--max-restarts=0",
        "--shutdown-timeout=55",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "tuneloop_trainer.launch", *argv, str(script)],
        env={**os.environ, "MODE": mode, "READY_DIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.integration
def test_a_permanent_worker_exit_is_the_launchers_exit(tmp_path: Path) -> None:
    proc = launch(tmp_path, "permanent")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 11, out[-2000:]


@pytest.mark.integration
def test_sigterm_reaches_the_workers_and_ends_with_143(tmp_path: Path) -> None:
    proc = launch(tmp_path, "term")
    deadline = time.monotonic() + 60
    while not ((tmp_path / "0").exists() and (tmp_path / "1").exists()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:]
    assert "stopped by SIGTERM" in out
