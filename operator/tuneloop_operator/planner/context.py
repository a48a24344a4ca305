"""The state one planning pass shares between its decisions (:mod:`.decide`, :mod:`.attempts`, :mod:`.loop`).

A :class:`Pass` holds what was observed (:class:`~.observe.View`, read only), the status and
events being written (:class:`~.status.Report`) and the :class:`~.types.Plan` being built.
"""

from __future__ import annotations

from datetime import datetime

from tuneloop.api import FineTuneJob
from tuneloop.api.status import FineTuneJobStatus
from tuneloop_operator.planner.observe import PodView, View
from tuneloop_operator.planner.status import Report
from tuneloop_operator.planner.types import ObjectRef, Plan
from tuneloop_operator.render import Manifest, render_attempt
from tuneloop_operator.settings import OperatorSettings


class Pass:
    """One planning pass over one job."""

    def __init__(self, view: View, settings: OperatorSettings) -> None:
        self.view = view
        self.settings = settings
        self.plan = Plan(status=view.old)
        self.report = Report(view, self.plan.events)
        self.plan.status = self.report.status
        self.resumed = False
        """The active run was resumed in this pass (``spec.suspend`` turned false)."""
        self.adopting: set[str] = set()
        """Pods this pass creates for an attempt it adopted (not missing: never created yet)."""
        self.restored: list[int] = []
        """Runs this pass restored from the lineage index into a status found empty."""

    @property
    def now(self) -> datetime:
        return self.view.now

    @property
    def status(self) -> FineTuneJobStatus:
        """The status being written (:attr:`Report.status`)."""
        return self.report.status

    def delete_pod(self, pod: PodView) -> None:
        ref = ObjectRef("v1", "Pod", pod.name)
        if not pod.deleting and ref not in self.plan.delete:
            self.plan.delete.append(ref)

    def render_attempt(self, job: FineTuneJob, run: int, attempt: int) -> list[Manifest]:
        """The attempt's pods, plus the run's ConfigMap and Service unless they exist."""
        existing = {("ConfigMap", str((c.get("metadata") or {}).get("name"))) for c in self.view.obs.config_maps}
        existing |= {("Service", str((s.get("metadata") or {}).get("name"))) for s in self.view.obs.services}
        return render_attempt(
            job,
            run,
            attempt,
            image=self.settings.trainer_image,
            owner=self.view.owner,
            metrics_port=self.settings.trainer_metrics_port,
            defaults=self.settings.trainer_defaults(),
            existing=existing,
        )
