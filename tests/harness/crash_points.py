"""Crash points of the planner's executor, explored exhaustively (Sieve-style) on the simulated
cluster of ``tests/unit/operator/planner_helpers.py``.

The executor (:meth:`tuneloop_operator.executor.PlanExecutor.execute`) carries a plan out as a
sequence of writes: the output claim, the lineage writes (listing, ``promoted.json``, index),
each delete, each create, the status patch, the events. An operator that dies mid-reconcile has
made the first ``k`` of them and nothing after: a status patch not sent is lost, the operator's
memory (the trigger schedule) is gone. :func:`explore` replays a scripted flow once per crash
point (every reconcile of the flow × every ``k`` short of the whole plan), restarts the operator
there (a fresh reconcile from what the API and the output hold), finishes the flow, and checks
the invariants after every reconcile and the user-visible status at the end against the
uninterrupted flow. With ``depth=2`` the restarted operator's first reconcile is crashed too, at
each of its own write counts (a crash loop).

A flow is a list of :data:`Step` (a function of the world): :data:`RECONCILE` or a change made
by a user or a kubelet. Kubelet steps act on whatever pods are alive (never on pod names), so a
flow stays meaningful whatever run and attempt numbers a crash led to.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.unit.operator.planner_helpers import World
from tuneloop.api.status import FineTuneJobStatus
from tuneloop_operator.planner import OutputView, Plan, PodView

Step = Callable[[World], None]


def RECONCILE(w: World) -> None:
    w.reconcile()


@dataclass
class Outcome:
    """One replay of a flow (with or without a crash)."""

    visible: dict[str, Any]
    """What a user sees at the end (:func:`visible_status`)."""
    children: list[str]
    """Pods, ConfigMaps and Services at the end."""
    violations: list[str] = field(default_factory=list)
    """Invariants broken during the replay."""
    reconciles: int = 0
    plan_sizes: list[int] = field(default_factory=list)
    """Writes of each reconcile's plan, in order."""
    recovery_sizes: dict[tuple[int, int], int] = field(default_factory=dict)
    """Writes of the plan of the ``depth``-th restart at reconcile ``i``: ``(i, depth) → size``."""


@dataclass
class Exploration:
    """All crash points of one flow."""

    flow: str
    baseline: Outcome
    crash_points: int = 0
    diverged: list[str] = field(default_factory=list)
    """``reconcile i, after k writes: what differs`` for each crash whose end differs."""
    violations: list[str] = field(default_factory=list)


# --- the executor's writes -------------------------------------------------------------------


def writes(the_plan: Plan) -> list[str]:
    """The plan's writes in the executor's order (the status patch counted even when unchanged:
    the executor skips it, the crash point is still there)."""
    out: list[str] = []
    if the_plan.claim is not None:
        out.append("claim")
    if the_plan.record_listing is not None or the_plan.pointer is not None or the_plan.index:
        out.append("lineage")
    out += [f"delete {r.kind}/{r.name}" for r in the_plan.delete]
    out += [f"create {o['kind']}/{o['metadata']['name']}" for o in the_plan.create]
    out.append("status")
    out += [f"event {e.reason}" for e in the_plan.events]
    return out


def apply_prefix(w: World, the_plan: Plan, k: int) -> None:
    """Carry out the first ``k`` writes of the plan (:func:`writes`), as an executor that died
    then would have: the rest never happens."""
    steps = writes(the_plan)
    done = set(steps[:k])
    partial = dataclasses.replace(
        the_plan,
        claim=the_plan.claim if "claim" in done else None,
        record_listing=the_plan.record_listing if "lineage" in done else None,
        pointer=the_plan.pointer if "lineage" in done else None,
        index=list(the_plan.index) if "lineage" in done else [],
        delete=[r for r in the_plan.delete if f"delete {r.kind}/{r.name}" in done],
        create=[o for o in the_plan.create if f"create {o['kind']}/{o['metadata']['name']}" in done],
        events=the_plan.events[: max(0, k - (len(steps) - len(the_plan.events)))],
        trigger_schedule={},  # remembered only after the events: never by an executor that died
    )
    if the_plan.claim is not None and "claim" not in done:
        return  # nothing at all was written
    before = copy.deepcopy(w.body.get("status"))
    patches = w.patches
    w.apply(partial)
    if "status" not in done:
        if before is None:
            w.body.pop("status", None)
        else:
            w.body["status"] = before
        w.patches = patches


