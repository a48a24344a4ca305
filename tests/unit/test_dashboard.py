"""The generated observability files: the dashboard JSON and the metrics reference are what the
generators make now (``python -m observability --check``), and the dashboard has the panels and
variables a platform team looks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from observability import __main__ as cli
from observability import dashboard, metrics_doc
from observability.layout import render_png

pytestmark = pytest.mark.unit


def test_the_committed_dashboard_is_a_fresh_generation() -> None:
    assert cli.DASHBOARD_JSON.read_text() == dashboard.render(), "run `python -m observability` and commit"


def test_the_metrics_reference_in_the_docs_is_a_fresh_generation() -> None:
    text = cli.DOC.read_text()
    assert metrics_doc.BEGIN in text and metrics_doc.END in text
    assert metrics_doc.rewrite(text) == text, "run `python -m observability` and commit"


def test_the_reference_lists_every_family_with_its_labels() -> None:
    section = metrics_doc.reference()
    assert "| `tuneloop_operator_job_phase` | gauge | `namespace`, `finetunejob`, `phase` |" in section
    assert "`tuneloop_trainer_checkpoint_save_seconds_bucket`, `…_sum`, `…_count` | histogram" in section


def test_check_fails_on_drift_and_the_generator_repairs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale_json = tmp_path / "tuneloop.json"
    stale_json.write_text(dashboard.render().replace('"Training loss"', '"Loss (hand-edited)"'))
    doc = tmp_path / "observability.md"
    doc.write_text("# Observability\n\n## Metrics\n\n## Dashboard\n")
    monkeypatch.setattr(cli, "DASHBOARD_JSON", stale_json)
    monkeypatch.setattr(cli, "DOC", doc)
    monkeypatch.setattr(cli, "LAYOUT_PNG", tmp_path / "layout.png")
    assert cli.main(["--check"]) == 1
    assert cli.main([]) == 0
    assert cli.main(["--check"]) == 0
    assert '"Training loss"' in stale_json.read_text()
    assert "## Dashboard" in doc.read_text() and metrics_doc.BEGIN in doc.read_text()
    assert (tmp_path / "layout.png").read_bytes().startswith(b"\x89PNG")


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    board = json.loads(dashboard.render())
    titles = {p["title"] for p in board["panels"]}
    for wanted in (
        "Jobs by phase",
        "Runs by trigger and result",
        "Promoted model (run) per job",
        "Training loss",
        "Evaluation metrics",
        "Tokens per second",
        "ETA",
        "Checkpoint save and upload time",
        "Retries and preemptions",
        "Reconcile latency",
        "Reconcile and heartbeat errors",
        "Triggers by outcome",
        "Promotion decisions",
    ):
        assert wanted in titles
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "namespace", "finetunejob"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${datasource}" and p["targets"] for p in panels)
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)


def test_no_two_panels_overlap_and_all_fit_the_grid() -> None:
    board = json.loads(dashboard.render())
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_the_layout_sketch_draws() -> None:
    assert render_png(json.loads(dashboard.render())).startswith(b"\x89PNG")


def render_chart(values: dict[str, object]) -> list[dict[str, object]]:
    import helm_python
    import yaml

    rendered = helm_python.Chart.load(str(cli.REPO / "helm" / "tuneloop")).render(
        values, name="tuneloop", namespace="tuneloop-system"
    )
    text = rendered.get("tuneloop/templates/monitoring/dashboard-configmap.yaml", "")
    return [d for d in yaml.safe_load_all(text) if d]


def test_the_chart_ships_the_dashboard_for_grafanas_sidecar_only_when_enabled() -> None:
    assert render_chart({}) == []
    (config_map,) = render_chart({"monitoring": {"dashboard": {"enabled": True, "folder": "Fine-tuning"}}})
    metadata = config_map["metadata"]
    assert isinstance(metadata, dict)
    assert metadata["namespace"] == "tuneloop-system"
    assert metadata["labels"]["grafana_dashboard"] == "1"
    assert metadata["annotations"] == {"grafana_folder": "Fine-tuning"}
    data = config_map["data"]
    assert isinstance(data, dict)
    assert json.loads(data["tuneloop.json"]) == json.loads(cli.DASHBOARD_JSON.read_text())
    (moved,) = render_chart(
        {
            "monitoring": {
                "dashboard": {"enabled": True, "namespace": "grafana", "label": {"name": "dash", "value": "x"}}
            }
        }
    )
    assert moved["metadata"]["namespace"] == "grafana"  # type: ignore[index]
    assert moved["metadata"]["labels"]["dash"] == "x"  # type: ignore[index]
    assert "annotations" not in moved["metadata"]  # type: ignore[operator]
