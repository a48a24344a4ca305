"""Scenario 6, misoperation (Acto-style): every spec field of a FineTuneJob mutated.

Each generated mutation (tests/harness/misoperation.py: null, wrong type, invalid enum, huge or
negative numbers, huge/empty/unicode strings, ``../`` in URIs and paths, deep nesting, unknown
fields, on every field the CRD schema declares) goes through three levels:

* ``tuneloop validate``'s model (``validate_manifest``) must answer with problems or a job,
  never raise;
* admission: the CRD (structural schema + CEL, as the API emulator applies it) either refuses
  it, naming field paths, or stores it;
* what it stores reaches the operator's planner (pure, ``World``): it must not raise, and the
  job either runs (a pod is planned) or carries ``Failed``/``InvalidSpec`` naming a spec field.

Edits during a run are mutations of a running job's spec; the run goes on under its own spec
and the fixed spec clears ``InvalidSpec``. A sample runs against the real operator process with
a good job beside the bad ones.
"""

from __future__ import annotations

import collections
import copy
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings

from tests.harness.k8s_fixtures import K8sApi
from tests.harness.misoperation import Mutation, admit, crd_schema, mutations, related, spec_fields
from tests.harness.operator import OperatorProcess
from tests.harness.reliability import Figure, sample
from tests.harness.s3 import S3Harness
from tests.unit.operator.planner_helpers import World, job_manifest
from tuneloop.validate import validate_manifest
from tuneloop_operator.planner import parse_job

SCENARIO = "6. Misoperation"
SEED = 13
SCHEMA = crd_schema()
FIELDS = spec_fields(SCHEMA)


def _settings(n: int) -> Any:
    return settings(
        max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=False
    )