def restart_operator(w: World) -> None:
    """What a new operator process does not know: everything the last one only remembered."""
    w.schedule = {}


# --- what a user sees ------------------------------------------------------------------------


def visible_status(w: World) -> dict[str, Any]:
    """The fields a user reads in ``kubectl get -o yaml``: phase, runs, attempts, promotion,
    conditions' status and reason (messages and times left out)."""
    s = w.status
    current = s.current_run
    return {
        "phase": s.phase,
        "current": None
        if current is None
        else {
            "number": current.number,
            "attempts": current.attempts,
            "failures": current.failures,
            "preemptions": current.preemptions,
            "result": current.result,
            "reason": current.reason,
            "causes": [(a.number, a.cause, a.reason) for a in current.history],
        },
        "runs": [(r.number, r.result, r.reason, r.attempts, r.preemptions) for r in s.runs],
        "promoted": s.promoted.run if s.promoted is not None else None,
        "awaiting": s.awaiting_approval.run if s.awaiting_approval is not None else None,
        "conditions": sorted((c.type, c.status, c.reason) for c in s.conditions),
    }


def children(w: World) -> list[str]:
    return sorted(
        [f"Pod/{n}" for n in w.pods] + [f"ConfigMap/{n}" for n in w.config_maps] + [f"Service/{n}" for n in w.services]
    )


# --- invariants ------------------------------------------------------------------------------


class Checker:
    """The invariants, checked after every reconcile of a replay."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.last: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.runs_seen: dict[int, int] = {}

    def check(self, w: World, where: str, *, crashed: bool = False) -> None:
        """After a reconcile; ``crashed``: right after a partial one, where children the status does
        not know yet are expected (the next reconcile must adopt them)."""
        created = Counter(c for c in w.created if c.startswith("Pod/"))
        twice = sorted(name for name, n in created.items() if n > 1)
        if twice:
            self.violations.append(f"{where}: pod(s) created twice: {twice}")
        views = [v for v in (PodView.from_manifest(p) for p in w.pods.values()) if v is not None]
        by_slot = Counter((v.run, v.attempt, v.rank) for v in views)
        dup = [slot for slot, n in by_slot.items() if n > 1]
        if dup:
            self.violations.append(f"{where}: two pods for one (run, attempt, rank): {dup}")
        alive = {(v.run, v.attempt) for v in views if v.alive and not v.deleting}
        if len(alive) > 1:
            self.violations.append(f"{where}: pods of {sorted(alive)} alive at once")
        status = w.status
        current = status.current_run
        if current is not None:
            now = (current.number, current.attempts, current.failures, current.preemptions)
            if now[0] < self.last[0] or (now[0] == self.last[0] and now < self.last):
                self.violations.append(f"{where}: (run, attempts, failures, preemptions) went back {self.last} → {now}")
            self.last = max(self.last, now)
        if crashed:
            return
        known = max([current.number if current is not None else 0, *(r.number for r in status.runs)])
        for kind, store in (("Pod", w.pods), ("ConfigMap", w.config_maps), ("Service", w.services)):
            for name, obj in store.items():
                run = int(obj["metadata"]["labels"]["tuneloop.dev/run"])
                if run > known:
                    self.violations.append(f"{where}: {kind}/{name} of run {run} unknown to the status (orphan)")


# --- replays ---------------------------------------------------------------------------------


def replay(flow: Sequence[Step], make: Callable[[], World], crash: tuple[int, Sequence[int]] | None = None) -> Outcome:
    """Run the flow; with ``crash=(i, [k1, k2...])`` the ``i``-th reconcile makes only ``k1``
    writes, the restarted operator's first reconcile only ``k2``, and so on; then a reconcile runs
    whole and the flow goes on. ``plan_sizes`` gets the sizes of the recovery plans too, as
    ``(i, depth) → size`` in :attr:`Outcome.recovery_sizes`."""
    w = make()
    checker = Checker()
    sizes: list[int] = []
    recovery: dict[tuple[int, int], int] = {}
    n = 0
    for step in flow:
        if step is not RECONCILE:
            step(w)
            continue
        the_plan = w.plan()
        sizes.append(len(writes(the_plan)))
        if crash is not None and crash[0] == n:
            for depth, k in enumerate(crash[1]):
                apply_prefix(w, the_plan, k)
                checker.check(w, f"reconcile {n} (crash {depth + 1} after {k} writes)", crashed=True)
                restart_operator(w)
                the_plan = w.plan()
                recovery[(n, depth + 1)] = len(writes(the_plan))
            w.apply(the_plan)
            checker.check(w, f"reconcile {n} (recovery)")
        else:
            w.apply(the_plan)
            checker.check(w, f"reconcile {n}")
        n += 1
    return Outcome(visible_status(w), children(w), checker.violations, n, sizes, recovery)


def explore(name: str, flow: Sequence[Step], make: Callable[[], World], *, depth: int = 1) -> Exploration:
    """Every crash point of the flow (see the module docstring); with ``depth=2`` also every
    crash point of the restarted operator's first reconcile after each of them (a crash loop)."""
    base = replay(flow, make)
    result = Exploration(flow=name, baseline=base, violations=list(base.violations))

    def visit(i: int, ks: tuple[int, ...]) -> Outcome:
        result.crash_points += 1
        got = replay(flow, make, crash=(i, ks))
        result.violations += [f"{name}: {v}" for v in got.violations]
        if got.visible != base.visible or got.children != base.children:
            result.diverged.append(f"{name}: reconcile {i}, crashes after {list(ks)} writes: {diff(base, got)}")
        return got

    for i, size in enumerate(base.plan_sizes):
        for k in range(size):
            got = visit(i, (k,))
            if depth >= 2:
                for k2 in range(got.recovery_sizes[(i, 1)]):
                    visit(i, (k, k2))
    return result


