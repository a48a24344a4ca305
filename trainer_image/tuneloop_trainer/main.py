"""The trainer's entry points.

In a pod (the operator mounts the validated job as JSON)::

    python -m tuneloop_trainer --config /etc/tuneloop/job.json --run 3

On a laptop (what ``tuneloop run`` calls)::

    python -m tuneloop_trainer run job.yaml --output ./out

Exit codes follow :class:`tuneloop.contract.ExitCode`: 0 success, 10-13 permanent
failures (invalid config, invalid data, unsupported model, gate failed), 143 after SIGTERM
and 130 after SIGINT (step finished, checkpoint saved), 1 for a crash or a transient storage
error; everything but 10-13 is retryable. A failure ends stderr with one line that starts
with ``error (<reason>, exit <code>, ...)`` and the cause, and writes the same cause first
into the termination message and the status file (``runs/<n>/status.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.api import FineTuneJob
from tuneloop.contract import TERMINATION_MESSAGE_MAX_BYTES, TERMINATION_MESSAGE_PATH, ExitCode
from tuneloop.manifests import ManifestError, read_manifests, single_fine_tune_job
from tuneloop.validate import validate_manifest

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneloop.lease import WriterLease
    from tuneloop_trainer.errors import Failure
    from tuneloop_trainer.recipe import FineTuneRecipe

log = logging.getLogger("tuneloop_trainer")

#: Exit code after SIGINT (Ctrl-C) as a shell reports it (128 + 2): retryable. SIGTERM: 143.
EXIT_CTRL_C = 128 + signal.SIGINT


def _quiet_libraries() -> None:
    """Keep the log about the run, not about library internals."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "peft", "accelerate", "botocore", "urllib3", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_job(body: Any, source: str) -> FineTuneJob:
    """Validate a job body (a full manifest, or a bare spec plus ``TUNELOOP_JOB_NAME``)."""
    from tuneloop_trainer.errors import InvalidConfigError  # noqa: PLC0415

    if isinstance(body, dict) and "spec" not in body and "task" in body:
        body = {
            "apiVersion": "tuneloop.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": os.environ.get("TUNELOOP_JOB_NAME", "job")},
            "spec": body,
        }
    job, problems = validate_manifest(body)
    if job is None:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise InvalidConfigError(f"{source} is not a valid FineTuneJob:\n{lines}")
    return job


#: Summary keys dropped, in this order, while the termination message is over 4 KiB: the
#: detail the model card has too goes first.
_DROPPABLE_KEYS = ("dataDriftDetail", "dataFingerprint", "bestStep", "steps", "promotedMetrics", "metrics")
#: Keys the shortest form keeps (with the start of ``message`` and each gate's pass flag).
_ESSENTIAL_KEYS = ("result", "reason", "modelUri", "promotedRun", "dataDrift")


def write_termination_message(summary: dict[str, Any]) -> None:
    """The final summary, where Kubernetes copies it into the pod status (<= 4 KiB).

    Too long, it drops detail (the keys in :data:`_DROPPABLE_KEYS`, in order), then keeps only
    ``result``, ``reason``, ``modelUri``, ``promotedRun``, ``dataDrift``, each gate's metric and
    ``passed`` flag, and the start of ``message`` (which starts with the cause), marked
    ``"truncated": true``; it is always valid JSON."""
    path = Path(os.environ.get("TUNELOOP_TERMINATION_LOG", TERMINATION_MESSAGE_PATH))
    text = termination_message(summary)
    try:
        if path.parent.is_dir():
            path.write_text(text)
    except OSError as exc:  # not in a pod, or a read-only file system
        log.debug("no termination message written to %s: %s", path, exc)


