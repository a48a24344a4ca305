"""The Kubernetes API permissions the operator needs, and the ClusterRole that grants them.

Canonical: ``RULES`` is the list of every call the operator makes, each with the reason it
makes it. ``deploy/rbac.yaml`` holds ``cluster_role("tuneloop-operator")`` verbatim, and a
unit test fails when the two differ, so a new API call means a new rule here first.

Least privilege, on purpose: no wildcards, no ``update`` (everything is a patch), Secrets
readable one by one but never listed or watched, no ``pods/exec``, and CRDs only observed.
Pure data: no Kopf, no API client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

CORE: Final = ""
GROUP: Final = "tuneloop.dev"


@dataclass(frozen=True)
class Rule:
    """One RBAC policy rule: every verb on every resource in every group listed."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]

    def as_policy_rule(self) -> dict[str, list[str]]:
        """The ``rbac.authorization.k8s.io/v1`` PolicyRule, keys in the API's camelCase."""
        return {"apiGroups": list(self.api_groups), "resources": list(self.resources), "verbs": list(self.verbs)}


RULES: Final[tuple[Rule, ...]] = (
    # Watch FineTuneJobs cluster-wide; patch for Kopf's finalizer and its progress annotations.
    Rule((GROUP,), ("finetunejobs",), ("get", "list", "watch", "patch")),
    # Status (conditions, progress, attempts) is written through the status subresource, one patch per change.
    Rule((GROUP,), ("finetunejobs/status",), ("get", "patch")),
    # Trainer pods: created per attempt, watched for exit codes, deleted on retry or cancel.
    Rule((CORE,), ("pods",), ("get", "list", "watch", "create", "delete")),
    # A run's ConfigMap (the job, as job.json) and headless Service (pod 0 for multi-node runs).
    Rule((CORE,), ("configmaps", "services"), ("get", "list", "create", "delete")),
    # The job's spec.storage.secretRef, read by name to fetch the trainer's S3 heartbeat; never listed.
    Rule((CORE,), ("secrets",), ("get",)),
    # Kopf posts events on the FineTuneJob (core v1), newer clients through events.k8s.io.
    Rule((CORE, "events.k8s.io"), ("events",), ("create", "patch")),
    # Kopf's cluster-wide namespace scan (which namespaces exist to serve).
    Rule((CORE,), ("namespaces",), ("list", "watch")),
    # Kopf's resource scan: notices the FineTuneJob CRD appearing or changing; never writes CRDs.
    Rule(("apiextensions.k8s.io",), ("customresourcedefinitions",), ("list", "watch")),
)


def cluster_role(name: str) -> dict[str, Any]:
    """The ClusterRole granting ``RULES``, as the manifest committed in ``deploy/rbac.yaml``."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "tuneloop", "app.kubernetes.io/component": "operator"},
        },
        "rules": [rule.as_policy_rule() for rule in RULES],
    }
