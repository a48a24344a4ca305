"""`tuneloop run` as a process: signals reach the trainer once, its exit code comes back, it
never outlives the CLI, and a manifest that cannot run exits 10 (the documented code).

The signal tests run the CLI's process handling with a small stand-in trainer that records the
signals it receives; tests/integration/test_trainer_exits.py does the same with the real trainer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.manifests import ROOT, minimal_job

pytestmark = pytest.mark.unit

#: A stand-in trainer: records every SIGTERM/SIGINT it gets for a moment after the first one,
#: says so on stderr, exits 128+signal like the real trainer.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    pid_file, record = sys.argv[1], sys.argv[2]
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # a duplicate signal would arrive now
    names = ",".join(signal.Signals(s).name for s in got)
    with open(record, "w") as f:
        f.write(names)
    print(f"stand-in trainer stopped on {names}", file=sys.stderr)
    sys.exit(128 + got[0] if got else 0)
    """
)

#: The CLI's process handling, running the stand-in as its trainer.
PARENT = textwrap.dedent(
    """
    import sys
    from tuneloop.cli import run_trainer
    sys.exit(run_trainer([sys.executable, *sys.argv[1:]]))
    """
)


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[list[str], Path, Path]]:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    pid_file, record = tmp_path / "child.pid", tmp_path / "record"
    command = [sys.executable, "-c", PARENT, str(child), str(pid_file), str(record)]
    yield command, pid_file, record
    if pid_file.exists():  # never leave a stand-in behind, whatever the test did
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead, only not yet reaped (by init, once its parent is gone).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def start(command: list[str], **kwargs) -> subprocess.Popen[str]:
    return subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kwargs)


def test_sigterm_to_the_cli_is_passed_to_the_trainer_and_its_exit_code_returned(stand_in) -> None:
    command, pid_file, record = stand_in
    parent = start(command)
    wait_for(pid_file.exists)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    _out, err = parent.communicate(timeout=30)
    assert parent.returncode == 143, err
    assert record.read_text() == "SIGTERM"
    assert not alive(child)
    assert err.count("stopped on SIGTERM") == 1


def test_ctrl_c_reaches_the_trainer_once_and_is_reported_once(stand_in) -> None:
    """A terminal sends SIGINT to the whole foreground process group: CLI and trainer."""
    command, pid_file, record = stand_in
    parent = start(command, start_new_session=True)  # its own process group, like a shell job
    wait_for(pid_file.exists)
    os.killpg(parent.pid, signal.SIGINT)
    _out, err = parent.communicate(timeout=30)
    assert parent.returncode == 130, err
    assert record.read_text() == "SIGINT"  # once, through the CLI: not also from the terminal
    assert err.count("stopped on SIGINT") == 1
    assert "interrupted" not in err
    assert "Traceback" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_the_trainer_does_not_outlive_a_killed_cli(stand_in) -> None:
    command, pid_file, record = stand_in
    parent = start(command)
    wait_for(pid_file.exists)
    child = int(pid_file.read_text())
    parent.kill()
    parent.communicate(timeout=30)
    wait_for(lambda: not alive(child))
    assert record.read_text() == "SIGTERM"  # asked to stop (and checkpoint), not killed outright


def test_a_trainer_killed_by_a_signal_is_reported_with_the_shell_code(tmp_path: Path) -> None:
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    result = subprocess.run(
        [sys.executable, "-c", PARENT, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 128 + signal.SIGKILL
    assert "the trainer was killed by SIGKILL" in result.stderr


# --- exit codes of `tuneloop run` before the trainer starts -------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuneloop", *args], capture_output=True, text=True, cwd=ROOT, check=False, timeout=60
    )


def test_run_exits_10_for_an_invalid_manifest(tmp_path: Path) -> None:
    m = minimal_job()
    m["spec"]["hyperparameters"] = {"epochs": 0}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(m))
    result = run_cli("run", str(job))
    assert result.returncode == 10
    assert "spec.hyperparameters.epochs" in result.stderr


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "no such file"),
        ("spec: [unclosed\n", "invalid YAML at line"),
        (b"\x89PNG\r\n\x1a\n\xff", "not UTF-8"),
        ("apiVersion: v1\nkind: ConfigMap\n", "'ConfigMap' is not a FineTuneJob"),
    ],
    ids=["missing", "malformed", "binary", "no-job"],
)
def test_run_exits_10_for_an_unreadable_manifest(tmp_path: Path, content: str | bytes | None, words: str) -> None:
    job = tmp_path / "job.yaml"
    if isinstance(content, bytes):
        job.write_bytes(content)
    elif content is not None:
        job.write_text(content)
    result = run_cli("run", str(job))
    assert result.returncode == 10, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_run_exits_10_for_two_jobs_in_one_file(tmp_path: Path) -> None:
    job = tmp_path / "jobs.yaml"
    job.write_text(yaml.safe_dump_all([minimal_job(name="a"), minimal_job(name="b")]))
    result = run_cli("run", str(job))
    assert result.returncode == 10
    assert "exactly one FineTuneJob (found 2)" in result.stderr


def test_run_help_says_output_takes_uris() -> None:
    result = run_cli("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "s3://" in text and "file://" in text
    assert "130 stopped by Ctrl-C" in text