def termination_message(summary: dict[str, Any]) -> str:
    """``summary`` as compact JSON of at most :data:`TERMINATION_MESSAGE_MAX_BYTES` bytes."""

    def dump(value: dict[str, Any]) -> str:
        return json.dumps(value, separators=(",", ":"), sort_keys=True)

    text = dump(summary)
    if len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES:
        return text
    trimmed = dict(summary)
    for key in _DROPPABLE_KEYS:
        if trimmed.pop(key, None) is not None:
            text = dump({**trimmed, "truncated": True})
            if len(text.encode()) <= TERMINATION_MESSAGE_MAX_BYTES:
                return text
    short: dict[str, Any] = {
        k: v if isinstance(v, int | float) and not isinstance(v, bool) else str(v)[:512]
        for k, v in summary.items()
        if k in _ESSENTIAL_KEYS
    }
    gates = summary.get("gates")
    if isinstance(gates, list):
        short["gates"] = [
            {"metric": str(g.get("metric"))[:64], "passed": bool(g.get("passed"))}
            for g in gates[:16]
            if isinstance(g, dict)
        ]
    short["truncated"] = True
    message = str(summary.get("message", ""))
    room = TERMINATION_MESSAGE_MAX_BYTES - len(dump({**short, "message": ""}).encode())
    # Escapes (\n, \u00e9) make the JSON longer than the text: cut, measure, cut more.
    cut = min(len(message), max(0, room))
    while cut > 0 and len(dump({**short, "message": message[:cut]}).encode()) > TERMINATION_MESSAGE_MAX_BYTES:
        cut = cut * 9 // 10
    return dump({**short, "message": message[:cut]})


def report_failure(failure: Failure, exc: BaseException) -> None:
    """Say why the run failed: the traceback first for a crash (the full story, in the pod log),
    then one line that starts with the cause, and the termination message for the operator."""
    if failure.traceback:
        traceback.print_exception(exc, file=sys.stderr)
    kind = "permanent" if failure.permanent else "retryable"
    print(f"error ({failure.reason}, exit {failure.exit_code}, {kind}): {failure.message}", file=sys.stderr)
    write_termination_message({"result": "Failed", "reason": failure.reason, "message": failure.message})


def stop_message(signal_name: str, step: int, last_checkpoint: int | None, resume: str | None, run: int) -> str:
    """``stopped on SIGTERM at step 12; checkpoint saved; resume with tuneloop run job.yaml --run 3``."""
    if last_checkpoint is not None and last_checkpoint == step:
        saved = "checkpoint saved"
    elif last_checkpoint is not None:
        saved = f"no checkpoint at this step; the last one is at step {last_checkpoint}"
    else:
        saved = "no checkpoint yet"
    then = f"resume with {resume} --run {run}" if resume else "the next attempt resumes from the last checkpoint"
    return f"stopped on {signal_name} at step {step}; {saved}; {then}"


def _last_checkpoint(recipe: FineTuneRecipe, heartbeat: Any) -> int | None:
    """The step of the run's latest complete checkpoint: as reported while training, else as stored
    (a run stopped before its first new step still has the checkpoint it resumed from)."""
    if heartbeat is not None and heartbeat.last_checkpoint is not None:
        return int(heartbeat.last_checkpoint.step)
    checkpoints = recipe.checkpoints
    if checkpoints is None:
        return None
    try:
        info = checkpoints.latest_complete()
    except Exception:  # storage trouble while stopping: say less, do not fail the stop
        log.debug("latest checkpoint not found", exc_info=True)
        return None
    return None if info is None else int(info.step)


#: A URI's scheme (``s3://``, ``file://``, ``gs://``): what tells an output URI from a local path.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def resolve_output(value: str, source: str = "--output") -> str:
    """The output URI for ``--output``: an ``s3://`` or ``file://`` URI as given, anything else a local
    directory (made absolute). Raises InvalidConfigError for another scheme or an existing file."""
    from tuneloop.api.types import check_uri  # noqa: PLC0415
    from tuneloop_trainer.errors import InvalidConfigError  # noqa: PLC0415

    if _SCHEME.match(value):
        try:
            uri = check_uri(value, ("s3", "file"))
        except ValueError as exc:
            raise InvalidConfigError(f"{source}: {exc}") from None
    else:
        uri = "file://" + str(Path(value).expanduser().resolve())
    check_output_location(uri, source)
    return uri


def check_output_location(uri: str, source: str) -> None:
    """A local output must be a directory (or not exist yet): never write runs/ into a file's place."""
    from tuneloop_trainer.errors import InvalidConfigError  # noqa: PLC0415

    if not uri.startswith("file://"):
        return
    path = Path(uri.removeprefix("file://"))
    if path.exists() and not path.is_dir():
        raise InvalidConfigError(f"{source}: {path} is a file, not a directory; pass a directory")