def _failed(world: World) -> dict[str, Any] | None:
    conditions = (world.body.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Failed"), None)


def test_every_spec_field_mutated_is_refused_with_its_path_or_runs_or_is_invalid_spec(figure: Figure) -> None:
    n = sample(quick=60, full=4000)
    print(f"hypothesis seed {SEED}, {n} examples over {len(FIELDS)} spec fields")
    counts: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    crashes: list[str] = []
    unnamed: list[str] = []
    disagreements: list[str] = []
    base = job_manifest()

    @seed(SEED)
    @_settings(n)
    @given(mutations(FIELDS))
    def check(m: Mutation) -> None:
        counts["mutations"] += 1
        kinds[m.kind] += 1
        manifest = m.apply(base)
        try:
            cli_job, _ = validate_manifest(copy.deepcopy(manifest))
        except Exception as exc:  # the invariant under test: validate never raises
            crashes.append(f"validate: {m.describe()}: {type(exc).__name__}: {str(exc)[:200]}")
            return
        verdict = admit(SCHEMA, manifest)
        if not verdict.accepted:
            counts["refused at admission"] += 1
            if cli_job is not None:  # `tuneloop validate` said valid, kubectl apply would fail
                disagreements.append(f"{m.describe()}: {verdict.message[:200]}")
            assert verdict.fields, m.describe()
            if any(related(f, m.field.name) for f in verdict.fields):
                counts["refusal names the field"] += 1
            else:
                # A rule of another field (a cross-field CEL rule) is what the mutation broke.
                counts["refusal names another field"] += 1
            return
        assert verdict.stored is not None
        world = World(verdict.stored)
        try:
            world.reconcile()
            world.reconcile()  # and again: a second pass changes nothing or converges
        except Exception as exc:
            crashes.append(f"planner: {m.describe()}: {type(exc).__name__}: {str(exc)[:200]}")
            return
        job, problems = parse_job(verdict.stored)
        if job is not None:
            assert world.pods, f"valid spec but no pod: {m.describe()}: {world.body.get('status')}"
            counts["accepted, runs"] += 1
            return
        failed = _failed(world)
        assert failed is not None and failed["reason"] == "InvalidSpec", (m.describe(), world.body.get("status"))
        assert not world.pods, m.describe()
        paths = [p.path for p in problems if p.path.startswith("spec")]
        if not paths or not any(p in failed["message"] for p in paths):
            unnamed.append(f"{m.describe()}: {failed['message'][:200]}")
        counts["accepted, InvalidSpec"] += 1
        if any(related(p, m.field.name) for p in paths):
            counts["InvalidSpec names the field"] += 1

    started = time.monotonic()
    check()
    seconds = time.monotonic() - started
    print(dict(counts), dict(kinds), f"{seconds:.1f}s")
    assert crashes == [], "\n".join(crashes[:10])
    assert unnamed == [], "\n".join(unnamed[:10])
    assert disagreements == [], "\n".join(disagreements[:10])
    assert counts["mutations"] == n
    figure(
        scenario=SCENARIO,
        injection=f"hypothesis mutations of all {len(FIELDS)} spec fields of the CRD schema "
        f"({len(kinds)} kinds: null, wrong type, invalid enum, huge/negative numbers, huge/empty/unicode "
        "strings, ../ in URIs, deep nesting, unknown fields)",
        count=counts["mutations"],
        invariant="tuneloop validate and the planner never raise; every mutation is refused at admission with a "
        "field path, or runs, or carries InvalidSpec naming its spec field; nothing tuneloop validate accepts is "
        "refused at admission",
        result=f"0 exceptions; {counts['refused at admission']} refused at admission "
        f"({counts['refusal names the field']} naming the mutated field or its object, "
        f"{counts['refusal names another field']} a cross-field rule), {counts['accepted, runs']} ran, "
        f"{counts['accepted, InvalidSpec']} InvalidSpec ({counts['InvalidSpec names the field']} naming the "
        f"mutated field); {len(disagreements)} accepted by tuneloop validate but refused at admission",
        notes=f"admission = the CRD's structural schema + CEL as tests/harness/crd_validation.py applies them; "
        f"operator = the pure planner; {seconds:.0f} s",
    )


def test_edits_during_a_run_never_stop_the_run_and_a_fix_clears_invalid_spec(figure: Figure) -> None:
    n = sample(quick=25, full=1500)
    print(f"hypothesis seed {SEED}, {n} edits of a running job")
    counts: collections.Counter[str] = collections.Counter()
    crashes: list[str] = []
    good = job_manifest()

    @seed(SEED)
    @_settings(n)
    @given(mutations(FIELDS))
    def check(m: Mutation) -> None:
        counts["edits"] += 1
        world = World(copy.deepcopy(good))
        world.reconcile()
        world.start()
        world.reconcile()
        running = world.alive_pods()
        assert running, world.body.get("status")
        edited = m.apply(world.body)
        verdict = admit(SCHEMA, edited, old=world.body)
        if not verdict.accepted:
            counts["refused at admission"] += 1
            return
        assert verdict.stored is not None
        try:
            world.edit_spec(lambda spec: (spec.clear(), spec.update(copy.deepcopy(verdict.stored["spec"]))))
            world.reconcile()
            job, _ = parse_job(world.body)
            if job is None:
                counts["InvalidSpec mid-run"] += 1
                failed = _failed(world)
                assert failed is not None and failed["reason"] == "InvalidSpec", m.describe()
                # The run goes on under the spec it started with.
                assert world.alive_pods() == running, (m.describe(), world.deleted)
                world.edit_spec(lambda spec: (spec.clear(), spec.update(copy.deepcopy(good["spec"]))))
                world.reconcile()
                failed = _failed(world)
                assert failed is None or failed["reason"] != "InvalidSpec", (m.describe(), failed)
                counts["fixed"] += 1
            else:
                counts["valid edit"] += 1
        except AssertionError:
            raise
        except Exception as exc:
            crashes.append(f"{m.describe()}: {type(exc).__name__}: {str(exc)[:200]}")

    check()
    print(dict(counts))
    assert crashes == [], "\n".join(crashes[:10])
    figure(
        scenario=SCENARIO,
        injection="a running job's spec edited with one hypothesis mutation (update admission with the old object, "
        "CEL transition rules included), then, when invalid, fixed again",
        count=counts["edits"],
        invariant="no exception; an invalid edit sets InvalidSpec and leaves the running pod alone; the fix "
        "clears InvalidSpec",
        result=f"0 exceptions; {counts['refused at admission']} refused at admission, {counts['valid edit']} "
        f"valid edits, {counts['InvalidSpec mid-run']} invalid mid-run (0 pods stopped), {counts['fixed']} "
        "cleared by the fix",
    )


def test_regression_a_time_zone_naming_a_folder_of_the_database_is_invalid_spec_not_a_crash() -> None:
    """``retrain.timeZone: America`` passes the CRD's pattern; ZoneInfo raised IsADirectoryError
    (an OSError) from the validator, which the planner did not catch: the job was never reported."""
    manifest = job_manifest(retrain={"schedule": "@daily", "timeZone": "America"})
    verdict = admit(SCHEMA, manifest)
    assert verdict.accepted, verdict.message
    job, problems = validate_manifest(manifest)
    assert job is None and [p.path for p in problems] == ["spec.retrain.timeZone"]
    world = World(verdict.stored)
    world.reconcile()
    failed = _failed(world)
    assert failed is not None and failed["reason"] == "InvalidSpec"
    assert "spec.retrain.timeZone" in failed["message"] and not world.pods
    too_long = job_manifest(retrain={"schedule": "@daily", "timeZone": "x" * 5000})
    job, problems = validate_manifest(too_long)
    assert job is None and len(str(problems[0])) < 300


#: Admitted by the CRD, refused by the operator: one per kind of rule the CRD leaves to it.
OPERATOR_ONLY: dict[str, dict[str, Any]] = {
    "bad-tz": {"retrain": {"schedule": "@daily", "timeZone": "America"}},
    "bad-gate": {"promotion": {"gates": [{"metric": "rouge1", "min": 0.2}]}},
    "bad-stop": {"earlyStopping": {"metric": "bleu"}},
    "bad-cron": {"retrain": {"schedule": "61 * * * *"}},
}


@pytest.mark.timeout(120)
def test_the_real_operator_reports_bad_jobs_and_keeps_reconciling_a_good_one(
    k8s_api: K8sApi, operator: OperatorProcess, s3: S3Harness, figure: Figure
) -> None:
    # The good job needs its output prefix (the operator claims it before the first pod).
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3", "namespace": "default"},
            "stringData": {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
        }
    )
    storage = {"endpoint": s3.endpoint_url, "region": "us-east-1", "secretRef": {"name": "s3"}}
    k8s_api.create(job_manifest("bad-first", **OPERATOR_ONLY["bad-tz"]))
    k8s_api.create(job_manifest("good", output={"uri": s3.uri("jobs/good/")}, storage=storage))
    for name, spec in OPERATOR_ONLY.items():
        if name != "bad-tz":
            k8s_api.create(job_manifest(name, **spec))

    def status(name: str) -> dict[str, Any]:
        return dict((k8s_api.get("tuneloop.dev/v1alpha1", "FineTuneJob", name, "default") or {}).get("status") or {})

    def failed(name: str) -> dict[str, Any] | None:
        return next((c for c in status(name).get("conditions") or [] if c["type"] == "Failed"), None)

    names = ["bad-first", *[n for n in OPERATOR_ONLY if n != "bad-tz"]]
    k8s_api.wait_for(
        lambda: all((failed(n) or {}).get("reason") == "InvalidSpec" for n in names),
        timeout=60,
        message="InvalidSpec on every bad job",
    )
    k8s_api.wait_for(
        lambda: k8s_api.list("v1", "Pod", "default", label_selector="tuneloop.dev/job=good"),
        timeout=60,
        message="a pod for the good job",
    )
    expected = {
        "bad-first": "spec.retrain.timeZone",
        "bad-gate": "spec.promotion.gates[0].metric",
        "bad-stop": "spec.earlyStopping.metric",
        "bad-cron": "spec.retrain.schedule",
    }
    for name, path in expected.items():
        assert path in (failed(name) or {}).get("message", ""), (name, failed(name))
    pods = [p["metadata"]["name"] for p in k8s_api.list("v1", "Pod", "default")]
    assert all(p.startswith("good-") for p in pods), pods
    assert operator.process is not None and operator.process.poll() is None
    logs = operator.logs()
    assert "Traceback" not in logs, logs[-4000:]
    figure(
        scenario=SCENARIO,
        injection="the real operator process with 4 jobs the CRD admits but the operator refuses (a folder as "
        "time zone, a gate and an early-stopping metric not computed, a bad cron) and 1 good job",
        count=len(expected) + 1,
        invariant="each bad job gets InvalidSpec naming its field, the good job gets its pod, the operator "
        "neither exits nor logs a traceback",
        result=f"{sum(p in (failed(n) or {}).get('message', '') for n, p in expected.items())}/{len(expected)} "
        f"InvalidSpec with the field path, {len(pods)} pod(s), all for the good job; 0 tracebacks",
    )


