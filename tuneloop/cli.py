"""The ``tuneloop`` command line.

    tuneloop validate FILE...   check FineTuneJob manifests (exit 0 when all are valid)
    tuneloop run JOB.yaml       fine-tune locally (the trainer, in a child process)
    tuneloop crd [--check]      regenerate (or check) crds/, the chart's crds/ and docs/api.md from the models

Exit codes of ``validate``: 0 all valid, 1 some manifest is invalid, 2 a file could not
be read as YAML (missing, too large, malformed, a key written twice).

Exit codes of ``run`` are the trainer's (:class:`tuneloop.contract.ExitCode`): 10 also when the
manifest cannot be read or is invalid, 130 after Ctrl-C and 143 after SIGTERM (the trainer
finished its step and saved a checkpoint), 128+N when the trainer was killed by signal N.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

from tuneloop import __version__
from tuneloop.contract import ExitCode
from tuneloop.manifests import ManifestError, read_manifests, single_fine_tune_job
from tuneloop.validate import Problem, validate_manifest

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2
#: ``tuneloop run`` without the trainer installed: a usage error, like a bad argument.
EXIT_NO_TRAINER = 2
#: Signals ``tuneloop run`` passes on to the trainer, which finishes its step, checkpoints and exits.
FORWARDED_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG: Final = 1


def _cmd_validate(args: argparse.Namespace) -> int:
    reports: list[dict[str, Any]] = []
    invalid = unreadable = valid = 0
    for path in args.files:
        error: ManifestError | None = None
        try:
            documents = read_manifests(path)
        except ManifestError as exc:
            error, documents = exc, exc.documents
        if not documents and error is None:
            unreadable += 1
            reports.append({"source": path, "error": "no YAML documents in the file"})
            if args.output == "text":
                print(f"error: {path}: no YAML documents in the file", file=sys.stderr)
            continue
        for doc in documents:
            _job, problems = validate_manifest(doc.body)
            reports.append(
                {
                    "source": doc.source,
                    "document": doc.index,
                    "line": doc.line,
                    "valid": not problems,
                    "problems": [{"path": p.path, "message": p.message, "hint": p.hint} for p in problems],
                }
            )
            if problems:
                invalid += 1
                if args.output == "text":
                    _print_problems(doc.describe(), problems)
            else:
                valid += 1
                if args.output == "text" and not args.quiet:
                    print(f"ok: {doc.describe()}")
        if error is not None:
            unreadable += 1
            reports.append({"source": path, "error": str(error)})
            if args.output == "text":
                print(f"error: {error}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps({"valid": valid, "invalid": invalid, "unreadable": unreadable, "reports": reports}, indent=2))
    elif not args.quiet or invalid or unreadable:
        total = valid + invalid
        print(
            f"{total} manifest{'s' if total != 1 else ''} checked: {valid} valid, {invalid} invalid"
            + (f"; {unreadable} file{'s' if unreadable != 1 else ''} unreadable" if unreadable else ""),
            file=sys.stderr if (invalid or unreadable) else sys.stdout,
        )
    if unreadable:
        return EXIT_UNREADABLE
    return EXIT_INVALID if invalid else EXIT_OK


def _print_problems(where: str, problems: list[Problem]) -> None:
    count = len(problems)
    print(f"invalid: {where}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
    for problem in problems:
        for i, line in enumerate(str(problem).splitlines()):
            print(("  - " if i == 0 else "    ") + line, file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    """Validate here (fast, no torch import), then hand over to the trainer package."""
    invalid = int(ExitCode.INVALID_CONFIG)  # the code the trainer itself uses for a bad manifest
    try:
        documents = read_manifests(args.manifest)
        document = single_fine_tune_job(documents, args.manifest)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return invalid
    _job, problems = validate_manifest(document.body)
    if problems:
        _print_problems(document.describe(), problems)
        return invalid
    if importlib.util.find_spec("tuneloop_trainer") is None or importlib.util.find_spec("torch") is None:
        print("error: the trainer is not installed here; pip install 'tuneloop[trainer]'", file=sys.stderr)
        return EXIT_NO_TRAINER
    command = [sys.executable, "-m", "tuneloop_trainer", "run", args.manifest]
    if args.output:
        command += ["--output", args.output]
    if args.run is not None:
        command += ["--run", str(args.run)]
    # A child process rather than an import: the core never imports the torch stack, and
    # the trainer runs exactly as it does in a pod.
    return run_trainer(command)


def run_trainer(command: list[str]) -> int:
    """Run the trainer as a child process and return its exit code (128+N if signal N killed it).

    The child gets its own session, so a terminal's Ctrl-C reaches it once, through this
    process: SIGINT and SIGTERM are passed on, and the trainer finishes its step, saves a
    checkpoint and exits 130 or 143, which is returned here. On Linux the child is also asked
    to stop (SIGTERM) when this process dies without passing anything on (SIGKILL, a crash), so
    it is never left running on its own.
    """
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)  # arrived while the child was being started
        else:
            child.send_signal(signum)  # a no-op once the child has been reaped

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        # preexec_fn is unsafe with threads; the CLI has none (and it only calls prctl).
        child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            command,
            start_new_session=True,
            preexec_fn=_stop_with_parent(),  # noqa: PLW1509
        )
        for signum in pending:
            child.send_signal(signum)
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        print(f"error: the trainer was killed by {name} (exit {128 - code})", file=sys.stderr)
        return 128 - code
    return code


def _stop_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the child SIGTERM when this process dies (best effort:
    ``None`` where ``prctl`` is not available)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl() took effect: nobody would tell us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _cmd_crd(args: argparse.Namespace) -> int:
    from tuneloop import crd  # noqa: PLC0415  (only this command needs it)

    argv = ["--root", args.root] + (["--check"] if args.check else [])
    return crd.main(argv)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="tuneloop", description="Fine-tune foundation models, continuously, on Kubernetes or locally."
    )
    parser.add_argument("--version", action="version", version=f"tuneloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser(
        "validate",
        help="check FineTuneJob manifests",
        description="Check FineTuneJob manifests (multi-document YAML too). For each problem: the document, "
        "the field path, what is wrong and what to do. Exit 0 when all are valid, 1 when some manifest is "
        "invalid, 2 when a file cannot be read.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="manifest files ('-' reads standard input)")
    validate.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    validate.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    validate.set_defaults(func=_cmd_validate)

    run = sub.add_parser(
        "run",
        help="fine-tune locally from a manifest",
        description="Run a FineTuneJob on this machine: validate, train, evaluate, write the model, model card "
        "and report. Exit codes: 0 passed, 10 invalid config (an unreadable or invalid manifest too), 11 invalid "
        "data, 12 unsupported model, 13 gates not passed, 130 stopped by Ctrl-C and 143 by SIGTERM (a checkpoint "
        "was saved: run again with --run N to resume), 1 or 128+N a crash or a kill by signal N.",
    )
    run.add_argument("manifest", metavar="JOB.yaml", help="a YAML file with one FineTuneJob")
    run.add_argument(
        "--output",
        metavar="DIR|URI",
        help="where the results go: a local directory, or an s3://bucket/prefix/ or file:///dir URI "
        "(default: spec.output.uri)",
    )
    run.add_argument("--run", type=int, help="run number (default: the next free one)")
    run.set_defaults(func=_cmd_run)

    crd = sub.add_parser("crd", help="generate crds/ (and the Helm chart's copy) and docs/api.md from the API models")
    crd.add_argument("--root", default=".", help="repository root (default: .)")
    crd.add_argument("--check", action="store_true", help="fail if the committed files are out of date")
    crd.set_defaults(func=_cmd_crd)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tuneloop`` console script."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
