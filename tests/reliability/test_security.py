"""Scenario 8, security: secrets stay secret, RBAC is what is used, keys stay under the job's
prefix, hostile manifests are refused fast with bounded memory.

Covered elsewhere and referenced, not repeated here: Pod Security "restricted" for every pod
the operator renders (tests/unit/operator/test_render.py::test_pods_pass_pod_security_restricted_and_the_schema),
checkpoints loaded only pickle-free (tests/integration/test_checkpoints.py::test_pickle_payload_is_refused_not_executed:
``torch.load(weights_only=True)``, a live pickle payload is refused and never run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.e2e.test_operator_e2e import (  # noqa: F401 - fixtures of the e2e world
    CANARY,
    NS,
    SECRET,
    World,
    data,
    kubelet,
    phase_is,
    secret,
    wait_status,
    world,
)
from tests.harness.k8s import parse_api_path
from tests.harness.reliability import Figure, is_full, sample
from tests.unit.test_storage_keys import _stays_under
from tuneloop.manifests import ManifestError, read_manifests
from tuneloop.storage import InvalidUriError, UnsafeKeyError, safe_join
from tuneloop_operator.permissions import RULES

SCENARIO = "8. Security"
REPO = Path(__file__).resolve().parents[2]
SEED = 8


# --- (f) hostile manifests ------------------------------------------------------------------


def _bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "apiVersion: tuneloop.dev/v1alpha1\nkind: FineTuneJob\n" + "\n".join(lines) + "\n"


HOSTILE: dict[str, Any] = {
    "billion laughs (10^9 nodes through aliases)": _bomb,
    "10 MB body": lambda: "apiVersion: tuneloop.dev/v1alpha1\nkind: FineTuneJob\ndescription: " + "x" * 10_000_000,
    "3.9 MB of one-character list items": lambda: "items:\n" + "- a\n" * 1_000_000,
    "deep nesting (100,000 flow levels)": lambda: "[" * 100_000 + "]" * 100_000,
    "deep nesting (block, 2,000 levels)": lambda: "".join(f"{' ' * i}k:\n" for i in range(2000)) + " " * 2000 + "v\n",
}

#: What a refusal may cost beyond validating a valid example (the CLI's imports dominate its memory).
MAX_SECONDS = 20.0
MAX_EXTRA_RSS_MB = 100


def _run_measured(args: list[str]) -> tuple[int, str, float, float]:
    """``tuneloop ARGS`` in a child that reports its own peak RSS (ru_maxrss, KiB on Linux)."""
    code = (
        "import resource, sys\n"
        "from tuneloop.cli import main\n"
        "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc if isinstance(rc, int) else 1)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    seconds = time.monotonic() - started
    peak = next(
        (int(line.split()[1]) / 1024 for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), -1.0
    )
    return result.returncode, result.stderr, seconds, peak


def test_hostile_manifests_are_refused_fast_with_bounded_memory(tmp_path: Path, figure: Figure) -> None:
    rows = []
    baseline_rc, _, baseline_s, baseline_mb = _run_measured(
        ["validate", str(REPO / "examples" / "sentiment-lora.yaml")]
    )
    assert baseline_rc == 0
    # Quick: the three kinds of blow-up once each, through validate; full: every document, both commands.
    chosen = list(HOSTILE.items()) if is_full() else list(HOSTILE.items())[:3]
    for name, make in chosen:
        path = tmp_path / "hostile.yaml"
        path.write_text(make())
        for command in ("validate", "run") if is_full() else ("validate",):
            args = [command, str(path)]
            rc, stderr, seconds, peak_mb = _run_measured(args)
            rows.append((name, command, rc, round(seconds, 2), round(peak_mb)))
            assert rc != 0, (name, command, stderr[-2000:])
            assert "Traceback" not in stderr, (name, command, stderr[-3000:])
            assert seconds < MAX_SECONDS and 0 < peak_mb < baseline_mb + MAX_EXTRA_RSS_MB, (
                name,
                command,
                seconds,
                peak_mb,
            )
    print(f"baseline {baseline_s:.2f}s {baseline_mb:.0f}MB", json.dumps(rows, indent=1))
    worst_s = max(r[3] for r in rows)
    worst_mb = max(r[4] for r in rows)
    figure(
        scenario=SCENARIO,
        injection="hostile manifests to `tuneloop validate`"
        + (" and `tuneloop run`" if is_full() else "")
        + ": "
        + "; ".join(name for name, _ in chosen),
        count=len(rows),
        invariant=f"refused (exit ≠ 0, no traceback) in < {MAX_SECONDS:g} s, peak RSS < {MAX_EXTRA_RSS_MB} MB above "
        "validating a valid example",
        result=f"{len(rows)}/{len(rows)} refused; slowest {worst_s:.1f} s, peak RSS ≤ {worst_mb} MB "
        f"(a valid example: {baseline_s:.1f} s, {baseline_mb:.0f} MB)",
        notes="the reader caps a file at 4 MiB, aliases at 200,000 expanded nodes and nesting at 64 levels",
    )


def test_regression_a_long_flat_manifest_is_refused_while_it_is_parsed(tmp_path: Path) -> None:
    """A 3.9 MB file of one-character list items took 74 s and ~250 MB above a normal validation
    before the reader counted anything: the node cap now applies while the document is parsed."""
    path = tmp_path / "flat.yaml"
    path.write_text("items:\n" + "- a\n" * 200_000)
    started = time.monotonic()
    with pytest.raises(ManifestError, match="more than 20,000 YAML nodes"):
        read_manifests(str(path))
    assert time.monotonic() - started < 5
    # A file of many ordinary jobs is not affected: the cap is per document.
    one = (REPO / "examples" / "sentiment-lora.yaml").read_text()
    path.write_text("\n---\n".join([one] * 50))
    assert len(read_manifests(str(path))) == 50


# --- (d) keys stay under the job's prefix ----------------------------------------------------

_NAME_PARTS = st.sampled_from(["..", ".", "/", "\\", "%2e", "%2E%2e", "%2f", "\uff0e", "\x00", "~", "a", "run", " "])


def test_generated_names_never_leave_the_job_prefix(figure: Figure) -> None:
    n = sample(quick=300, full=20_000)
    counts = {"names": 0, "refused": 0, "joined": 0}
    bases = ["s3://models/jobs/support-bot/", "file:///srv/out/support-bot"]

    @seed(SEED)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from(bases),
        st.one_of(st.lists(_NAME_PARTS, max_size=8).map("".join), st.text(max_size=30)),
    )
    def check(base: str, key: str) -> None:
        counts["names"] += 1
        try:
            joined = safe_join(base, key)
        except (UnsafeKeyError, InvalidUriError):
            counts["refused"] += 1
            return
        counts["joined"] += 1
        assert _stays_under(key), key
        assert joined == base.rstrip("/") + "/" + key

    check()
    assert counts["names"] == n and counts["joined"] > 0
    figure(
        scenario=SCENARIO,
        injection="hypothesis-generated object names ('..', '%2e', fullwidth dots, NUL, '\\\\', unicode) joined "
        "onto a job's S3 and file prefix",
        count=counts["names"],
        invariant="every key is refused or stays under the prefix (checked by an independent decoding oracle)",
        result=f"{counts['refused']} refused, {counts['joined']} joined, 0 outside the prefix",
    )


# --- (a) canary, (c) RBAC: one real run end to end -------------------------------------------

HF_SECRET = "hf-token"
HF_CANARY = "hf_canaryTOKENq7Zp3Xv9Lm2Rt8"


#: User-Agent products of the operator's two API clients.
OPERATOR_AGENTS = frozenset({"kopf", "OpenAPI-Generator"})


def _verb(method: str, name: str | None, params: Any) -> str:
    if method == "GET":
        if name is not None:
            return "get"
        return "watch" if str(params.get("watch", "")).lower() in ("true", "1") else "list"
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete" if name else "deletecollection"}[
        method
    ]


def _granted() -> set[tuple[str, str, str]]:
    return {
        (verb, group, res)
        for rule in RULES
        for group in rule.api_groups
        for res in rule.resources
        for verb in rule.verbs
    }


@pytest.mark.e2e
@pytest.mark.slow  # ~90 s: `make reliability` runs it; the S3-secret canary of one run is in tests/e2e too
@pytest.mark.timeout(300)
def test_one_real_run_leaks_no_secret_and_uses_exactly_its_rbac(world: World, figure: Figure) -> None:  # noqa: F811
    k8s_api, operator, kubelet, s3 = world.k8s, world.operator, world.kubelet, world.s3  # noqa: F811
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": HF_SECRET, "namespace": NS},
            "stringData": {"HF_TOKEN": HF_CANARY},
        }
    )
    manifest = world.job("canary")
    manifest["spec"]["model"]["secretRef"] = {"name": HF_SECRET}
    k8s_api.create(manifest)
    done = wait_status(k8s_api, "canary", phase_is("Succeeded", "Failed"), timeout=240, what="the end of the run")
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1)
    k8s_api.wait_for(
        lambda: "Succeeded" in [e.get("reason") for e in k8s_api.list("v1", "Event", NS)], message="Succeeded event"
    )
    # (a) the canaries: by reference in the pod spec, nowhere else.
    pods = k8s_api.list("v1", "Pod", NS)
    pod = next(p for p in pods if p["metadata"]["name"].startswith("canary-"))
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == HF_SECRET
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == SECRET
    places: dict[str, str] = {
        "job (spec, status, annotations)": json.dumps(
            k8s_api.get("tuneloop.dev/v1alpha1", "FineTuneJob", "canary", NS)
        ),
        "events": json.dumps(k8s_api.list("v1", "Event", NS)),
        "events.k8s.io": json.dumps(k8s_api.list("events.k8s.io/v1", "Event", NS)),
        "pods": json.dumps(pods),
        "configmaps": json.dumps(k8s_api.list("v1", "ConfigMap", NS)),
        "services": json.dumps(k8s_api.list("v1", "Service", NS)),
        "operator log": operator.logs(),
        "operator metrics": operator.metrics(),
        "trainer log": "\n".join(kubelet.logs(NS, p["metadata"]["name"]) for p in pods),
    }
    keys = s3.list_keys("jobs/canary/")
    assert any(k.endswith(".md") for k in keys) and any("report" in k for k in keys), keys
    for key in keys:
        places[f"s3://{key}"] = s3.get_bytes(key).decode("utf-8", errors="replace")
    for path in (world.tmp).rglob("*"):
        if path.is_file() and path.stat().st_size < 20_000_000 and "kubelet" not in path.parts:
            places[f"file {path.relative_to(world.tmp)}"] = path.read_bytes().decode("utf-8", errors="replace")
    leaks = sorted(where for where, text in places.items() if CANARY in text or HF_CANARY in text)
    assert leaks == [], leaks

    # Deletion too (the finalizer's cleanup), so that the recorded calls cover a job's whole life.
    k8s_api.delete("tuneloop.dev/v1alpha1", "FineTuneJob", "canary", NS)
    k8s_api.wait_for(
        lambda: k8s_api.get("tuneloop.dev/v1alpha1", "FineTuneJob", "canary", NS) is None,
        timeout=60,
        message="the job's deletion",
    )
    # Every request since the emulator was reset for this test, the operator's start included.
    requests = k8s_api.call(lambda: list(k8s_api.emulator._requests))

    # (c) RBAC: every call the operator made, against what permissions.RULES grants.
    used: set[tuple[str, str, str]] = set()
    agents: set[str] = set()
    for request in requests:
        agent = str(request.headers.get("User-Agent", "")).split("/", maxsplit=1)[0]
        agents.add(agent)
        path = parse_api_path(request.url.path)
        # The operator talks through Kopf and the official client (tuneloop_operator.kube); the local
        # kubelet and the test itself use requests (python-requests).
        if agent not in OPERATOR_AGENTS or path is None:
            continue  # discovery: open to every authenticated user
        resource_name = path.plural + (f"/{path.subresource}" if path.subresource else "")
        used.add(
            (
                _verb(str(getattr(request.method, "value", request.method)).upper(), path.name, request.params),
                path.group,
                resource_name,
            )
        )
    granted = _granted()
    assert used - granted == set(), f"calls RBAC would refuse: {sorted(used - granted)} (agents {agents})"
    unused = sorted(granted - used)
    print("used:", sorted(used), "\nunused grants:", unused, "\nagents:", agents)
    figure(
        scenario=SCENARIO,
        injection="one real run (operator → pod → trainer → S3) with canary values in the S3 credentials "
        "Secret and an HF_TOKEN Secret (spec.model.secretRef); every API request recorded",
        count=len(places),
        invariant="no canary outside a secretKeyRef; every API call the operator makes is granted by permissions.RULES",
        result=f"0 leaks in {len(places)} places scanned; {len(used)} (verb, group, resource) used, "
        f"{len(used - granted)} not granted, {len(unused)} granted but unused in this run: "
        + ", ".join(f"{v} {g or 'core'}/{r}" for v, g, r in unused),
        notes="granted-but-unused calls belong to paths a single successful run does not take (multi-node "
        "Services, cleanup, retries)",
    )


# --- (g) the dependency audit's verdict ---------------------------------------------------------


def test_the_dependency_audit_names_each_vulnerability_and_only_warns_when_it_cannot_look(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tools.audit_deps import verdict

    vulnerable = {
        "dependencies": [{"name": "x", "version": "1.0", "vulns": [{"id": "PYSEC-1", "fix_versions": ["1.1"]}]}]
    }
    monkeypatch.delenv("TUNELOOP_AUDIT_STRICT", raising=False)
    code, lines = verdict(vulnerable)
    assert code == 0 and "x 1.0: PYSEC-1 (fixed in 1.1)" in lines and "WARNING" in lines[-1]
    monkeypatch.setenv("TUNELOOP_AUDIT_STRICT", "1")
    code, lines = verdict(vulnerable)
    assert code == 1 and "x 1.0: PYSEC-1 (fixed in 1.1)" in lines
    offline = {"dependencies": [{"name": "y", "version": "2", "skip_reason": "Dependency not found on PyPI"}]}
    code, lines = verdict(offline)
    assert code == 0 and "0 of 1 pinned packages audited" in lines[0] and "WARNING" in lines[1]


# --- (e) base model weights: pickle-free only -------------------------------------------------


class _Payload:
    """Unpickled by an unrestricted loader, it creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_base_model_whose_pytorch_model_bin_carries_a_pickle_payload_is_refused_unrun(
    tmp_path: Path, tiny_model_dir: Any
) -> None:
    """Checkpoints are covered by tests/integration/test_checkpoints.py; this is the base model a
    job names: its ``pytorch_model.bin`` is loaded with ``weights_only`` (transformers' default,
    which the trainer never overrides), so a payload is refused and never executed."""
    import shutil

    import torch

    from tuneloop_trainer.errors import UnsupportedModelError
    from tuneloop_trainer.models import ResolvedModel, load_config, load_tokenizer, model_family
    from tuneloop_trainer.models.loading import load_for_task

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("bert"), model)
    marker = tmp_path / "payload-ran"
    (model / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": _Payload(marker)}, model / "pytorch_model.bin")
    resolved = ResolvedModel(location=str(model), revision=None, uri=f"file://{model}")
    config = load_config(resolved)
    tokenizer = load_tokenizer(resolved, model_family(config))
    with pytest.raises(UnsupportedModelError, match="corrupt"):
        load_for_task("sequence-classification", resolved, config, tokenizer, ["neg", "pos"], kwargs={})
    assert not marker.exists(), "the pickle payload ran"