def parse_run_number(value: str | None, source: str) -> int | None:
    """A run number given on the command line or in ``TUNELOOP_RUN`` (``None``: not given)."""
    from tuneloop_trainer.errors import InvalidConfigError  # noqa: PLC0415

    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise InvalidConfigError(
            f"{source} must be a run number (1, 2, 3...), got {value[:32]!r}; leave it out to take the next free run"
        )
    return number


@contextmanager
def _refusals_as_output_owned() -> Iterator[None]:
    """:mod:`tuneloop.ownership`'s and :mod:`tuneloop.lease`'s refusal raised as the trainer's
    ``OutputOwned`` (exit 10): not a ``StorageError``, so that no storage retry or fallback on the
    way takes it for a hiccup of the store."""
    from tuneloop.ownership import OutputOwnedError  # noqa: PLC0415
    from tuneloop_trainer.errors import OutputOwned  # noqa: PLC0415

    try:
        yield
    except OutputOwnedError as exc:
        raise OutputOwned(exc.args[0]) from None


def claim_run_number(job: FineTuneJob, output_uri: str, requested: int | None, *, uid: str | None, local: bool) -> int:
    """Claim the output prefix for this job and a run number under it (see :mod:`tuneloop.ownership`).

    ``requested`` is claimed as asked (or confirmed, when this job claimed it before: a retried
    pod, ``--run N`` to resume); without it, the next free number. Another job's output or run
    ends the run with exit 10 (``OutputOwned``) before anything is written. The claim also proves
    that the output location is writable before any long work starts."""
    from tuneloop.contract import spec_hash  # noqa: PLC0415
    from tuneloop.ownership import ClaimedBy, JobIdentity, claim_next_run, claim_output, claim_run  # noqa: PLC0415
    from tuneloop.storage import Storage  # noqa: PLC0415

    storage = Storage.for_uri(output_uri, job.spec.storage)
    me = JobIdentity(name=job.metadata.name, namespace=job.metadata.namespace, uid=uid)
    by: ClaimedBy = "tuneloop run" if local else "trainer"
    with _refusals_as_output_owned():
        claim_output(storage, output_uri, me, continue_lineage=job.spec.output.continue_lineage, by=by)
        if requested is None:
            return claim_next_run(storage, output_uri, me, spec_hash=spec_hash(job.spec), by=by).run
        return claim_run(storage, output_uri, me, requested, spec_hash=spec_hash(job.spec), by=by).run


#: Open files whose locks say "this process writes that run" (held until the process ends).
_RUN_LOCKS: list[Any] = []


def lock_local_run(output_uri: str, run: int) -> int:
    """Hold an exclusive lock on a run in a local output while this process writes it.

    The claim lets the same job take its run again (``--run N`` to resume, a retried attempt),
    so two processes of one job started on one run at once (two terminals, a resume while the
    first is still running) would both write it, and the card of one would describe the model
    of the other. The second is refused instead (exit 10, ``OutputOwned``), before it writes
    anything. The lock is ``flock`` on the run's ``run.json``, released by the kernel when the
    process ends, however it ends. S3 has no locks: there the process holds a writer lease
    instead (:func:`lease_s3_run`)."""
    from tuneloop.contract import Layout  # noqa: PLC0415
    from tuneloop_trainer.errors import OutputOwned  # noqa: PLC0415

    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # not on POSIX
        return run
    if not output_uri.startswith("file://"):
        return run
    claim = Path(output_uri.removeprefix("file://")) / Layout.run_claim(run)
    fh = claim.open("rb")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another process holds it
        fh.close()
        raise OutputOwned(
            f"run {run} under {output_uri} is being written by another process of this job right now; wait for it "
            "to end (then resume it with --run), or leave out --run to start a new run"
        ) from None
    except OSError as exc:  # a filesystem without locks (some network mounts): go on unlocked
        fh.close()
        log.debug("no lock on %s: %s", claim, exc)
        return run
    _RUN_LOCKS.append(fh)
    return run


#: Writer leases this process holds on runs in S3 outputs (released when :func:`main` ends).
_RUN_LEASES: list[WriterLease] = []


def _attempt() -> int:
    """The operator's attempt number of this pod (``TUNELOOP_ATTEMPT``; 0 when not set)."""
    value = os.environ.get("TUNELOOP_ATTEMPT", "")
    try:
        return max(0, int(value)) if value else 0
    except ValueError:
        log.warning("TUNELOOP_ATTEMPT=%r is not an attempt number; taken as 0", value[:32])
        return 0


