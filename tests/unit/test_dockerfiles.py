"""Dockerfiles cannot be built here; these checks parse them for what matters in a cluster."""

from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from fnmatch import fnmatchcase
from importlib import metadata
from pathlib import PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement

from tests.manifests import ROOT

pytestmark = pytest.mark.unit

OPERATOR_DOCKERFILE = ROOT / "Dockerfile"
DOCKERFILES = [OPERATOR_DOCKERFILE, ROOT / "trainer_image" / "Dockerfile"]


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


def test_operator_image_runs_the_operator_module() -> None:
    ins = instructions(OPERATOR_DOCKERFILE)
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert json.loads(entry[-1]) == ["python", "-m", "tuneloop_operator"]
    assert not [rest for word, rest in ins if word == "CMD"], "configuration is environment variables, not arguments"


def test_operator_image_installs_only_the_operator_extra_and_no_torch() -> None:
    ins = instructions(OPERATOR_DOCKERFILE)
    installs = [m.strip() for word, rest in ins if word == "RUN" for m in re.findall(r"pip install [^&;]*", rest)]
    assert installs == ["pip install --constraint constraints.txt '.[operator]'"]
    for word, rest in ins:
        assert not re.search(r"torch|transformers|peft|accelerate|cuda", rest, re.IGNORECASE), (word, rest)
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env


def test_operator_image_exposes_the_ports_the_deployment_uses() -> None:
    exposed = {
        int(p.split("/")[0])
        for word, rest in instructions(OPERATOR_DOCKERFILE)
        if word == "EXPOSE"
        for p in rest.split()
    }
    docs = yaml.safe_load_all((ROOT / "deploy" / "operator.yaml").read_text())
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert exposed == {ports["metrics"], ports["health"]}
    assert exposed == {int(env["TUNELOOP_METRICS_PORT"]), int(env["TUNELOOP_HEALTH_PORT"])}


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out: the last pattern matching it or one of
    its parent folders decides, ``!`` re-includes (Docker's .dockerignore rules)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        if any(fnmatchcase(c, glob) for c in candidates):
            ignored = not negated
    return ignored


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerignore_keeps_what_the_dockerfile_copies(path) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not dockerignored("pyproject.toml", patterns)
    assert dockerignored(".venv", patterns) and dockerignored("tests/unit", patterns)
    for word, rest in instructions(path):
        args = [a for a in rest.split() if not a.startswith("--")]
        if word != "COPY" or "--from=" in rest:
            continue
        for source in args[:-1]:
            assert not dockerignored(source, patterns), f"{source} is COPY'd but left out by .dockerignore"


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_imports(node: ast.AST) -> set[str]:
    """Top-level modules imported anywhere in ``node``, except under ``if TYPE_CHECKING:``."""
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        return set().union(*(_runtime_imports(n) for n in node.orelse))
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom):
        return {node.module.split(".")[0]} if node.level == 0 and node.module else set()
    return set().union(*(_runtime_imports(child) for child in ast.iter_child_nodes(node)))


def _installed_with(roots: set[str]) -> set[str]:
    """The distributions pip installs for ``roots``: them and their requirements, recursively."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is declared but not installed here; run make setup")
        for spec in requirements:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_dist(req.name))
    return seen


def test_the_operator_image_has_every_package_the_operator_imports() -> None:
    """The image installs the core dependencies and the ``operator`` extra, nothing else: a
    module the operator (or the core it uses) imports from elsewhere fails only in the cluster."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        _dist(Requirement(r).name) for r in project["dependencies"] + project["optional-dependencies"]["operator"]
    }
    in_image = _installed_with(declared)
    providers = metadata.packages_distributions()
    sources = [*(ROOT / "operator" / "tuneloop_operator").rglob("*.py"), *(ROOT / "tuneloop").rglob("*.py")]
    missing = {}
    for source in sources:
        for module in _runtime_imports(ast.parse(source.read_text())):
            if module in sys.stdlib_module_names or module in {"tuneloop", "tuneloop_operator"}:
                continue
            dists = {_dist(d) for d in providers.get(module, [module])}
            if not dists & in_image:
                missing[f"{source.relative_to(ROOT)}: import {module}"] = sorted(dists)
    assert not missing, f"not installed by '.[operator]' (add to the operator extra, or do not import): {missing}"
