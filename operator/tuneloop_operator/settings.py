"""The operator's configuration, from environment variables (set by the Deployment).

Every variable has a safe default; a malformed value stops the operator at start with a
message naming the variable, instead of surfacing later as a strange reconcile.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from pydantic import TypeAdapter, ValidationError

from tuneloop.api.spec import Storage
from tuneloop.api.types import LabelName, ObjectName
from tuneloop_operator.render import TRAINER_METRICS_PORT, TrainerDefaults

DEFAULT_TRAINER_IMAGE: Final = "ghcr.io/tuneloop/trainer:0.1.0"

#: The rules a job's own fields follow (``tuneloop.api``), for the defaults that stand in for them.
_NAMESPACE: Final = TypeAdapter(LabelName)
_OBJECT_NAME: Final = TypeAdapter(ObjectName)
_REGION: Final = TypeAdapter(Storage.model_fields["region"].rebuild_annotation())


class SettingsError(ValueError):
    """An environment variable has a value the operator cannot use."""


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def _valid(rule: TypeAdapter[Any], value: str) -> bool:
    try:
        rule.validate_python(value)
    except ValidationError:
        return False
    return True


def _optional(env: Mapping[str, str], name: str, rule: TypeAdapter[Any], what: str) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not _valid(rule, raw):
        raise SettingsError(f"{name}={raw!r} is not {what}")
    return raw


def _endpoint(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{name}={raw!r} is not an http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise SettingsError(f"{name} must be scheme, host and port only (no credentials, query or fragment)")
    return raw


def _namespaces(env: Mapping[str, str]) -> tuple[str, ...]:
    names = tuple(n.strip() for n in env.get("TUNELOOP_NAMESPACES", "").split(",") if n.strip())
    for name in names:
        if not _valid(_NAMESPACE, name):
            raise SettingsError(f"TUNELOOP_NAMESPACES: {name!r} is not a namespace name (patterns are not supported)")
    return tuple(dict.fromkeys(names))


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _number(env, name, default)
    if value != int(value) or not 0 <= value <= 65535:
        raise SettingsError(f"{name}={env.get(name)!r} is not a port number (0-65535; 0 disables)")
    return int(value)


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator is configured with: each field's default and meaning are defined here
    once; the planner reads its knobs (trainer image, backoff, preemption, stuck pods, trainer
    metrics port, platform defaults) from this object as it is."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """``TUNELOOP_TRAINER_IMAGE``: trainer image for jobs that do not name one."""
    namespaces: tuple[str, ...] = ()
    """``TUNELOOP_NAMESPACES``: comma-separated namespaces to watch; empty = cluster-wide. Listed
    namespaces are served exactly, without a cluster-wide scan of namespaces and CRDs, so the
    operator needs no cluster-scoped permission (the chart's namespaced RBAC mode)."""
    metrics_port: int = 8080
    """``TUNELOOP_METRICS_PORT``: the operator's Prometheus ``/metrics`` (0 disables)."""
    health_port: int = 8081
    """``TUNELOOP_HEALTH_PORT``: the liveness endpoint ``/healthz`` (0 disables)."""
    reconcile_interval: float = 30.0
    """``TUNELOOP_RECONCILE_INTERVAL``: seconds between the timer's looks at each job (heartbeat,
    deadlines, TTL); pod events and changes of the job act at once."""
    backoff_base_seconds: float = 10.0
    """``TUNELOOP_BACKOFF_BASE_SECONDS``: delay before the first retry (doubles each time)."""
    backoff_max_seconds: float = 360.0
    """``TUNELOOP_BACKOFF_MAX_SECONDS``: longest delay between retries."""
    max_preemptions: int = 20
    """``TUNELOOP_MAX_PREEMPTIONS``: attempts a run may lose to preemption before it fails."""
    stuck_terminating_seconds: float = 300.0
    """``TUNELOOP_STUCK_TERMINATING_SECONDS``: how long past its grace period a deleted pod may
    still be terminating before the next attempt stops waiting for it (its node is taken as lost)."""
    trainer_metrics_port: int = TRAINER_METRICS_PORT
    """``TUNELOOP_TRAINER_METRICS_PORT``: the port trainer pods export metrics on."""
    watch_timeout: float = 300.0
    """``TUNELOOP_WATCH_TIMEOUT``: seconds before a watch is reopened even if it seems alive."""
    watch_inactivity_timeout: float = 70.0
    """``TUNELOOP_WATCH_INACTIVITY_TIMEOUT``: seconds a watch may stay silent (no event, no bookmark)
    before it is taken as stalled and reopened; counted in ``tuneloop_operator_watch_stalls_total``.
    The API server sends a bookmark about every minute on an idle watch."""
    log_level: str = "INFO"
    """``TUNELOOP_LOG_LEVEL``."""
    default_s3_endpoint: str | None = None
    """``TUNELOOP_DEFAULT_S3_ENDPOINT``: S3 endpoint for jobs that set no ``spec.storage.endpoint``
    (unset: AWS)."""
    default_s3_region: str | None = None
    """``TUNELOOP_DEFAULT_S3_REGION``: region for jobs that set no ``spec.storage.region``."""
    default_storage_secret: str | None = None
    """``TUNELOOP_DEFAULT_STORAGE_SECRET``: Secret (in the job's namespace) holding S3 keys, for jobs
    that set no ``spec.storage.secretRef`` (unset: the pod's identity, e.g. IRSA)."""
    trainer_service_account: str | None = None
    """``TUNELOOP_TRAINER_SERVICE_ACCOUNT``: ServiceAccount of trainer pods (it must exist in each
    job's namespace); unset: the namespace's ``default``."""

    def trainer_defaults(self) -> TrainerDefaults:
        """The platform's defaults for what a job's spec leaves out."""
        return TrainerDefaults(
            s3_endpoint=self.default_s3_endpoint,
            s3_region=self.default_s3_region,
            storage_secret=self.default_storage_secret,
            service_account=self.trainer_service_account,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        namespaces = _namespaces(env)
        preemptions = _number(env, "TUNELOOP_MAX_PREEMPTIONS", cls.max_preemptions)
        if preemptions != int(preemptions):
            raise SettingsError("TUNELOOP_MAX_PREEMPTIONS must be a whole number")
        return cls(
            trainer_image=env.get("TUNELOOP_TRAINER_IMAGE", "").strip() or DEFAULT_TRAINER_IMAGE,
            namespaces=namespaces,
            metrics_port=_port(env, "TUNELOOP_METRICS_PORT", cls.metrics_port),
            health_port=_port(env, "TUNELOOP_HEALTH_PORT", cls.health_port),
            reconcile_interval=_number(env, "TUNELOOP_RECONCILE_INTERVAL", cls.reconcile_interval, minimum=0.1),
            backoff_base_seconds=_number(env, "TUNELOOP_BACKOFF_BASE_SECONDS", cls.backoff_base_seconds),
            backoff_max_seconds=_number(env, "TUNELOOP_BACKOFF_MAX_SECONDS", cls.backoff_max_seconds),
            max_preemptions=int(preemptions),
            stuck_terminating_seconds=_number(env, "TUNELOOP_STUCK_TERMINATING_SECONDS", cls.stuck_terminating_seconds),
            trainer_metrics_port=_port(env, "TUNELOOP_TRAINER_METRICS_PORT", cls.trainer_metrics_port),
            watch_timeout=_number(env, "TUNELOOP_WATCH_TIMEOUT", cls.watch_timeout, minimum=1.0),
            watch_inactivity_timeout=_number(
                env, "TUNELOOP_WATCH_INACTIVITY_TIMEOUT", cls.watch_inactivity_timeout, minimum=1.0
            ),
            log_level=env.get("TUNELOOP_LOG_LEVEL", cls.log_level).strip().upper() or cls.log_level,
            default_s3_endpoint=_endpoint(env, "TUNELOOP_DEFAULT_S3_ENDPOINT"),
            default_s3_region=_optional(env, "TUNELOOP_DEFAULT_S3_REGION", _REGION, "an S3 region name"),
            default_storage_secret=_optional(
                env, "TUNELOOP_DEFAULT_STORAGE_SECRET", _OBJECT_NAME, "a Secret name (a DNS subdomain)"
            ),
            trainer_service_account=_optional(
                env, "TUNELOOP_TRAINER_SERVICE_ACCOUNT", _OBJECT_NAME, "a ServiceAccount name (a DNS subdomain)"
            ),
        )