def lease_s3_run(job: FineTuneJob, output_uri: str, run: int, *, local: bool) -> int:
    """Hold the writer lease of a run in an S3 output while this process writes it.

    What :func:`lock_local_run` does with ``flock`` in a local output, done with a conditional
    write of ``runs/<n>/writer.json`` (see :mod:`tuneloop.lease`): a second writer of the run
    (another ``tuneloop run --run N``, or a zombie pod of an earlier attempt) is refused (exit 10,
    ``OutputOwned``) before it writes anything, unless the lease is released, stale, held by an
    earlier attempt of the operator (``TUNELOOP_ATTEMPT``; ``tuneloop run`` is attempt 0) or by a
    process of this host that has ended. The lease is renewed in the background, checked before
    each checkpoint manifest and the final outputs, and released when :func:`main` ends."""
    from tuneloop.lease import WriterLease  # noqa: PLC0415
    from tuneloop.storage import Storage  # noqa: PLC0415

    if not output_uri.startswith("s3://"):
        return run
    lease = WriterLease(
        Storage.for_uri(output_uri, job.spec.storage), output_uri, run, attempt=0 if local else _attempt()
    )
    with _refusals_as_output_owned():
        lease.acquire()
    if lease.took_over is not None:
        print(f"tuneloop: took over the writer lease of run {run}: {lease.took_over}", file=sys.stderr)
    lease.start()
    _RUN_LEASES.append(lease)
    return run


def _run_lease(output_uri: str, run: int) -> WriterLease | None:
    """The writer lease this process holds on ``run`` (``None``: none, e.g. a local output)."""
    return next((x for x in _RUN_LEASES if x.output_uri == output_uri and x.run == run), None)


def writer_check(lease: WriterLease) -> Callable[[], None]:
    """A check for the recipe to call right before it commits (a checkpoint manifest, the final
    outputs): ``OutputOwned`` (exit 10) once another writer took the run over."""

    def check() -> None:
        with _refusals_as_output_owned():
            lease.check()

    return check


