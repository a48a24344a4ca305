"""Planning a reconcile: what the operator should do about one FineTuneJob. Pure.

:func:`plan` takes everything observed about a job (:class:`Observed`: its body, its pods and
other children, the trainer's heartbeat, the output prefix, the time) and returns a
:class:`Plan`: objects to create and delete, the new status, the events to post and when to
look again. Every trigger (create, update, resume after an operator restart, a pod event, a
timer) recomputes the same plan from the same observations, so a lost event or a restarted
operator never loses track of a run.

Glossary (each word means this one thing here):

- **run**: one training of one version of the spec, numbered from 1 per output prefix
  (``runs/<n>/`` in S3); ``status.currentRun``, then a record in ``status.runs``.
- **attempt**: one try at a run: a fresh set of pods, one per node, named
  ``<job>-r<run>-a<attempt>-n<rank>``. A retry, a preemption or a resume makes a new attempt
  of the same run, which resumes from the run's last checkpoint.
- **plan**: what one pass decided (:class:`Plan`), and :func:`plan`, which makes it.
- **reconcile**: the operator's whole handling of a job once (:mod:`tuneloop_operator.runtime`):
  observe, :func:`plan`, carry the plan out, write the status. A **pass** is the planner's part
  of one reconcile (:class:`~.context.Pass`).

Modules, in the order a pass uses them (each imports only those below it):

- :mod:`.decide` — the entry (:func:`plan`) and a job's runs: start, adopt, claim the output,
  supersede, clean up; :mod:`.restore` — a wiped status rebuilt from the output's lineage index
  and promoted pointer; :mod:`.attempts` — the attempts of the active run and how they end;
  :mod:`.loop` — retraining triggers and promotion decisions.
- :mod:`.context` — :class:`~.context.Pass`, the state the decisions share.
- :mod:`.status` — the conditions and events written, ``Ready``/``Reconciling``/``Stalled``.
- :mod:`.observe` — the job and its pods read into views (:class:`~.observe.View`, :class:`PodView`).
- :mod:`.types` — the data types given and returned.
"""

from tuneloop_operator.planner.decide import plan, plan_deletion
from tuneloop_operator.planner.observe import PodView, owner_of, parse_job, parse_status
from tuneloop_operator.planner.types import Event, HistoryView, Observed, OutputClaim, OutputView, Plan

__all__ = [
    "Event",
    "HistoryView",
    "Observed",
    "OutputClaim",
    "OutputView",
    "Plan",
    "PodView",
    "owner_of",
    "parse_job",
    "parse_status",
    "plan",
    "plan_deletion",
]
