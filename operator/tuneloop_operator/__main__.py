"""``python -m tuneloop_operator``: run the operator (configuration: environment variables, see
:mod:`tuneloop_operator.settings`)."""

from __future__ import annotations

import logging
import sys

import kopf

from tuneloop_operator.settings import OperatorSettings, SettingsError


def main() -> int:
    try:
        config = OperatorSettings.from_env()
    except SettingsError as exc:
        print(f"tuneloop-operator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Client libraries' debug output (request signing, connection pools) is noise in an operator log.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.getLogger().level, logging.INFO))
    import tuneloop_operator.handlers  # noqa: F401, PLC0415 - registers the handlers

    liveness = f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None
    kopf.run(
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        standalone=True,
        liveness_endpoint=liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
