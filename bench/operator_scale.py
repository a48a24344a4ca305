"""Benchmark: the operator at scale against the Kubernetes API emulator, beside a direct-API baseline.

For each N (100 and 1,000 by default), on a fresh emulator (``tests/harness/k8s.py``) with the
project's CRD:

- **baseline**: a driver process creates N FineTuneJobs and, right after each one, exactly what
  the operator does for run 1 of it: the output claims in S3 (read the owner record and the runs
  under the prefix, claim the prefix and run 1 with conditional writes, :mod:`tuneloop.ownership`;
  S3 is moto's server in a process of its own), then the ConfigMap and the pod from
  :func:`tuneloop_operator.render.render_attempt` (owner = the created job object, after
  :func:`tuneloop_operator.planner.parse_job` validates it as the operator does), through
  :class:`tuneloop_operator.kube.KubeClient` (the ``kubernetes`` client's connection handling,
  16 worker threads, the operator's client), 16 jobs in flight;
- **operator**: the same driver creates the same N jobs, 16 in flight, and nothing else; the
  real operator (``python -m tuneloop_operator``, :class:`tests.harness.operator.OperatorProcess`,
  log level INFO, ``TUNELOOP_RECONCILE_INTERVAL=3600`` since pods never run) creates the pods.

Every job watches its dataset for new rows (``retrain.onNewData``, every minute; the 1,000 jobs
share 10 dataset prefixes) and, when Debian's ``prometheus`` binary is installed, a drift query of
its own against a real Prometheus server (``retrain.onDrift``, every minute). After the last pod,
the operator arm keeps running for ``--steady`` seconds (the runs stay active: no kubelet runs
the pods, and the triggers keep polling) and reports the S3 listings and PromQL queries it
actually made per minute, from its own counters.

Creating the jobs is timed identically in both arms: the clock starts when the emulator stores
the first job and stops when it stores the last pod. Timestamps are taken inside the emulator
(a hook on its event emission, ``time.monotonic()``), not from ``creationTimestamp``, which has
one-second resolution; per-job latency is pod stored − job stored. The emulator is served from a
thread of this process, which does nothing else while an arm runs (no polling of the API: the
hook counts the pods), so the driver (a child process) and the operator never share its GIL.
The operator's peak memory is the larger of its ``VmHWM`` at the end and ``VmRSS`` sampled every
50 ms. Every HTTP request is counted by source (the driver, Kopf's own requests by their
``kopf/`` user agent, the operator's ``KubeClient``) with the emulator time spent serving it,
and the emulator's own time is split into validation, its GC sweep, LIST scans and event copies.

The operator, the renderer and the emulator are those of the checkout this file is in (its
``operator/`` and root go first on the path, also for the operator process).

    .venv/bin/python bench/operator_scale.py --jobs 100 1000 [--steady 120] [--out results.json]

Diagnostics: ``--skip-gc-sweep`` (the emulator's per-write GC sweep is O(objects stored) and
never acts here, since nothing is deleted), ``--operator-env KEY=VALUE`` (e.g. a ``PYTHONPATH``
with a ``sitecustomize`` that changes a Kopf setting, to measure a fix without editing the
operator), ``--arms operator``, ``--workdir`` (keeps the operator's log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: This checkout's packages, ahead of the editable install: the operator measured, the renderer
#: of the baseline and the emulator are those of the tree this script is in (e.g. a worktree).
SOURCES = [str(ROOT / "operator"), str(ROOT)]
sys.path[:0] = SOURCES

NAMESPACE = "default"
#: The trainer image OperatorProcess configures; the baseline renders with the same.
IMAGE = "ghcr.io/tuneloop/trainer:test"
DRIVER_AGENT = "tuneloop-bench-driver"
JOB_NAME = re.compile(r"scale-\d{5}")
TARGET_RATIO = 3.0
TARGET_MB = 300.0


def job_name(i: int) -> str:
    return f"scale-{i:05d}"


def pod_name(name: str) -> str:
    return f"{name}-r1-a1-n0"


#: Distinct dataset prefixes the jobs watch (jobs share datasets, as teams do).
DATASETS = 10


def job_manifest(i: int, prometheus_url: str | None = None) -> dict[str, Any]:
    """A valid FineTuneJob that trains on CPU (``resources.gpus: 0``), watching its dataset for new
    rows every minute and, with ``prometheus_url``, a drift query of its own every minute."""
    from tuneloop_trainer import example

    retrain: dict[str, Any] = {
        "onNewData": {"minNewSamples": 100, "pollInterval": "1m", "settlePeriod": "30s"},
    }
    if prometheus_url:
        retrain["onDrift"] = {
            "prometheus": {
                "url": prometheus_url,
                "query": f'max(tuneloop_bench_drift{{finetunejob="{job_name(i)}"}}) or vector(0)',
                "threshold": 0.5,
                "for": "5m",
                "pollInterval": "1m",
            }
        }
    return example.job_manifest(
        job_name(i),
        namespace=NAMESPACE,
        task="sequence-classification",
        model_uri="hf://org/model",
        dataset={"uri": f"s3://data-bucket/train-{i % DATASETS}/"},
        output={"uri": f"s3://model-bucket/out-{i}/"},
        retrain=retrain,
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# --- the driver (a child process): creates the jobs, and in the baseline the pods too -------------


def driver_client(kubeconfig: Path) -> Any:
    """A KubeClient built as ``KubeClient.from_environment`` builds it, with its own user agent so
    that the emulator can tell its requests from the operator's."""
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config

    from tuneloop_operator.kube import API_THREADS, KubeClient

    configuration = k8s_client.Configuration()
    k8s_config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = API_THREADS
    api_client = k8s_client.ApiClient(configuration)
    api_client.user_agent = DRIVER_AGENT
    return KubeClient(api_client)


