"""The wheel that the images install (`pip install .`) carries every module of the three packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "tuneloop": ROOT / "tuneloop",
    "tuneloop_operator": ROOT / "operator" / "tuneloop_operator",
    "tuneloop_trainer": ROOT / "trainer_image" / "tuneloop_trainer",
}


def _sources() -> set[str]:
    """Every .py file and py.typed marker of the packages, as paths inside the wheel."""
    found: set[str] = set()
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix == ".py" or path.name == "py.typed":
                found.add(f"{name}/{path.relative_to(folder).as_posix()}")
    return found


def test_the_wheel_holds_every_module_of_every_subpackage(tmp_path: Path) -> None:
    # A wheel built from the files the Dockerfiles copy, as they build it; subpackages
    # (tuneloop.api, tuneloop.storage, the planner, the trainer's data pipeline, ...) must be in it.
    # Built from a copy, so that setuptools' build/ and egg-info stay out of the checkout.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in PACKAGES.values():
        shutil.copytree(folder, source / folder.relative_to(ROOT), ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("tuneloop-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if not name.startswith("tuneloop-")}
    missing = sorted(_sources() - shipped)
    assert not missing, f"{len(missing)} files left out of the wheel, e.g. {missing[:5]}"
