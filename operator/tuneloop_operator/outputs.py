"""The operator's access to a job's output prefix: storage clients per job credentials, the
output's owner and runs (read before a run starts), and the claims made before a run's pods are
created (:mod:`tuneloop.ownership`).

The job's S3 credentials are read from the Secret ``spec.storage.secretRef`` names, held in
memory only for the client, and never logged or written anywhere; without a secretRef the
platform's default Secret (``TUNELOOP_DEFAULT_STORAGE_SECRET``) is read the same way, and
without either the operator's own identity applies (botocore's standard chain: IRSA, instance profile...). The
operator reads heartbeats and writes two small objects per job and run (``owner.json``,
``runs/<n>/run.json``): its identity needs ``s3:GetObject``, ``s3:PutObject`` and
``s3:ListBucket`` on the output prefixes. Only when a job's status is found empty while the job
has runs does it read the lineage index and ``promoted.json`` back (:meth:`OutputAccess.read_history`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Final

from pydantic import ValidationError

from tuneloop.api import FineTuneJob
from tuneloop.api.spec import Storage as StorageSettings
from tuneloop.contract import PROMOTED_FORMAT, Layout, PromotedPointer
from tuneloop.ownership import JobIdentity, claim_output, claim_run, highest_run, read_owner, read_run_claim
from tuneloop.storage import NotFoundError, PreconditionFailedError, Storage, StorageError, safe_join
from tuneloop_operator.datawatch import Listing
from tuneloop_operator.kube import KubeClient
from tuneloop_operator.planner import HistoryView, OutputClaim, OutputView
from tuneloop_operator.promotion import Candidate
from tuneloop_operator.render import NO_DEFAULTS, STORAGE_SECRET_KEYS, TrainerDefaults, storage_secret_name

log = logging.getLogger(__name__)

MAX_CLIENTS: Final = 256


class StorageAccessError(Exception):
    """The job's storage could not be set up (the message names what, never a credential)."""


def effective_storage(job: FineTuneJob, defaults: TrainerDefaults = NO_DEFAULTS) -> StorageSettings:
    """The job's ``spec.storage`` with the platform's endpoint and region where it sets none."""
    storage = job.spec.storage
    update: dict[str, str] = {}
    if storage.endpoint is None and defaults.s3_endpoint:
        update["endpoint"] = defaults.s3_endpoint
    if storage.region is None and defaults.s3_region:
        update["region"] = defaults.s3_region
    return storage.model_copy(update=update) if update else storage


class JobStorage:
    """Storage clients for jobs, one per (credentials, settings), the least recently used dropped."""

    def __init__(self, kube: KubeClient, defaults: TrainerDefaults = NO_DEFAULTS) -> None:
        self.kube = kube
        self.defaults = defaults
        self._clients: OrderedDict[str, Storage] = OrderedDict()

    async def for_job(self, job: FineTuneJob, uri: str | None = None) -> Storage:
        """The client for ``uri`` (default: the job's output) with the job's storage settings and
        credentials (the same Secret serves the dataset and the output). What the job leaves out
        comes from the platform's defaults; with no Secret at all, the operator's own identity."""
        spec = job.spec
        uri = uri or spec.output.uri
        settings = effective_storage(job, self.defaults)
        env: dict[str, str] | None = None
        secret = storage_secret_name(job, self.defaults)
        if secret is not None and uri.startswith("s3://"):
            namespace = job.metadata.namespace or "default"
            data = await self.kube.get_secret_data(namespace, secret)
            if data is None:
                source = (
                    "spec.storage.secretRef"
                    if spec.storage.secret_ref is not None
                    else "the platform's default, TUNELOOP_DEFAULT_STORAGE_SECRET"
                )
                raise StorageAccessError(f"secret {namespace}/{secret} ({source}) not found")
            env = {key: data[key] for key, _ in STORAGE_SECRET_KEYS if key in data}
        scheme = uri.split("://", 1)[0]
        digest = hashlib.sha256(
            json.dumps([scheme, settings.to_wire(), sorted((env or {}).items())], sort_keys=True).encode()
        ).hexdigest()
        storage = self._clients.get(digest)
        if storage is None:
            storage = await asyncio.to_thread(Storage.for_uri, uri, settings, env=env)
            self._clients[digest] = storage
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(digest)
        return storage


