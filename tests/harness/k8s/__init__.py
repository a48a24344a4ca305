"""A Kubernetes API-server emulator for tests, built on ``kmock==0.8``'s ``KubernetesEmulator``.

Stock kmock stores objects and streams watch events, but it is not an API server: no
resourceVersion/uid/generation, no conflicts, no status subresource, no selectors, no
PUT, no garbage collection, no CRD registration or validation, and core discovery that real
kubectl cannot read. :class:`KubernetesApiEmulator` keeps kmock's HTTP server, request
recording, reaction DSL (``emu['get /x'] << 500`` still overrides anything) and object
store (``emu.objects[...]`` with history), and serves the Kubernetes API itself with the
semantics listed in tests/README.md ("The Kubernetes API emulator"), including what it
still does not do.

Everything that changes state runs synchronously on the server's event loop, so each API
call is atomic, like a single etcd transaction. :class:`EmulatorThread` runs the server in
a background thread for synchronous tests (Kopf's ``KopfRunner``, kubectl subprocesses).

The modules, one per API-server behaviour:

- ``resources``: what is served (built-in resources, CRD-defined ones); ``errors``: Status bodies;
- ``store``: objects, resourceVersions, the watch-event log, committing a change;
- ``listing`` (GET/LIST, selectors from ``selectors``, tables), ``watch`` (watch streams),
  ``discovery`` (discovery, /version, OpenAPI);
- ``admission`` (schema/CEL validation, defaulting, pruning, metadata rules),
  ``writes`` (create, PUT, the patch types of ``patches``, apply, ``/status``),
  ``deletion`` (DELETE, finalizers, garbage collection);
- ``emulator``: the server class, routing and the Python API; ``thread``: :class:`EmulatorThread`;
  ``protobuf``: the bit of protobuf kubectl's typed ``create`` sends.
"""

from __future__ import annotations

import importlib.metadata

KMOCK_VERSION = "0.8"
if importlib.metadata.version("kmock") != KMOCK_VERSION:  # pragma: no cover - a guard for upgrades
    raise ImportError(
        f"tests.harness.k8s subclasses kmock=={KMOCK_VERSION}; found {importlib.metadata.version('kmock')}"
    )

from tests.harness.k8s.emulator import KubernetesApiEmulator, parse_api_path  # noqa: E402
from tests.harness.k8s.errors import ApiError  # noqa: E402
from tests.harness.k8s.patches import json_merge_patch, strategic_merge_patch  # noqa: E402
from tests.harness.k8s.resources import ResourceDef  # noqa: E402
from tests.harness.k8s.selectors import (  # noqa: E402
    LabelRequirement,
    match_label_selector,
    parse_field_selector,
    parse_label_selector,
)
from tests.harness.k8s.thread import EmulatorThread  # noqa: E402

__all__ = [
    "ApiError",
    "EmulatorThread",
    "KubernetesApiEmulator",
    "LabelRequirement",
    "ResourceDef",
    "json_merge_patch",
    "match_label_selector",
    "parse_api_path",
    "parse_field_selector",
    "parse_label_selector",
    "strategic_merge_patch",
]
