"""Facts that live in one place: a copy written elsewhere in the product fails here.

Each test names the fact, its home, and scans the product's Python sources (the core, the
operator, the trainer, benchmarks, tools) for a literal copy. Generated files (crds/, docs/api.md,
deploy/) are checked by their own drift tests (`tuneloop crd --check`, `tools.render_deploy`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tuneloop.contract import Layout
from tuneloop_operator.render import TRAINER_METRICS_PORT

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (
    ROOT / "tuneloop",
    ROOT / "operator" / "tuneloop_operator",
    ROOT / "trainer_image" / "tuneloop_trainer",
    ROOT / "bench",
    ROOT / "tools",
)


def _constants() -> Iterator[tuple[str, int, object]]:
    """(file, line, value) of every literal constant in the product's Python sources."""
    for folder in SOURCES:
        for path in sorted(folder.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant):
                    yield path.relative_to(ROOT).as_posix(), node.lineno, node.value
                elif isinstance(node, ast.JoinedStr):  # an f-string's literal parts
                    for part in node.values:
                        if isinstance(part, ast.Constant):
                            yield path.relative_to(ROOT).as_posix(), node.lineno, part.value


def _places(match: object, *, within: bool = False) -> list[str]:
    """Files and lines holding the literal ``match`` (``within``: a string that contains it)."""
    found = []
    for file, line, value in _constants():
        if type(value) is type(match) and (
            value == match or (within and isinstance(value, str) and str(match) in value)
        ):
            found.append(f"{file}:{line}")
    return sorted(found)


def test_the_trainer_metrics_port_is_written_once() -> None:
    # Home: tuneloop_operator.render.TRAINER_METRICS_PORT; the settings default, the pod template
    # and the benchmarks import it.
    files = {place.split(":")[0] for place in _places(TRAINER_METRICS_PORT)}
    assert files == {"operator/tuneloop_operator/render.py"}


def test_the_chart_default_port_is_the_operator_default() -> None:
    # The Helm chart cannot import Python: its default must equal the operator's.
    values = yaml.safe_load((ROOT / "helm" / "tuneloop" / "values.yaml").read_text(encoding="utf-8"))
    assert values["trainer"]["metricsPort"] == TRAINER_METRICS_PORT


def test_the_checkpoint_layout_is_written_once() -> None:
    # Home: tuneloop.contract.Layout; the trainer's checkpoint manager and the operator import it.
    folder = Layout.checkpoint_folder(42)
    prefix = folder.rstrip("0123456789")
    assert [place for place in _places(prefix, within=True) if not place.startswith("tuneloop/contract.py:")] == []
    assert [
        place for place in _places(Layout.CHECKPOINT_MANIFEST) if not place.startswith("tuneloop/contract.py:")
    ] == []