class OutputAccess:
    """Reads what the planner needs to know about an output prefix, and makes its claims."""

    def __init__(self, storages: JobStorage) -> None:
        self.storages = storages

    async def observe(self, job: FineTuneJob) -> OutputView:
        """The prefix's owner record and highest run; an unreadable prefix is reported, not raised."""
        uri = job.spec.output.uri
        try:
            storage = await self.storages.for_job(job)
            owner = await asyncio.to_thread(read_owner, storage, uri)
            highest = await asyncio.to_thread(highest_run, storage, uri)
            claimant = await asyncio.to_thread(_unstarted_claimant, storage, uri, highest) if highest else None
        except (StorageError, StorageAccessError) as exc:
            return OutputView(error=str(exc))
        return OutputView(owner=owner, highest_run=highest, unstarted_claimant=claimant)

    async def claim(self, job: FineTuneJob, claim: OutputClaim) -> None:
        """Claim the prefix (when not yet the job's own) and the run number, atomically each.

        Raises :class:`tuneloop.ownership.OutputOwnedError` when another writer won a race since
        :meth:`observe`, :class:`StorageError` or :class:`StorageAccessError` when the prefix
        cannot be written."""
        uri = job.spec.output.uri
        storage = await self.storages.for_job(job)
        await asyncio.to_thread(
            claim_output, storage, uri, claim.identity, continue_lineage=claim.continue_lineage, by="operator"
        )
        await asyncio.to_thread(
            claim_run, storage, uri, claim.identity, claim.run, spec_hash=claim.spec_hash, by="operator"
        )
        log.info("claimed run %d under %s for %s", claim.run, uri, claim.identity.describe())

    # -- the loop: the data watermark, the promoted pointer, the lineage index --

    async def write_listing(self, job: FineTuneJob, run: int, listing: Listing) -> None:
        """The dataset listing a run starts with (its data watermark), ``runs/<n>/data-listing.json``."""
        storage = await self.storages.for_job(job)
        uri = safe_join(job.spec.output.uri, Layout.data_listing(run))
        await asyncio.to_thread(storage.write_json, uri, listing.to_json())

    async def read_listing(self, job: FineTuneJob, run: int) -> Listing | None:
        """A run's recorded dataset listing (``None``: it recorded none). ``ValueError`` when the
        object is not a listing."""
        storage = await self.storages.for_job(job)
        uri = safe_join(job.spec.output.uri, Layout.data_listing(run))
        try:
            raw = await asyncio.to_thread(storage.read_json, uri)
        except NotFoundError:
            return None
        return Listing.from_json(raw)

    async def write_pointer(self, job: FineTuneJob, pointer: PromotedPointer) -> None:
        """``promoted.json``: one object, replaced atomically (serving stacks read it)."""
        storage = await self.storages.for_job(job)
        uri = safe_join(job.spec.output.uri, Layout.PROMOTED)
        body = pointer.model_dump(mode="json", by_alias=True, exclude_none=True)
        await asyncio.to_thread(storage.write_json, uri, body)
        log.info("promoted run %d of %s: %s", pointer.run, uri, pointer.model_uri)

    async def append_index(self, job: FineTuneJob, records: Sequence[Mapping[str, Any]]) -> None:
        """Append to the lineage index ``runs/index.json`` (conditional writes: concurrent appends
        never lose a record; a record already there is not added twice)."""
        if not records:
            return
        storage = await self.storages.for_job(job)
        uri = safe_join(job.spec.output.uri, Layout.INDEX)
        await asyncio.to_thread(_append_index, storage, uri, [dict(r) for r in records])

    async def read_history(self, job: FineTuneJob) -> HistoryView:
        """The lineage index and ``promoted.json``, to rebuild a status found empty (read only
        then: a normal reconcile never reads them). What cannot be read, or is not what it should
        be, is reported in the view with its URI, never raised."""
        output = job.spec.output.uri
        index_uri = safe_join(output, Layout.INDEX)
        pointer_uri = safe_join(output, Layout.PROMOTED)
        try:
            storage = await self.storages.for_job(job)
        except (StorageError, StorageAccessError) as exc:
            return HistoryView(index_uri, pointer_uri, index_error=str(exc), pointer_error=str(exc))
        return await asyncio.to_thread(_read_history, storage, output, index_uri, pointer_uri)

    async def pin_target(self, job: FineTuneJob, run: int) -> Candidate | None:
        """The run ``spec.promotion.pin`` names, from its model card, if its model still exists."""
        storage = await self.storages.for_job(job)
        output = job.spec.output.uri
        model_uri = safe_join(output, Layout.model(run)) + "/"
        try:
            if not await asyncio.to_thread(storage.exists, model_uri):
                return None
            card = await asyncio.to_thread(storage.read_json, safe_join(output, Layout.model_card_json(run)))
        except NotFoundError:
            card = {}
        metrics = card.get("metrics") if isinstance(card, dict) else None
        return Candidate(
            run=run,
            trigger="Manual",
            result="Succeeded",
            reason="Pinned",
            message="",
            model_uri=model_uri,
            metrics={
                str(k): float(v)
                for k, v in (metrics or {}).items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            },
            data_fingerprint=card.get("dataFingerprint") if isinstance(card, dict) else None,
        )


