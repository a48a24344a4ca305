"""Dockerfiles cannot be built here; these checks parse them for what matters in a cluster."""

from __future__ import annotations

import json
import re

import pytest

from tests.manifests import ROOT

pytestmark = pytest.mark.unit

DOCKERFILES = [ROOT / "trainer_image" / "Dockerfile"]


def instructions(path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_is_pinned_non_root_and_exec_form(path) -> None:
    ins = instructions(path)
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"
    users = [rest for word, rest in ins if word == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]{3,}(:[0-9]+)?", users[-1]), (
        "the last USER must be a numeric non-root UID"
    )
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert entry and isinstance(json.loads(entry[-1]), list), "ENTRYPOINT must be exec form (signals reach Python)"
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "pip install" not in runs or "--constraint" in runs, "pip installs must use constraints.txt"
    assert "curl" not in runs and "wget" not in runs, "no ad-hoc downloads"


def test_trainer_image_runs_the_trainer_module() -> None:
    ins = dict(instructions(ROOT / "trainer_image" / "Dockerfile"))
    assert json.loads(ins["ENTRYPOINT"]) == ["python", "-m", "tuneloop_trainer"]
    assert json.loads(ins["CMD"]) == ["--config", "/etc/tuneloop/job.json"]