async def drive(arm: str, kubeconfig: Path, jobs: int, concurrency: int) -> dict[str, Any]:
    from tuneloop.contract import spec_hash
    from tuneloop.ownership import JobIdentity, claim_output, claim_run, highest_run, read_owner
    from tuneloop.storage import Storage
    from tuneloop_operator.planner import owner_of, parse_job
    from tuneloop_operator.render import render_attempt

    kube = driver_client(kubeconfig)
    limit = asyncio.Semaphore(concurrency)
    storage = Storage.for_uri("s3://model-bucket/") if arm == "baseline" else None

    def claim(job: Any, body: dict[str, Any]) -> None:
        """What the operator does in S3 before run 1 of a job: read the output's owner and runs,
        list the dataset, claim the output and the run number (tuneloop.ownership), record the
        listing run 1 starts with (its data watermark)."""
        assert storage is not None
        uri = job.spec.output.uri
        meta = body["metadata"]
        me = JobIdentity(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        read_owner(storage, uri)
        highest_run(storage, uri)
        listing = storage.list(job.spec.dataset.uri)
        claim_output(storage, uri, me, continue_lineage=False, by="operator")
        claim_run(storage, uri, me, 1, spec_hash=spec_hash(job.spec), by="operator")
        objects = {o.key: [o.size, o.etag] for o in listing}
        storage.write_json(uri + "runs/1/data-listing.json", {"format": "bench", "objects": objects})

    async def one(i: int) -> None:
        async with limit:
            manifest = job_manifest(i, os.environ.get("BENCH_PROMETHEUS_URL") or None)
            body = await kube.request("POST", kube.job_path(NAMESPACE), body=manifest)
            if arm != "baseline":
                return
            job, problems = parse_job(body or {})
            assert job is not None, problems
            await asyncio.to_thread(claim, job, body or {})
            objects = render_attempt(job, 1, 1, image=IMAGE, owner=owner_of(body or {}))
            for obj in objects:
                await kube.create(obj)

    started = time.monotonic()
    cpu = time.process_time()
    await asyncio.gather(*(one(i) for i in range(jobs)))
    result = {"seconds": time.monotonic() - started, "cpu_seconds": time.process_time() - cpu}
    kube.close()
    return result


# --- the emulator hook: when objects appear, which requests were served and for how long --------


class Recorder:
    """Filled on the emulator's loop; read from the main thread only after it settles."""

    def __init__(self) -> None:
        self.added: dict[tuple[str, str], float] = {}
        self.pods = 0
        self.requests: Counter[tuple[str, str]] = Counter()
        self.server_seconds: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.watches: Counter[str] = Counter()
        #: (job, source request, served at) of every request about a job, for the timeline.
        self.timeline: list[tuple[str, str, float]] = []
        #: Seconds inside some emulator methods: validation, the GC sweep, scans, event copies.
        self.internals: defaultdict[str, float] = defaultdict(float)

    def clear(self) -> None:
        self.added.clear()
        self.pods = 0
        self.requests.clear()
        self.server_seconds.clear()
        self.watches.clear()
        self.timeline.clear()
        self.internals.clear()


RECORDER = Recorder()


def _source(headers: Any) -> str:
    agent = str(headers.get("User-Agent", ""))
    if agent.startswith("kopf/"):
        return "kopf"
    if agent == DRIVER_AGENT:
        return "driver"
    return "tuneloop"  # the operator's KubeClient (OpenAPI-Generator/... user agent)


def _what(raw: Any) -> str:
    """``POST pods``, ``PATCH finetunejobs/status (merge)``, ``LIST configmaps``..."""
    from tests.harness.k8s import parse_api_path

    path = parse_api_path(raw.path)
    if path is None:
        return f"{raw.method} {raw.path}"
    resource = path.plural + (f"/{path.subresource}" if path.subresource else "")
    verb = raw.method
    if raw.method == "GET" and raw.query.get("watch") in ("true", "1"):
        verb = "WATCH"
    elif raw.method == "GET" and not path.name:
        verb = "LIST"
    if raw.method == "PATCH":
        kind = str(raw.headers.get("Content-Type", "")).split(";")[0].removeprefix("application/")
        resource += f" ({kind.removesuffix('+json')})"
    return f"{verb} {resource}"


def install_hooks(*, skip_gc_sweep: bool = False) -> None:
    """Wrap the emulator's request entry point and its event emission (this process only).

    ``skip_gc_sweep``: the emulator runs its garbage collector over every stored object after
    every write (the real one is asynchronous and event-driven), which makes each write cost
    O(objects stored). Nothing is ever deleted here, so the sweep never finds work: skipping it
    changes no result, only the emulator's cost per write.
    """
    from tests.harness.k8s import KubernetesApiEmulator

    if skip_gc_sweep:
        KubernetesApiEmulator._collect_garbage = lambda self: None  # type: ignore[method-assign]

    serve, emit = KubernetesApiEmulator.__call__, KubernetesApiEmulator._emit

    async def counted(self: Any, raw: Any) -> Any:
        if raw.query.get("watch") in ("true", "1"):
            RECORDER.watches[f"{_source(raw.headers)} {_what(raw)}"] += 1
            return await serve(self, raw)
        await raw.read()  # the body may still be arriving: not the emulator's time
        started = time.perf_counter()
        try:
            return await serve(self, raw)
        finally:
            key = (_source(raw.headers), _what(raw))
            RECORDER.requests[key] += 1
            RECORDER.server_seconds[key] += time.perf_counter() - started
            job = JOB_NAME.search(raw.path_qs + (await raw.text())[:2000])
            if job is not None:
                RECORDER.timeline.append((job.group(0), " ".join(key), time.monotonic()))

    def stamped(self: Any, rd: Any, event_type: str, obj: Any, old: Any) -> None:
        emit(self, rd, event_type, obj, old)
        if event_type == "ADDED" and rd.plural in ("pods", "finetunejobs"):
            key = (rd.plural, obj["metadata"]["name"])
            if key not in RECORDER.added:
                RECORDER.added[key] = time.monotonic()
                RECORDER.pods += rd.plural == "pods"

    KubernetesApiEmulator.__call__ = counted  # type: ignore[method-assign]
    KubernetesApiEmulator._emit = stamped  # type: ignore[method-assign]
    # Where the emulator's own time goes (none of these calls nests in another here).
    for name in ("_admit", "_collect_garbage", "_live", "_emit"):
        setattr(KubernetesApiEmulator, name, _timed(name, getattr(KubernetesApiEmulator, name)))


def _timed(name: str, fn: Any) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            RECORDER.internals[name] += time.perf_counter() - started

    return timed


# --- one arm ------------------------------------------------------------------------------------


def rss_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_watches(timeout: float = 30.0) -> None:
    """Kopf answers /healthz before its watches are open: wait for both (jobs and pods)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = " ".join(RECORDER.watches)
        if "kopf WATCH finetunejobs" in seen and "kopf WATCH pods" in seen:
            time.sleep(0.5)
            return
        time.sleep(0.05)
    raise RuntimeError(f"Kopf did not open its watches: {dict(RECORDER.watches)}")


def settle(quiet: float = 1.0, timeout: float = 60.0) -> None:
    """Wait until no request has been served for ``quiet`` seconds (follow-up reconciles done)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        total = sum(RECORDER.requests.values())
        if total != last:
            last, since = total, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)


