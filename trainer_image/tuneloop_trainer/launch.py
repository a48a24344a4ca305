"""``python -m tuneloop_trainer.launch <torchrun arguments>``: torchrun that keeps the exit-code contract.

Distributed runs (``resources.nodes > 1`` or ``resources.gpus > 1``) start one trainer process
per GPU through ``torch.distributed.run``. Plain torchrun ends with exit code 1 whatever its
workers said, which would turn a permanent failure (invalid data, exit 11) into a retryable
crash. This launcher runs torchrun in-process and ends with:

- the first permanent code (10-13, :mod:`tuneloop.contract`) any local worker exited with;
- else the first worker's non-zero code (a crash stays a crash, a SIGTERM stays 143);
- 128 + N when the launcher itself was stopped by signal N (SIGTERM on pod deletion: torchrun
  passes it to the workers, which checkpoint before they exit).
"""

from __future__ import annotations

import sys

from tuneloop.contract import PERMANENT_EXIT_CODES


def exit_code_for(codes: list[int]) -> int:
    """The pod's exit code from its workers' codes (in local-rank order)."""
    permanent = [c for c in codes if c in {int(p) for p in PERMANENT_EXIT_CODES}]
    if permanent:
        return permanent[0]
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    code = failed[0]
    return 128 - code if code < 0 else code  # a worker killed by signal N reports -N


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: PLC0415
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415
    from torch.distributed.run import parse_args, run  # noqa: PLC0415

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        code = exit_code_for([f.exitcode for _, f in failures])
        print(f"tuneloop launch: worker(s) failed, exiting with {code}", file=sys.stderr)
        return code or 1
    except SignalException as exc:
        print(f"tuneloop launch: stopped by {exc.sigval.name}", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