def _shared_run_number(claim: Any) -> int:
    """``claim()`` on the first process; its result on every process of a local multi-process
    launch (each would otherwise claim a number of its own)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return int(claim())
    import torch  # noqa: PLC0415
    from accelerate import PartialState  # noqa: PLC0415
    from accelerate.utils import broadcast_object_list  # noqa: PLC0415

    state = PartialState(cpu=not torch.cuda.is_available())
    box: list[Any] = [None]
    if state.is_main_process:
        try:
            box[0] = int(claim())
        except Exception as exc:  # the other processes must not wait forever for a number
            box[0] = exc
    broadcast_object_list(box, from_process=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return int(box[0])


def _sinks(
    job: FineTuneJob, run: int, output_uri: str, console: Any, uid: str | None, *, lease: WriterLease | None = None
) -> list[Any]:
    """Console progress; the S3 heartbeat the operator reads (runs/<n>/status.json; no longer
    written once ``lease`` is lost to another writer); and the Prometheus endpoint when
    ``TUNELOOP_METRICS_PORT`` is set (the operator sets it in pods)."""
    from tuneloop.contract import Layout  # noqa: PLC0415
    from tuneloop.storage import Storage, safe_join  # noqa: PLC0415
    from tuneloop_trainer.telemetry import HeartbeatSink, PrometheusSink  # noqa: PLC0415

    sinks: list[Any] = [console]
    storage = Storage.for_uri(output_uri, job.spec.storage)
    writing = None if lease is None else (lambda: lease.lost is None)
    sinks.append(
        HeartbeatSink(storage, safe_join(output_uri, Layout.status(run)), run=run, job_uid=uid, writing=writing)
    )
    port = os.environ.get("TUNELOOP_METRICS_PORT")
    if port:
        sinks.append(PrometheusSink(port=int(port), job=job.metadata.name, run=run))
    return sinks


def train(
    job: FineTuneJob, *, run: int | None, output_uri: str, work_dir: Path, local: bool, resume: str | None = None
) -> int:
    """Claim the output and the run (``run``, or the next free one), run the recipe, and map its
    outcome to an exit code. ``resume`` is the command that continues this job (``tuneloop run
    job.yaml``; `` --run N`` is appended), said when the run is stopped."""
    from tuneloop_trainer.errors import failure_of  # noqa: PLC0415
    from tuneloop_trainer.progress import ConsoleProgress, Sinks  # noqa: PLC0415
    from tuneloop_trainer.recipe import FineTuneRecipe, Interrupted, RunContext  # noqa: PLC0415
    from tuneloop_trainer.report import format_summary_table  # noqa: PLC0415
    from tuneloop_trainer.telemetry import HeartbeatSink  # noqa: PLC0415

    console = ConsoleProgress(interval=5.0 if local else 30.0)
    # Only the first process of a distributed run reports; the others train silently.
    main_process = int(os.environ.get("RANK", "0")) == 0
    cache = Path(os.environ.get("TUNELOOP_CACHE_DIR", Path.home() / ".cache" / "tuneloop"))
    # The operator passes the job's uid to its pods: only this job's pods may write its runs.
    uid = None if local else (os.environ.get("TUNELOOP_JOB_UID") or None)
    # Only the first process claims the run and holds its lock (file://) or writer lease (s3://).
    run = _shared_run_number(
        lambda: lease_s3_run(
            job,
            output_uri,
            lock_local_run(output_uri, claim_run_number(job, output_uri, run, uid=uid, local=local)),
            local=local,
        )
    )
    lease = _run_lease(output_uri, run)
    ctx = RunContext(
        job=job,
        run=run,
        output_uri=output_uri,
        work_dir=work_dir,
        sinks=Sinks(_sinks(job, run, output_uri, console, uid, lease=lease) if main_process else []),
        cache_dir=cache,
        job_uid=uid,
        writer_check=None if lease is None else writer_check(lease),
    )

    def say(*args: Any, **kwargs: Any) -> None:
        if main_process:
            print(*args, **kwargs)

    say(f"tuneloop: job {job.metadata.name}, run {run}, task {job.spec.task}, output {output_uri}")
    recipe = FineTuneRecipe(ctx)

    heartbeat = next((s for s in ctx.sinks.sinks if isinstance(s, HeartbeatSink)), None)
    stop: list[int] = []

    def request_stop(signum: int, _frame: Any) -> None:
        # Kubernetes sends SIGTERM (then SIGKILL after the grace period); Ctrl-C sends SIGINT, through
        # `tuneloop run`. Either: finish the step, write a checkpoint, exit 128+signal (retryable).
        # A second SIGINT aborts at once, for whoever cannot wait for the checkpoint.
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not stop:
            stop.append(signum)
        recipe.stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    try:
        result = recipe.run()
    except Interrupted:
        console.close()
        signum = stop[0] if stop else int(signal.SIGTERM)
        last = _last_checkpoint(recipe, heartbeat)
        message = stop_message(signal.Signals(signum).name, recipe.state.step, last, resume, run)
        say(f"\n{message}", file=sys.stderr)
        if heartbeat is not None:
            heartbeat.end("stopped", message)
        if main_process:
            write_termination_message({"result": "Stopped", "reason": "Interrupted", "message": message})
        return 128 + signum
    except KeyboardInterrupt:  # the second SIGINT: no checkpoint for this step
        console.close()
        message = stop_message("a second SIGINT", recipe.state.step, _last_checkpoint(recipe, heartbeat), resume, run)
        message = message.replace("stopped on", "aborted on", 1)
        say(f"\n{message}", file=sys.stderr)
        if heartbeat is not None:
            heartbeat.end("stopped", message)
        return EXIT_CTRL_C
    except Exception as exc:
        console.close()
        failure = failure_of(exc)
        if heartbeat is not None:
            heartbeat.end("failed", failure.message)
        if main_process or failure.traceback:  # a crash may be one rank's own; a permanent cause is everyone's
            report_failure(failure, exc)
        return failure.exit_code
    say("\n" + format_summary_table(result.metrics, result.gates, result.promoted))
    if result.data_drift is not None and result.data_drift.score is not None:  # "not measured" was said already
        say(result.data_drift.summary_line())
    say(f"\nmodel:      {result.model_uri}\nmodel card: {result.card_uri}")
    if result.forgetting is not None and not result.forgetting.passed:
        say(
            f"forgetting: general-domain perplexity rose {result.forgetting.relative_increase:+.1%} "
            f"(limit {result.forgetting.max_increase:.0%})"
        )
    if result.fairness is not None and not result.fairness.passed:
        say(f"fairness:   {result.fairness.metric} gap {result.fairness.gap:.3f} > {result.fairness.max_gap}")
    write_termination_message(result.summary())
    if not result.passed:
        say("result: trained, but the gates did not pass; the model must not be promoted", file=sys.stderr)
        if heartbeat is not None:
            heartbeat.end("failed", f"trained, but the gates did not pass; not to be promoted: {result.model_uri}")
        return int(ExitCode.GATE_FAILED)
    say("result: passed")
    if heartbeat is not None:
        heartbeat.end("succeeded", f"trained; gates passed; model: {result.model_uri}")
    return int(ExitCode.SUCCESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tuneloop_trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="the job as JSON (as the operator mounts it)")
    parser.add_argument(
        "--run",
        default=os.environ.get("TUNELOOP_RUN"),
        help="run number (default: $TUNELOOP_RUN, else 1)",
    )
    parser.add_argument("--output-uri", default=os.environ.get("TUNELOOP_OUTPUT_URI"), help="override spec.output.uri")
    parser.add_argument("--work-dir", default=os.environ.get("TUNELOOP_WORK_DIR"), help="local scratch directory")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a manifest locally")
    run.add_argument("manifest", help="a YAML file with one FineTuneJob")
    run.add_argument("--output", help="local output directory (default: the manifest's spec.output.uri)")
    run.add_argument("--run", dest="run_number", help="run number to claim or resume (default: the next free one)")
    example = sub.add_parser("example", help="write the local sentiment example (data + job.yaml)")
    example.add_argument("directory", help="where to write it")
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    logging.basicConfig(
        level=os.environ.get("TUNELOOP_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    from tuneloop_trainer.errors import failure_of  # noqa: PLC0415

    resume: str | None = None
    try:
        if args.command == "example":
            from tuneloop_trainer.example import write_example  # noqa: PLC0415

            path = write_example(Path(args.directory))
            print(f"wrote {path}")
            return 0
        if args.command == "run":
            try:
                document = single_fine_tune_job(read_manifests(args.manifest), args.manifest)
            except ManifestError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return int(ExitCode.INVALID_CONFIG)
            job = load_job(document.body, args.manifest)
            output_uri = job.spec.output.uri
            if args.output:
                output_uri = resolve_output(args.output)
            else:
                check_output_location(output_uri, "spec.output.uri")
            resume = shlex.join(["tuneloop", "run", args.manifest, *(["--output", args.output] if args.output else [])])
            run_number = parse_run_number(args.run_number, "--run")
            local = True
        else:
            if not args.config:
                build_parser().print_usage(sys.stderr)
                print("error: --config is required (or use the 'run' command)", file=sys.stderr)
                return int(ExitCode.INVALID_CONFIG)
            try:
                body = json.loads(Path(args.config).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                print(f"error: cannot read the job config {args.config}: {exc}", file=sys.stderr)
                return int(ExitCode.INVALID_CONFIG)
            job = load_job(body, args.config)
            output_uri = args.output_uri or job.spec.output.uri
            check_output_location(output_uri, "--output-uri" if args.output_uri else "spec.output.uri")
            run_number = parse_run_number(args.run, "--run (or TUNELOOP_RUN)") or 1
            local = False
        if args.work_dir:
            work = Path(args.work_dir)
            work.mkdir(parents=True, exist_ok=True)
            return train(job, run=run_number, output_uri=output_uri, work_dir=work, local=local, resume=resume)
        with tempfile.TemporaryDirectory(prefix="tuneloop-") as tmp:
            return train(job, run=run_number, output_uri=output_uri, work_dir=Path(tmp), local=local, resume=resume)
    except KeyboardInterrupt:  # before training started (train() handles its own)
        print("stopped on SIGINT before training started", file=sys.stderr)
        return EXIT_CTRL_C
    except Exception as exc:  # a known permanent cause (exit 10-13) or a crash (exit 1, retried)
        failure = failure_of(exc)
        report_failure(failure, exc)
        return failure.exit_code
    finally:
        while _RUN_LOCKS:  # the run is over: another process may write it now
            _RUN_LOCKS.pop().close()
        while _RUN_LEASES:  # the same in S3: a resume right after need not wait for the lease to go stale
            _RUN_LEASES.pop().release()