class MotoProcess:
    """moto's S3 server in a process of its own (not a thread of this one, which serves the
    emulator): both arms claim each job's output and run 1 there, as the operator does."""

    def __init__(self) -> None:
        from tests.harness.operator import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_REGION": "us-east-1",
        }

    def __enter__(self) -> MotoProcess:
        import boto3

        moto = Path(sys.executable).parent / "moto_server"
        self.process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench-secret",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket="model-bucket")
                client.create_bucket(Bucket="data-bucket")
                for d in range(DATASETS):
                    rows = "".join(json.dumps({"text": f"row {r}", "label": r % 2}) + "\n" for r in range(200))
                    client.put_object(Bucket="data-bucket", Key=f"train-{d}/part-000.jsonl", Body=rows.encode())
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __exit__(self, *_: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


def run_arm(
    arm: str,
    jobs: int,
    workdir: Path,
    *,
    concurrency: int,
    timeout: float,
    operator_env: dict[str, str],
    steady: float = 0.0,
    prometheus_url: str | None = None,
) -> dict[str, Any]:
    """One measurement on a fresh emulator; an operator arm that times out is reported as incomplete."""
    import yaml

    from tests.harness.k8s import EmulatorThread
    from tests.harness.operator import CRD_PATH, OperatorProcess

    crd = yaml.safe_load(CRD_PATH.read_text())
    operator: OperatorProcess | None = None
    pid: int | None = None
    with EmulatorThread() as api, MotoProcess() as moto:
        operator_env = moto.env | operator_env
        api.call(api.emulator.preload_crd, crd)
        kubeconfig = api.write_kubeconfig(workdir / f"kubeconfig-{arm}-{jobs}")
        api.call(RECORDER.clear)
        try:
            if arm == "operator":
                env = {"TUNELOOP_RECONCILE_INTERVAL": "3600", "TUNELOOP_LOG_LEVEL": "INFO"} | operator_env
                env["PYTHONPATH"] = os.pathsep.join([*filter(None, [operator_env.get("PYTHONPATH")]), *SOURCES])
                operator = OperatorProcess(kubeconfig, workdir / f"operator-{jobs}.log", env=env)
                operator.start(timeout=60)
                assert operator.process is not None
                pid = operator.process.pid
                wait_for_watches()
            api.call(RECORDER.clear)
            cpu_emulator = time.process_time()
            cpu_operator = cpu_seconds(pid) if pid else 0.0
            result_path = workdir / f"driver-{arm}-{jobs}.json"
            cmd = [sys.executable, __file__, "--child", arm, "--kubeconfig", str(kubeconfig)]
            cmd += ["--jobs", str(jobs), "--concurrency", str(concurrency), "--result", str(result_path)]
            driver_env = {**os.environ, **moto.env, "BENCH_PROMETHEUS_URL": prometheus_url or ""}
            driver = subprocess.Popen(cmd, env=driver_env)
            peak_kb = 0
            deadline = time.monotonic() + timeout
            complete = True
            while RECORDER.pods < jobs:
                if pid:
                    peak_kb = max(peak_kb, rss_kb(pid, "VmRSS"))
                if driver.poll() not in (None, 0):
                    raise RuntimeError(f"the driver failed with {driver.returncode}")
                if time.monotonic() > deadline:
                    complete = False
                    break
                time.sleep(0.05)
            if driver.wait(60) != 0:
                raise RuntimeError(f"the driver failed with {driver.returncode}")
            driver_result = json.loads(result_path.read_text())
            cpu_emulator_to_pods = time.process_time() - cpu_emulator
            cpu_operator_to_pods = (cpu_seconds(pid) - cpu_operator) if pid else 0.0
            if complete:
                # The follow-up work (pod events → reconcile) counts in the requests per job; it can
                # wait for a Kopf worker, and idle workers hold their place for 5 s (idle_timeout).
                settle(quiet=6.0 if pid else 1.0)
            steady_state: dict[str, float] = {}
            if operator is not None and steady > 0 and complete:
                # The jobs keep polling (their runs stay active: no kubelet runs the pods): what
                # that costs per minute, in real requests.
                names = ("tuneloop_operator_dataset_listings_total", "tuneloop_operator_drift_queries_total")
                before = {n: operator.metric(n) for n in names}
                until = time.monotonic() + steady
                while time.monotonic() < until:
                    peak_kb = max(peak_kb, rss_kb(pid, "VmRSS")) if pid else peak_kb
                    time.sleep(0.5)
                minutes = steady / 60
                steady_state = {n: (operator.metric(n) - before[n]) / minutes for n in names}
                steady_state["jobs"] = jobs
                steady_state["distinct_dataset_prefixes"] = DATASETS
            if pid:
                peak_kb = max(peak_kb, rss_kb(pid, "VmRSS"), rss_kb(pid, "VmHWM"))
            cpu_operator_total = (cpu_seconds(pid) - cpu_operator) if pid else 0.0
            cpu_emulator_total = time.process_time() - cpu_emulator
            pods = api.call(lambda: api.emulator.list_objects("v1", "Pod", NAMESPACE))
            errors = api.server_errors()
            stopped = time.monotonic()
        finally:
            if operator is not None:
                operator.stop()
    if errors:
        raise RuntimeError("the emulator raised:\n" + "\n".join(errors))
    names = [job_name(i) for i in range(jobs)]
    made = {p["metadata"]["name"] for p in pods}
    if not made <= {pod_name(n) for n in names} or (complete and len(made) != jobs):
        raise RuntimeError(f"{arm}: the pods are not exactly the expected ones")
    added = dict(RECORDER.added)
    start = min(added["finetunejobs", n] for n in names)
    # A missing pod counts as made when the arm stopped waiting: its numbers are lower bounds.
    pod_at = {n: added.get(("pods", pod_name(n)), stopped) for n in names}
    latencies = [pod_at[n] - added["finetunejobs", n] for n in names]
    progress = sorted(pod_at.values())
    log = operator.logs() if operator is not None else ""
    offsets: defaultdict[str, list[float]] = defaultdict(list)
    nth: Counter[tuple[str, str]] = Counter()
    for name, what, at in RECORDER.timeline:
        nth[name, what] += 1
        offsets[f"{what} #{nth[name, what]}"].append(at - added["finetunejobs", name])
    timeline = sorted(
        ((step, len(v), percentile(v, 50), percentile(v, 99)) for step, v in offsets.items()), key=lambda t: t[2]
    )
    return {
        "arm": arm,
        "jobs": jobs,
        "complete": complete,
        "pods": len(made),
        "seconds": max(pod_at.values()) - start,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max_latency": max(latencies),
        "pods_after": {f"{q}%": percentile(progress, q) - start for q in (10, 25, 50, 75, 90, 100)},
        "last_job_created_after": max(added["finetunejobs", n] for n in names) - start,
        "driver": driver_result,
        "steady_state_per_minute": steady_state,
        "operator_peak_mb": peak_kb / 1024,
        "operator_cpu_seconds_to_last_pod": cpu_operator_to_pods,
        "operator_cpu_seconds_total": cpu_operator_total,
        "emulator_cpu_seconds_to_last_pod": cpu_emulator_to_pods,
        "emulator_cpu_seconds_total": cpu_emulator_total,
        "requests": {f"{src} {what}": count for (src, what), count in sorted(RECORDER.requests.items())},
        "server_seconds": {f"{src} {what}": s for (src, what), s in sorted(RECORDER.server_seconds.items())},
        "timeline": timeline,
        "emulator_internals": dict(RECORDER.internals),
        "operator_log_warnings": sum(1 for line in log.splitlines() if " WARNING " in line or " ERROR " in line),
        "pod_spec": comparable(next((p["spec"] for p in pods if p["metadata"]["name"] == pod_name(job_name(0))), None)),
    }


def comparable(pod_spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pod spec without the job's uid (each arm creates its own job objects)."""
    if pod_spec is None:
        return None
    spec = json.loads(json.dumps(pod_spec))
    for container in spec.get("containers", []):
        for env in container.get("env", []):
            if env.get("name") == "TUNELOOP_JOB_UID":
                env["value"] = "<uid>"
    return dict(spec)


# --- the report -----------------------------------------------------------------------------------


def breakdown(result: dict[str, Any]) -> None:
    jobs = result["jobs"]
    print(f"\n{result['arm']}, {jobs} jobs: requests per job, and emulator time serving them (watches excluded)")
    print(f"  {'source request':52}{'per job':>9}{'ms/request':>12}{'server s':>10}")
    for key, count in sorted(result["requests"].items(), key=lambda kv: -result["server_seconds"][kv[0]]):
        seconds = result["server_seconds"][key]
        print(f"  {key:52}{count / jobs:>9.2f}{1000 * seconds / count:>12.2f}{seconds:>10.2f}")
    print(f"  {'step (n-th request of the kind about a job)':52}{'jobs':>9}{'p50 s':>12}{'p99 s':>10}")
    for step, count, p50, p99 in result["timeline"]:
        print(f"  {step:52}{count:>9}{p50:>12.3f}{p99:>10.3f}")
    inside = result["emulator_internals"]
    print(
        f"  emulator CPU {result['emulator_cpu_seconds_total']:.2f} s; in request handlers "
        f"{sum(result['server_seconds'].values()):.2f} s, of which validation (_admit) {inside.get('_admit', 0):.2f} s,"
        f" GC sweep after each write {inside.get('_collect_garbage', 0):.2f} s, object scans (_live: LIST) "
        f"{inside.get('_live', 0):.2f} s, watch-event copies {inside.get('_emit', 0):.2f} s"
    )
    by_source: Counter[str] = Counter()
    for key, count in result["requests"].items():
        by_source[key.split()[0]] += count
    print("  per job by source: " + ", ".join(f"{src} {n / jobs:.2f}" for src, n in sorted(by_source.items())))


def report(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    def bound(r: dict[str, Any]) -> str:
        return "" if r["complete"] else ">"

    print(
        f"\n{'N':>6}{'baseline s':>12}{'operator s':>12}{'ratio':>9}{'p50 s':>8}{'p99 s':>9}{'peak MB':>9}  target met"
    )
    for baseline, ours in rows:
        ratio = ours["seconds"] / baseline["seconds"]
        ours["ratio"] = ratio
        fast, small = ratio < TARGET_RATIO and ours["complete"], ours["operator_peak_mb"] < TARGET_MB
        b = bound(ours)
        print(
            f"{ours['jobs']:>6}{baseline['seconds']:>12.2f}{b + format(ours['seconds'], '.2f'):>12}"
            f"{b + format(ratio, '.2f') + 'x':>9}{ours['p50']:>8.2f}{b + format(ours['p99'], '.2f'):>9}"
            f"{ours['operator_peak_mb']:>9.0f}  {'yes' if fast and small else 'no'} "
            f"(< {TARGET_RATIO:g}x: {'yes' if fast else 'no'}, < {TARGET_MB:g} MB: {'yes' if small else 'no'})"
        )
    if any(not ours["complete"] for _, ours in rows):
        print("  > : the operator had not made every pod when the arm timed out (--timeout); lower bounds")
    head = f"{'N':>6}{'arm':>10}{'pods made after (s) at 10/25/50/75/90/100 %':>46}"
    print(f"\n{head}{'emulator CPU s':>16}{'operator CPU s':>16}")
    for pair in rows:
        for r in pair:
            after = " ".join(f"{v:6.1f}" for v in r["pods_after"].values())
            print(
                f"{r['jobs']:>6}{r['arm']:>10}{after:>46}"
                f"{r['emulator_cpu_seconds_to_last_pod']:>16.2f}{r['operator_cpu_seconds_to_last_pod']:>16.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--out", type=Path, help="write every measurement as JSON here")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (the operator has 16 threads)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds an arm may take to get every pod")
    parser.add_argument("--workdir", type=Path, help="keep kubeconfigs and operator logs here (default: a temp dir)")
    parser.add_argument(
        "--operator-env", nargs="*", default=[], metavar="KEY=VALUE", help="extra environment of the operator"
    )
    parser.add_argument(
        "--skip-gc-sweep",
        action="store_true",
        help="skip the emulator's O(objects) GC sweep after each write (nothing is deleted here, so it never acts)",
    )
    parser.add_argument("--arms", nargs="+", choices=("baseline", "operator"), default=["baseline", "operator"])
    parser.add_argument(
        "--steady",
        type=float,
        default=120.0,
        help="seconds to keep the operator arm polling after the last pod, to measure requests per minute",
    )
    parser.add_argument("--child", choices=("baseline", "operator"), help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = asyncio.run(drive(args.child, args.kubeconfig, args.jobs[0], args.concurrency))
        args.result.write_text(json.dumps(result))
        return

    install_hooks(skip_gc_sweep=args.skip_gc_sweep)
    results: list[list[dict[str, Any]]] = []
    from tests.harness.prometheus import prometheus_binary, start_prometheus

    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(item.split("=", 1) for item in args.operator_env)
        binary = prometheus_binary()
        prometheus = start_prometheus(binary, workdir / "prometheus") if binary else None
        if prometheus is None:
            print("prometheus is not installed: the jobs watch their data but have no drift query", file=sys.stderr)
        url = prometheus.url if prometheus is not None else None
        for jobs in args.jobs:
            pair = []
            for arm in args.arms:
                pair.append(
                    run_arm(
                        arm,
                        jobs,
                        workdir,
                        concurrency=args.concurrency,
                        timeout=args.timeout,
                        operator_env=env,
                        steady=args.steady if arm == "operator" else 0.0,
                        prometheus_url=url,
                    )
                )
                r = pair[-1]
                print(f"{jobs} jobs, {arm}: {r['seconds']:.2f}s ({r['pods']} pods)", file=sys.stderr, flush=True)
            if len(pair) == 2 and pair[0].pop("pod_spec") != pair[1].pop("pod_spec"):
                raise RuntimeError("the baseline's pods differ from the operator's")
            results.append(pair)
        if prometheus is not None:
            prometheus.server.stop()
            prometheus.exporter.stop()
    if args.out:
        args.out.write_text(json.dumps([r for pair in results for r in pair], indent=2))
    if all(len(pair) == 2 for pair in results):
        report([(pair[0], pair[1]) for pair in results])
    for pair in results:
        for r in pair:
            breakdown(r)
    for pair in results:
        for r in pair:
            steady = r.get("steady_state_per_minute")
            if steady:
                print(
                    f"\n{r['jobs']} jobs polling (new data every 1m on {steady['distinct_dataset_prefixes']:.0f} "
                    f"distinct prefixes, drift every 1m): {steady['tuneloop_operator_dataset_listings_total']:.1f} "
                    f"S3 listings/min, {steady['tuneloop_operator_drift_queries_total']:.1f} Prometheus queries/min"
                )


if __name__ == "__main__":
    main()
