"""Who may write under an output prefix, and which run numbers are taken.

Two jobs writing to one ``spec.output.uri`` overwrite each other's runs: run directories are
``runs/<n>/`` under it, and nothing else tells two jobs apart. So an output prefix is *owned*
by one job identity, and every run number is *claimed* once:

* ``owner.json`` (:meth:`Layout.OWNER <tuneloop.contract.Layout>`) names the owning job:
  namespace, name and uid (a cluster job), or namespace and name without a uid (local
  ``tuneloop run`` of a manifest). It is created with a conditional write (S3 ``If-None-Match:
  *``; a hard link on a filesystem), so of two jobs racing for a new prefix exactly one wins.
* ``runs/<n>/run.json`` claims run ``n`` for one identity, also with a conditional create,
  before anything else of the run is written. Two ``tuneloop run`` on one output get different
  numbers; the operator claims the number it is about to start.

The rules (:func:`ownership_problem`):

* the owner itself may always write;
* a job re-created under the same namespace and name (a new uid: ``kubectl delete`` then
  ``apply``) takes the prefix over only with ``spec.output.continueLineage: true`` — the owner
  record is then replaced with a conditional write naming the new uid, its predecessors kept in
  ``lineage``; run numbers continue after the predecessor's;
* anyone else is refused with a message naming the owner and what to do.

Stores that ignore conditional headers: see :meth:`tuneloop.storage.S3Storage.create_bytes` (a
check-then-write fallback, with a warning).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from tuneloop.contract import Layout
from tuneloop.storage import NotFoundError, PreconditionFailedError, Storage, StorageError, safe_join

__all__ = [
    "OWNER_FORMAT",
    "RUN_CLAIM_FORMAT",
    "JobIdentity",
    "OutputOwnedError",
    "OwnerRecord",
    "RunClaim",
    "claim_next_run",
    "claim_output",
    "claim_run",
    "highest_run",
    "ownership_problem",
    "read_owner",
]

OWNER_FORMAT: Final = "tuneloop-owner/1"
RUN_CLAIM_FORMAT: Final = "tuneloop-run/1"
#: Predecessors kept in an owner record (a lineage re-created more often keeps the latest).
MAX_LINEAGE: Final = 20
#: Tries of a claim that keeps losing races before giving up.
MAX_TRIES: Final = 20
_RUN_DIR: Final = re.compile(r"^[1-9][0-9]{0,8}$")

ClaimedBy = Literal["operator", "trainer", "tuneloop run"]


class OutputOwnedError(StorageError):
    """The output (or the run number) belongs to another job; the message names it and says what to do."""

    def __init__(self, message: str, *, uri: str | None = None) -> None:
        super().__init__(message, uri=uri, code="OutputOwned")


@dataclass(frozen=True)
class JobIdentity:
    """Who writes: a FineTuneJob of a cluster (with its uid) or local runs of a manifest (no uid)."""

    name: str
    namespace: str | None = None
    uid: str | None = None

    @property
    def local(self) -> bool:
        return self.uid is None

    def same_job(self, other: JobIdentity) -> bool:
        return (self.namespace, self.name, self.uid) == (other.namespace, other.name, other.uid)

    def same_name(self, other: JobIdentity) -> bool:
        return (self.namespace, self.name) == (other.namespace, other.name)

    def describe(self) -> str:
        """``FineTuneJob ml/tiny (uid 1b2c…)`` or ``local runs of FineTuneJob 'tiny' (tuneloop run)``."""
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        if self.uid is None:
            return f"local runs of FineTuneJob {where!r} (tuneloop run)"
        return f"FineTuneJob {where} (uid {self.uid})"

    def to_wire(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "uid": self.uid}

    @classmethod
    def from_wire(cls, raw: Any) -> JobIdentity | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            return None
        namespace, uid = raw.get("namespace"), raw.get("uid")
        return cls(
            name=raw["name"],
            namespace=namespace if isinstance(namespace, str) and namespace else None,
            uid=uid if isinstance(uid, str) and uid else None,
        )


@dataclass(frozen=True)
class OwnerRecord:
    """What ``owner.json`` says."""

    owner: JobIdentity
    claimed_at: str = ""
    claimed_by: str = ""
    lineage: tuple[JobIdentity, ...] = ()
    """Earlier owners of the same name whose runs this owner continues (oldest first)."""
    etag: str = field(default="", compare=False)
    """Version token for a conditional replace."""

    def to_json(self) -> bytes:
        body = {
            "format": OWNER_FORMAT,
            "owner": self.owner.to_wire(),
            "claimedAt": self.claimed_at,
            "claimedBy": self.claimed_by,
            "lineage": [p.to_wire() for p in self.lineage],
        }
        return json.dumps(body, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, etag: str, uri: str) -> OwnerRecord:
        raw, owner = _record(data, OWNER_FORMAT, "owner")
        if owner is None:
            raise StorageError(
                f"{uri} is not a Tuneloop owner record; it marks who owns the output prefix: restore it, or "
                "remove it if no job writes there any more (the next job to run then owns the prefix)",
                uri=uri,
                code="InvalidOwner",
            )
        lineage = tuple(p for p in (JobIdentity.from_wire(x) for x in raw.get("lineage") or []) if p is not None)
        return cls(
            owner=owner,
            claimed_at=str(raw.get("claimedAt") or ""),
            claimed_by=str(raw.get("claimedBy") or ""),
            lineage=lineage,
            etag=etag,
        )


@dataclass(frozen=True)
class RunClaim:
    """What ``runs/<n>/run.json`` says."""

    run: int
    job: JobIdentity
    spec_hash: str
    claimed_at: str = ""
    claimed_by: str = ""

    def to_json(self) -> bytes:
        body = {
            "format": RUN_CLAIM_FORMAT,
            "run": self.run,
            "job": self.job.to_wire(),
            "specHash": self.spec_hash,
            "claimedAt": self.claimed_at,
            "claimedBy": self.claimed_by,
        }
        return json.dumps(body, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> RunClaim:
        raw, job = _record(data, RUN_CLAIM_FORMAT, "job")
        if job is None:
            raise StorageError(f"{uri} is not a Tuneloop run claim", uri=uri, code="InvalidRunClaim")
        run = raw.get("run")
        return cls(
            run=run if isinstance(run, int) and not isinstance(run, bool) else 0,
            job=job,
            spec_hash=str(raw.get("specHash") or ""),
            claimed_at=str(raw.get("claimedAt") or ""),
            claimed_by=str(raw.get("claimedBy") or ""),
        )


def _record(data: bytes, fmt: str, who: str) -> tuple[dict[str, Any], JobIdentity | None]:
    """A record's JSON object and the identity under ``who`` (``None``: not a record of ``fmt``)."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}, None
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        return {}, None
    return raw, JobIdentity.from_wire(raw.get(who))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- the rules (pure) ---------------------------------------------------------------------


