"""How Kopf runs this operator: its settings (finalizer, where its bookkeeping lives, watch
timeouts, queueing, posting, peering, scanning) and :class:`WatchStallCounter`, which counts the
silent watch streams those timeouts make Kopf reopen."""

from __future__ import annotations

import logging
import re
from typing import Final

import kopf
from prometheus_client import Counter

from tuneloop.api import GROUP
from tuneloop_operator.render import LABEL_MANAGED_BY, MANAGED_BY
from tuneloop_operator.settings import OperatorSettings

FINALIZER: Final = f"{GROUP}/finalizer"

#: Kopf's watcher says so, at DEBUG level, when a watch stream stayed silent past the inactivity timeout.
WATCH_LOGGER: Final = "kopf._cogs.clients.watching"
_STALLED: Final = re.compile(r"^Watch-stream for (?P<resource>[^\s./]+)\S* .* is inactive, reconnecting\.$")


class WatchStallCounter(logging.Filter):
    """Counts the watch streams Kopf found stalled and reopened (``tuneloop_operator_watch_stalls_total``).

    Kopf reports a stall only in a DEBUG line of its watcher's logger. Installed on that logger, this
    filter counts each such line by resource and lets through only what the operator's log level
    shows, so counting needs no DEBUG log.
    """

    def __init__(self, counter: Counter, shown_from: int) -> None:
        super().__init__()
        self.counter = counter
        self.shown_from = shown_from

    def filter(self, record: logging.LogRecord) -> bool:
        match = _STALLED.match(record.getMessage())
        if match is not None:
            self.counter.labels(resource=match.group("resource")).inc()
        return record.levelno >= self.shown_from

    def install(self) -> None:
        logger = logging.getLogger(WATCH_LOGGER)
        logger.setLevel(logging.DEBUG)
        logger.addFilter(self)

    def uninstall(self) -> None:
        logger = logging.getLogger(WATCH_LOGGER)
        logger.removeFilter(self)
        logger.setLevel(logging.NOTSET)


def configure(settings: kopf.OperatorSettings, config: OperatorSettings) -> None:
    """Kopf settings, each for a reason."""
    # Our own finalizer name: `kubectl get -o yaml` shows who holds the object.
    settings.persistence.finalizer = FINALIZER
    # Kopf's handler progress and last-handled spec live in annotations under our domain, never
    # in .status (the CRD's strict status schema would prune them).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    # Silent watch stalls are Kopf's best-known failure: have the server end each watch and
    # the client give up on a silent connection, so a stalled stream is reopened.
    settings.watching.server_timeout = int(config.watch_timeout)
    settings.watching.client_timeout = int(config.watch_timeout) + 60
    settings.watching.connect_timeout = 30
    # A stream that stays open but silent (no event, no bookmark) is given up after this long and
    # reopened from its last resourceVersion; WatchStallCounter counts each time.
    settings.watching.inactivity_timeout = config.watch_inactivity_timeout
    settings.networking.request_timeout = 60
    # Watch only Tuneloop's pods, filtered by the server, not every pod of the cluster.
    settings.watching.label_selectors["v1", "pods"] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    # No limit on Kopf's per-object workers: a worker holds its slot for idle_timeout (5 s) after its
    # last event, so a limit of 64 made every 65th new job wait 5 s (bench/operator_scale.py: 5.2x
    # the direct baseline at 1,000 jobs with it). Concurrency towards the API server is bounded by
    # KubeClient's thread pool instead; idle workers are released after 1 s.
    settings.queueing.worker_limit = None
    settings.queueing.idle_timeout = 1.0
    # Kopf's own log lines become Events only from WARNING up; ours are posted explicitly.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "tuneloop-operator"
    # One replica (Recreate), no peering objects needed; docs/install.md says what more replicas take.
    settings.peering.standalone = True
    settings.peering.mandatory = False
    # Listed namespaces are served as named: no cluster-wide scan of namespaces and CRDs (Kopf's
    # observers), so the namespaced RBAC mode needs no cluster-scoped permission at all. The cost:
    # a change of the CRD's versions is noticed at the next start.
    settings.scanning.disabled = bool(config.namespaces)
