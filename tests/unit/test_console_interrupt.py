"""Ctrl-C while Python imports the ``tuneloop`` command ends with exit 130 and one line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

_ROOT = Path(__file__).resolve().parents[2]


def _run_console(tmp_path: Path, interrupt_on: str | None) -> subprocess.CompletedProcess[str]:
    """Run the console script's entry point; ``interrupt_on`` names a module whose import gets a Ctrl-C."""
    hook = tmp_path / "hook"
    hook.mkdir()
    if interrupt_on is not None:
        # A meta-path finder that raises KeyboardInterrupt when the named module is imported:
        # the Ctrl-C lands at a known point of the command's import instead of a random one.
        (hook / "sitecustomize.py").write_text(
            textwrap.dedent(
                f"""
                import sys

                class _Interrupt:
                    def find_spec(self, name, path=None, target=None):
                        if name == {interrupt_on!r}:
                            raise KeyboardInterrupt
                        return None

                sys.meta_path.insert(0, _Interrupt())
                """
            )
        )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(_ROOT)])}
    code = "import sys; from tuneloop.console import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, "--version"], check=False, capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize("module", ["tuneloop.cli", "tuneloop.validate", "pydantic"])
def test_ctrl_c_while_importing_the_command_exits_130_without_traceback(tmp_path: Path, module: str) -> None:
    done = _run_console(tmp_path, interrupt_on=module)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == "interrupted"


def test_the_entry_point_runs_the_command(tmp_path: Path) -> None:
    done = _run_console(tmp_path, interrupt_on=None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tuneloop ")


def test_the_console_script_is_the_guarded_entry_point() -> None:
    import tomllib

    scripts = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tuneloop"] == "tuneloop.console:main"