def ownership_problem(
    record: OwnerRecord | None, me: JobIdentity, *, continue_lineage: bool, output_uri: str
) -> str | None:
    """Why ``me`` may not write under ``output_uri`` owned as ``record`` says, or ``None``.

    ``None`` also when the prefix is free (no record) or ``me`` may take it over (a re-created
    job with ``continue_lineage``): :func:`claim_output` then writes the record."""
    if record is None or record.owner.same_job(me):
        return None
    owner = record.owner
    since = f", since {record.claimed_at}" if record.claimed_at else ""
    if owner.same_name(me) and not me.local:
        if continue_lineage:
            return None
        earlier = (
            f"the local runs of this manifest ({owner.describe()}{since})"
            if owner.local
            else f"an earlier FineTuneJob of the same name ({owner.describe()}{since}), deleted and re-created since"
        )
        return (
            f"spec.output.uri {output_uri} belongs to {earlier}. To continue its runs (numbered after its own, "
            "compared with its promoted model; its checkpoints are never resumed), set "
            "spec.output.continueLineage: true; to start a new lineage, choose another spec.output.uri"
        )
    if me.local and not owner.local:
        return (
            f"spec.output.uri {output_uri} belongs to {owner.describe()}{since} in a cluster; a local run must not "
            "write into its runs: pass --output with another location"
        )
    return (
        f"spec.output.uri {output_uri} belongs to {owner.describe()}{since}; two jobs cannot share an output "
        "(each would overwrite the other's runs): choose another spec.output.uri, or delete that job and remove "
        f"{Layout.OWNER} under the prefix if its runs may be continued by this one"
    )


# --- storage ------------------------------------------------------------------------------


def read_owner(storage: Storage, output_uri: str) -> OwnerRecord | None:
    """The owner record of ``output_uri`` (``None`` when nobody claimed it yet)."""
    uri = safe_join(output_uri, Layout.OWNER)
    try:
        versioned = storage.read_versioned(uri)
    except NotFoundError:
        return None
    return OwnerRecord.from_json(versioned.data, versioned.etag, uri)


