"""The operator's access to a job's output prefix: storage clients per job credentials, the
output's owner and runs (read before a run starts), and the claims made before a run's pods are
created (:mod:`tuneloop.ownership`).

The job's S3 credentials are read from the Secret ``spec.storage.secretRef`` names, held in
memory only for the client, and never logged or written anywhere; without a secretRef the
operator's own identity applies (botocore's standard chain: IRSA, instance profile...). The
operator reads heartbeats and writes two small objects per job and run (``owner.json``,
``runs/<n>/run.json``): its identity needs ``s3:GetObject``, ``s3:PutObject`` and
``s3:ListBucket`` on the output prefixes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from typing import Final

from tuneloop.api import FineTuneJob
from tuneloop.ownership import claim_output, claim_run, highest_run, read_owner
from tuneloop.storage import Storage, StorageError
from tuneloop_operator.kube import KubeClient
from tuneloop_operator.planner import OutputClaim, OutputView
from tuneloop_operator.render import STORAGE_SECRET_KEYS

log = logging.getLogger(__name__)

MAX_CLIENTS: Final = 256


class StorageAccessError(Exception):
    """The job's storage could not be set up (the message names what, never a credential)."""


class JobStorage:
    """Storage clients for jobs, one per (credentials, settings), the least recently used dropped."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self._clients: OrderedDict[str, Storage] = OrderedDict()

    async def for_job(self, job: FineTuneJob) -> Storage:
        spec = job.spec
        env: dict[str, str] | None = None
        ref = spec.storage.secret_ref
        if ref is not None and spec.output.uri.startswith("s3://"):
            namespace = job.metadata.namespace or "default"
            data = await self.kube.get_secret_data(namespace, ref.name)
            if data is None:
                raise StorageAccessError(f"secret {namespace}/{ref.name} (spec.storage.secretRef) not found")
            env = {key: data[key] for key, _ in STORAGE_SECRET_KEYS if key in data}
        digest = hashlib.sha256(
            json.dumps([spec.storage.to_wire(), sorted((env or {}).items())], sort_keys=True).encode()
        ).hexdigest()
        storage = self._clients.get(digest)
        if storage is None:
            storage = await asyncio.to_thread(Storage.for_uri, spec.output.uri, spec.storage, env=env)
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
        except (StorageError, StorageAccessError) as exc:
            return OutputView(error=str(exc))
        return OutputView(owner=owner, highest_run=highest)

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