def diff(base: Outcome, got: Outcome) -> str:
    parts: list[str] = []
    for key in base.visible:
        if base.visible[key] != got.visible[key]:
            parts.append(
                f"{key}: {json.dumps(base.visible[key], default=str)} → {json.dumps(got.visible[key], default=str)}"
            )
    if base.children != got.children:
        parts.append(f"children: {base.children} → {got.children}")
    return "; ".join(parts)


# --- kubelet and user steps that do not name pods ---------------------------------------------


def start_all(w: World) -> None:
    alive = [n for n in w.alive_pods() if not w.pods[n]["metadata"].get("deletionTimestamp")]
    if alive:
        w.start(*alive)


def _each_alive(w: World, act: Callable[[str], None]) -> None:
    for name in w.alive_pods():
        act(name)


def succeed_all(summary: Callable[[int], str]) -> Step:
    def step(w: World) -> None:
        for name in w.alive_pods():
            run = int(w.pods[name]["metadata"]["labels"]["tuneloop.dev/run"])
            w.succeed(name, summary(run))

    return step


def fail_all(code: int, message: str = "") -> Step:
    return lambda w: _each_alive(w, lambda n: w.fail(n, code, message))


def fail_first(code: int) -> Step:
    def step(w: World) -> None:
        alive = w.alive_pods()
        if alive:
            w.fail(alive[0], code)

    return step


def preempt_first(w: World) -> None:
    alive = w.alive_pods()
    if alive:
        w.disrupt(alive[0])


def evict_first(w: World) -> None:
    alive = w.alive_pods()
    if alive:
        w.evict(alive[0])


def advance(seconds: float) -> Step:
    return lambda w: w.advance(seconds)


def set_spec(**fields: Any) -> Step:
    return lambda w: w.set_spec(**fields)


def annotate(key: str, value: str) -> Step:
    def step(w: World) -> None:
        w.body["metadata"].setdefault("annotations", {})[key] = value

    return step


def status_of(w: World) -> FineTuneJobStatus:
    return w.status


class CrashWorld(World):
    """:class:`World` whose output tells a claimed run nobody started (only ``run.json`` under
    ``runs/<n>/``: no pod of it was ever created) from one a trainer wrote to, as S3 does."""

    def output_view(self) -> OutputView:
        view = super().output_view()
        if view.error is not None or not view.highest_run:
            return view
        name = self.body["metadata"]["name"]
        started = any(c.startswith(f"Pod/{name}-r{view.highest_run}-") for c in self.created)
        claimant = None if started else self.output_runs.get(view.highest_run)
        return dataclasses.replace(view, unstarted_claimant=claimant)