def test_regression_a_nullable_block_set_to_null_is_absent_to_cel_as_on_the_api_server() -> None:
    """The emulator's CEL saw ``method.unfreezing: null`` as present, so ``has()``-guarded rules
    refused what ``tuneloop validate`` and a real API server accept (kubernetes/kubernetes#106051:
    ``has()`` of a nullable field set to null is false)."""
    manifest = job_manifest(method={"type": "lora", "unfreezing": None}, hyperparameters={"packing": None})
    verdict = admit(SCHEMA, manifest)
    assert verdict.accepted, verdict.message
    assert validate_manifest(manifest)[0] is not None
    broken = job_manifest(method={"type": "lora", "unfreezing": {}})
    assert admit(SCHEMA, broken).fields == ("spec.method.unfreezing",)


def test_regression_an_integer_in_a_number_field_is_a_double_to_cel_as_on_the_api_server() -> None:
    """``split.validation: 0`` (JSON integer) made the emulator's CEL add an int to a double and
    refuse the object; the API server gives CEL a double for every ``type: number`` field."""
    manifest = job_manifest(dataset={"uri": "s3://data-bucket/train/", "split": {"validation": 0}})
    assert admit(SCHEMA, manifest).accepted and validate_manifest(manifest)[0] is not None
    too_much = job_manifest(dataset={"uri": "s3://data-bucket/train/", "split": {"validation": 0.9, "test": 0.1}})
    assert "spec.dataset.split" in admit(SCHEMA, too_much).fields