def claim_output(
    storage: Storage, output_uri: str, me: JobIdentity, *, continue_lineage: bool, by: ClaimedBy
) -> OwnerRecord:
    """Make ``me`` the owner of ``output_uri`` (or confirm it is): atomic against racing claims.

    Raises :class:`OutputOwnedError` when another job owns it (see :func:`ownership_problem`)."""
    uri = safe_join(output_uri, Layout.OWNER)
    for _ in range(MAX_TRIES):
        record = read_owner(storage, output_uri)
        problem = ownership_problem(record, me, continue_lineage=continue_lineage, output_uri=output_uri)
        if problem is not None:
            raise OutputOwnedError(problem, uri=uri)
        if record is not None and record.owner.same_job(me):
            return record
        try:
            if record is None:
                new = OwnerRecord(owner=me, claimed_at=_now(), claimed_by=by)
                storage.create_bytes(uri, new.to_json(), content_type="application/json")
            else:  # a re-created job of the same name continues the lineage
                lineage = (*record.lineage, record.owner)[-MAX_LINEAGE:]
                new = OwnerRecord(owner=me, claimed_at=_now(), claimed_by=by, lineage=lineage)
                storage.replace_bytes(uri, new.to_json(), etag=record.etag, content_type="application/json")
        except PreconditionFailedError:
            continue  # someone else wrote it in between: read again and decide again
        return read_owner(storage, output_uri) or new
    raise StorageError(f"could not claim {uri}: it keeps changing; retry", uri=uri, code="PreconditionFailed")


def highest_run(storage: Storage, output_uri: str) -> int:
    """The highest run number with anything under ``runs/<n>/`` (0 when there is none)."""
    names = storage.list_dirs(safe_join(output_uri, Layout.RUNS) + "/")
    return max((int(n) for n in names if _RUN_DIR.match(n)), default=0)


def read_run_claim(storage: Storage, output_uri: str, run: int) -> RunClaim | None:
    uri = safe_join(output_uri, Layout.run_claim(run))
    try:
        return RunClaim.from_json(storage.read_bytes(uri), uri)
    except NotFoundError:
        return None


def _create_claim(
    storage: Storage, output_uri: str, me: JobIdentity, run: int, *, spec_hash: str, by: ClaimedBy
) -> RunClaim | None:
    """Create ``runs/<run>/run.json`` for ``me``; ``None`` when it exists already."""
    claim = RunClaim(run=run, job=me, spec_hash=spec_hash, claimed_at=_now(), claimed_by=by)
    try:
        storage.create_bytes(
            safe_join(output_uri, Layout.run_claim(run)), claim.to_json(), content_type="application/json"
        )
    except PreconditionFailedError:
        return None
    return claim


def claim_run(
    storage: Storage, output_uri: str, me: JobIdentity, run: int, *, spec_hash: str, by: ClaimedBy
) -> RunClaim:
    """Claim run ``run`` for ``me`` (or confirm ``me`` claimed it before: a retried attempt, a
    restarted operator, ``tuneloop run --run N``). :class:`OutputOwnedError` when another job did."""
    claim = _create_claim(storage, output_uri, me, run, spec_hash=spec_hash, by=by)
    if claim is not None:
        return claim
    existing = read_run_claim(storage, output_uri, run)
    if existing is not None and existing.job.same_job(me):
        return existing
    who = existing.job.describe() if existing is not None else "another writer"
    raise OutputOwnedError(
        f"run {run} under {output_uri} was claimed by {who}, not by {me.describe()}",
        uri=safe_join(output_uri, Layout.run_claim(run)),
    )


def claim_next_run(
    storage: Storage, output_uri: str, me: JobIdentity, *, spec_hash: str, by: ClaimedBy, after: int = 0
) -> RunClaim:
    """Claim the lowest free run number above both ``after`` and every run under the prefix."""
    run = max(after, highest_run(storage, output_uri)) + 1
    for _ in range(MAX_TRIES):
        claim = _create_claim(storage, output_uri, me, run, spec_hash=spec_hash, by=by)
        if claim is not None:
            return claim
        run += 1  # taken by a concurrent run (ours or not): the next one
    raise StorageError(f"could not claim a run number under {output_uri}: too many concurrent runs; retry")