def _unstarted_claimant(storage: Storage, output_uri: str, run: int) -> JobIdentity | None:
    """Who claimed ``run`` when its directory holds nothing but what the operator writes before
    the pods (the claim, the data listing): no trainer wrote there."""
    prefix = Layout.run(run) + "/"
    before_pods = {Layout.run_claim(run).removeprefix(prefix), Layout.data_listing(run).removeprefix(prefix)}
    keys = {o.key for o in storage.list(safe_join(output_uri, Layout.run(run)) + "/")}
    if not keys or not keys <= before_pods:
        return None
    claim = read_run_claim(storage, output_uri, run)
    return claim.job if claim is not None else None


INDEX_FORMAT: Final = "tuneloop-index/1"


def _read_history(storage: Storage, output: str, index_uri: str, pointer_uri: str) -> HistoryView:
    records: list[dict[str, Any]] = []
    index_error: str | None = None
    try:
        loaded = json.loads(storage.read_bytes(index_uri))
        if (
            not isinstance(loaded, dict)
            or loaded.get("format") != INDEX_FORMAT
            or not isinstance(loaded.get("records"), list)
        ):
            index_error = f"{index_uri} is not a {INDEX_FORMAT} object (a format and a list of records)"
        else:
            records = [r for r in loaded["records"] if isinstance(r, dict)]
    except NotFoundError:
        pass
    except (UnicodeDecodeError, json.JSONDecodeError):
        index_error = f"{index_uri} is not valid JSON"
    except StorageError as exc:
        index_error = str(exc)
    pointer: PromotedPointer | None = None
    pointer_error: str | None = None
    try:
        pointer = PromotedPointer.model_validate(storage.read_json(pointer_uri))
    except NotFoundError:
        pass
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the object"
        pointer_error = f"{pointer_uri} is not a {PROMOTED_FORMAT} pointer ({where}: {first['msg']})"
    except StorageError as exc:
        pointer_error = str(exc)
    hashes: dict[int, str] = {}
    finished = [r.get("number") for r in records if r.get("event") == "finished"]
    latest = max((n for n in finished if isinstance(n, int) and not isinstance(n, bool)), default=None)
    if latest is not None:
        try:
            claim = read_run_claim(storage, output, latest)
        except StorageError as exc:
            log.warning("claim of run %d under %s: %s", latest, output, exc)
            claim = None
        if claim is not None:
            hashes[latest] = claim.spec_hash
    return HistoryView(
        index_uri,
        pointer_uri,
        records=records,
        index_error=index_error,
        pointer=pointer,
        pointer_error=pointer_error,
        spec_hashes=hashes,
    )


#: Index records kept (the oldest are dropped beyond it; each run's directory keeps its own card).
MAX_INDEX_RECORDS: Final = 10_000


def _append_index(storage: Storage, uri: str, records: list[dict[str, Any]]) -> None:
    for _ in range(20):
        try:
            current = storage.read_versioned(uri)
        except NotFoundError:
            current = None
        existing: list[dict[str, Any]] = []
        if current is not None:
            try:
                loaded = json.loads(current.data)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise StorageError(f"{uri} is not valid JSON; restore it from a backup or remove it", uri=uri) from None
            existing = list(loaded.get("records", [])) if isinstance(loaded, dict) else []
        new = [r for r in records if r not in existing]
        if not new:
            return
        body = json.dumps({"format": INDEX_FORMAT, "records": (existing + new)[-MAX_INDEX_RECORDS:]}, indent=1)
        try:
            if current is None:
                storage.create_bytes(uri, body.encode() + b"\n", content_type="application/json")
            else:
                storage.replace_bytes(uri, body.encode() + b"\n", etag=current.etag, content_type="application/json")
            return
        except PreconditionFailedError:
            continue  # appended by someone else meanwhile: read again
    raise StorageError(f"could not append to {uri}: it keeps changing; retry", uri=uri)
