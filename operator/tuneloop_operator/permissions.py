"""The Kubernetes API permissions the operator needs, and the roles that grant them.

Canonical: ``RULES`` is the list of every call the operator makes, each with the reason it
makes it. The Helm chart (``helm/tuneloop``) renders them, and a unit test renders the chart
and fails when its ClusterRole or Roles differ from these, so a new API call means a new rule
here first.

Two modes, as the chart offers them:

* **cluster-wide** (the default): one ClusterRole with every rule in ``RULES``
  (:func:`cluster_role`), bound cluster-wide; the operator watches every namespace, or the
  ones ``TUNELOOP_NAMESPACES`` lists.
* **namespaced**: ``TUNELOOP_NAMESPACES`` lists the namespaces, and each of them gets a Role
  with :data:`NAMESPACED_RULES` (:func:`namespaced_role`). The operator then serves the listed
  namespaces without Kopf's cluster scan, so the cluster-scoped rules (namespaces, CRDs) are
  not needed: :data:`CLUSTER_RULES_WHEN_NAMESPACED` is empty, and no ClusterRole is made.

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
    cluster_scoped: bool = False
    """The resources are cluster-scoped (a Role cannot grant them); the operator uses them only
    for Kopf's cluster scan, which it skips when it serves listed namespaces."""

    def as_policy_rule(self) -> dict[str, list[str]]:
        """The ``rbac.authorization.k8s.io/v1`` PolicyRule, keys in the API's camelCase."""
        return {"apiGroups": list(self.api_groups), "resources": list(self.resources), "verbs": list(self.verbs)}


RULES: Final[tuple[Rule, ...]] = (
    # Watch FineTuneJobs (every namespace, or the listed ones); patch: Kopf's finalizer, progress annotations.
    Rule((GROUP,), ("finetunejobs",), ("get", "list", "watch", "patch")),
    # Status (conditions, progress, attempts) is written through the status subresource, one patch per change.
    Rule((GROUP,), ("finetunejobs/status",), ("patch",)),
    # Trainer pods: created per attempt, watched for exit codes, deleted on retry or cancel.
    Rule((CORE,), ("pods",), ("list", "watch", "create", "delete")),
    # A run's ConfigMap (the job, as job.json) and headless Service (pod 0 for multi-node runs);
    # children are only ever listed by label, never read by name.
    Rule((CORE,), ("configmaps", "services"), ("list", "create", "delete")),
    # The job's spec.storage.secretRef, read by name to fetch the trainer's S3 heartbeat; never listed.
    Rule((CORE,), ("secrets",), ("get",)),
    # Events on the FineTuneJob, the operator's and Kopf's: each a new core v1 Event (POST).
    Rule((CORE,), ("events",), ("create",)),
    # Kopf's cluster-wide namespace scan (which namespaces exist to serve); not in the namespaced mode.
    Rule((CORE,), ("namespaces",), ("list", "watch"), cluster_scoped=True),
    # Kopf's resource scan: notices the FineTuneJob CRD appearing or changing; never writes CRDs.
    # Not in the namespaced mode (the CRDs present at start are served).
    Rule(("apiextensions.k8s.io",), ("customresourcedefinitions",), ("list", "watch"), cluster_scoped=True),
)


#: What a Role in each watched namespace grants in the namespaced mode: every namespaced rule.
NAMESPACED_RULES: Final[tuple[Rule, ...]] = tuple(rule for rule in RULES if not rule.cluster_scoped)

#: What the operator still needs cluster-wide in the namespaced mode: nothing. With the
#: namespaces listed it neither scans namespaces nor watches CRDs (``kopfsetup.configure``), and
#: every other call it makes is namespaced.
CLUSTER_RULES_WHEN_NAMESPACED: Final[tuple[Rule, ...]] = ()


def policy_rules(rules: tuple[Rule, ...]) -> list[dict[str, list[str]]]:
    """``rules`` as RBAC PolicyRules, in order."""
    return [rule.as_policy_rule() for rule in rules]


def cluster_role(name: str) -> dict[str, Any]:
    """The ClusterRole of the cluster-wide mode, granting ``RULES``."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "tuneloop", "app.kubernetes.io/component": "operator"},
        },
        "rules": policy_rules(RULES),
    }


def namespaced_role(name: str, namespace: str) -> dict[str, Any]:
    """The Role of the namespaced mode in one watched namespace, granting ``NAMESPACED_RULES``."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "tuneloop", "app.kubernetes.io/component": "operator"},
        },
        "rules": policy_rules(NAMESPACED_RULES),
    }
