"""The trainer's entry points.

In a pod (the operator mounts the validated job as JSON)::

    python -m tuneloop_trainer --config /etc/tuneloop/job.json --run 3

On a laptop (what ``tuneloop run`` calls)::

    python -m tuneloop_trainer run job.yaml --output ./out

Exit codes follow :class:`tuneloop.contract.ExitCode`: 0 success, 10-13 permanent
failures (invalid config, invalid data, unsupported model, gate failed), anything else
is a crash and retryable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from tuneloop.api import FineTuneJob
from tuneloop.contract import TERMINATION_MESSAGE_MAX_BYTES, TERMINATION_MESSAGE_PATH, ExitCode
from tuneloop.manifests import ManifestError, read_manifests, single_fine_tune_job
from tuneloop.validate import validate_manifest

log = logging.getLogger("tuneloop_trainer")

#: Exit code after SIGTERM with a checkpoint written (128 + 15, as a shell reports it): retryable.
EXIT_INTERRUPTED = 143


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


def write_termination_message(summary: dict[str, Any]) -> None:
    """The final summary, where Kubernetes copies it into the pod status (<= 4 KiB)."""
    path = Path(os.environ.get("TUNELOOP_TERMINATION_LOG", TERMINATION_MESSAGE_PATH))
    text = json.dumps(summary, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > TERMINATION_MESSAGE_MAX_BYTES:
        summary = {k: v for k, v in summary.items() if k in ("result", "reason", "message", "modelUri")}
        summary["message"] = str(summary.get("message", ""))[:1024]
        summary["truncated"] = True
        text = json.dumps(summary, separators=(",", ":"), sort_keys=True)[:TERMINATION_MESSAGE_MAX_BYTES]
    try:
        if path.parent.is_dir():
            path.write_text(text)
    except OSError as exc:  # not in a pod, or a read-only file system
        log.debug("no termination message written to %s: %s", path, exc)


def next_run_number(output_uri: str) -> int:
    """1 + the highest ``runs/<n>`` under a local output, for ``tuneloop run``."""
    if not output_uri.startswith("file://"):
        return 1
    runs = Path(output_uri.removeprefix("file://")) / "runs"
    numbers = [int(p.name) for p in runs.glob("*") if p.name.isdigit()] if runs.is_dir() else []
    return max(numbers, default=0) + 1


def _sinks(job: FineTuneJob, run: int, output_uri: str, console: Any) -> list[Any]:
    """Console progress; the S3 heartbeat the operator reads (runs/<n>/status.json); and the
    Prometheus endpoint when ``TUNELOOP_METRICS_PORT`` is set (the operator sets it in pods)."""
    from tuneloop.contract import Layout  # noqa: PLC0415
    from tuneloop.storage import Storage, safe_join  # noqa: PLC0415
    from tuneloop_trainer.telemetry import HeartbeatSink, PrometheusSink  # noqa: PLC0415

    sinks: list[Any] = [console]
    storage = Storage.for_uri(output_uri, job.spec.storage)
    sinks.append(HeartbeatSink(storage, safe_join(output_uri, Layout.status(run)), run=run))
    port = os.environ.get("TUNELOOP_METRICS_PORT")
    if port:
        sinks.append(
            PrometheusSink(port=int(port), job=job.metadata.name, namespace=job.metadata.namespace or "", run=run)
        )
    return sinks


def train(job: FineTuneJob, *, run: int, output_uri: str, work_dir: Path, local: bool) -> int:
    """Run the recipe and map its outcome to an exit code."""
    from tuneloop_trainer.errors import TrainerError  # noqa: PLC0415
    from tuneloop_trainer.progress import ConsoleProgress, Sinks  # noqa: PLC0415
    from tuneloop_trainer.recipe import FineTuneRecipe, Interrupted, RunContext  # noqa: PLC0415
    from tuneloop_trainer.report import format_summary_table  # noqa: PLC0415

    console = ConsoleProgress(interval=5.0 if local else 30.0)
    # Only the first process of a distributed run reports; the others train silently.
    main_process = int(os.environ.get("RANK", "0")) == 0
    cache = Path(os.environ.get("TUNELOOP_CACHE_DIR", Path.home() / ".cache" / "tuneloop"))
    ctx = RunContext(
        job=job,
        run=run,
        output_uri=output_uri,
        work_dir=work_dir,
        sinks=Sinks(_sinks(job, run, output_uri, console) if main_process else []),
        cache_dir=cache,
    )

    def say(*args: Any, **kwargs: Any) -> None:
        if main_process:
            print(*args, **kwargs)

    say(f"tuneloop: job {job.metadata.name}, run {run}, task {job.spec.task}, output {output_uri}")
    recipe = FineTuneRecipe(ctx)

    def request_stop(signum: int, _frame: Any) -> None:
        # Kubernetes sends SIGTERM, then SIGKILL after the grace period: finish the step,
        # write a checkpoint, exit with a retryable code.
        recipe.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    try:
        result = recipe.run()
    except Interrupted as exc:
        console.close()
        say(f"\n{exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainerError as exc:
        console.close()
        say(f"\nrun failed ({exc.reason}, exit {int(exc.exit_code)}): {exc.message}", file=sys.stderr)
        write_termination_message({"result": "Failed", "reason": exc.reason, "message": exc.message})
        return int(exc.exit_code)
    say("\n" + format_summary_table(result.metrics, result.gates))
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
        return int(ExitCode.GATE_FAILED)
    say("result: passed")
    return int(ExitCode.SUCCESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tuneloop_trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="the job as JSON (as the operator mounts it)")
    parser.add_argument(
        "--run",
        type=int,
        default=int(os.environ.get("TUNELOOP_RUN", "0")) or None,
        help="run number (default: $TUNELOOP_RUN, or the next free one for local outputs)",
    )
    parser.add_argument("--output-uri", default=os.environ.get("TUNELOOP_OUTPUT_URI"), help="override spec.output.uri")
    parser.add_argument("--work-dir", default=os.environ.get("TUNELOOP_WORK_DIR"), help="local scratch directory")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a manifest locally")
    run.add_argument("manifest", help="a YAML file with one FineTuneJob")
    run.add_argument("--output", help="local output directory (default: the manifest's spec.output.uri)")
    run.add_argument("--run", dest="run_number", type=int, help="run number (default: next free)")
    example = sub.add_parser("example", help="write the local sentiment example (data + job.yaml)")
    example.add_argument("directory", help="where to write it")
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    logging.basicConfig(
        level=os.environ.get("TUNELOOP_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    from tuneloop_trainer.errors import TrainerError  # noqa: PLC0415

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
                output_uri = "file://" + str(Path(args.output).resolve())
            run_number = args.run_number or next_run_number(output_uri)
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
            run_number = args.run or 1
            local = False
        if args.work_dir:
            work = Path(args.work_dir)
            work.mkdir(parents=True, exist_ok=True)
            return train(job, run=run_number, output_uri=output_uri, work_dir=work, local=local)
        with tempfile.TemporaryDirectory(prefix="tuneloop-") as tmp:
            return train(job, run=run_number, output_uri=output_uri, work_dir=Path(tmp), local=local)
    except TrainerError as exc:
        print(f"error ({exc.reason}): {exc.message}", file=sys.stderr)
        write_termination_message({"result": "Failed", "reason": exc.reason, "message": exc.message})
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
