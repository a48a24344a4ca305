"""Reading the trainer's heartbeat (``runs/<n>/status.json``) from the job's storage.

The job's S3 credentials are read from the Secret ``spec.storage.secretRef`` names, held in
memory only for the client, and never logged or written anywhere; without a secretRef the
operator's own identity applies (botocore's standard chain: IRSA, instance profile...).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from typing import Final

from pydantic import ValidationError

from tuneloop.api import FineTuneJob
from tuneloop.contract import Heartbeat, Layout
from tuneloop.storage import NotFoundError, Storage, StorageError, safe_join
from tuneloop_operator.kube import KubeClient
from tuneloop_operator.render import STORAGE_SECRET_KEYS

log = logging.getLogger(__name__)

MAX_CLIENTS: Final = 256


class HeartbeatError(Exception):
    """The heartbeat could not be read (the message names what, never a credential)."""


class HeartbeatReader:
    """Reads heartbeats, keeping one storage client per (credentials, settings)."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self._clients: OrderedDict[str, Storage] = OrderedDict()

    async def _storage(self, job: FineTuneJob) -> Storage:
        spec = job.spec
        env: dict[str, str] | None = None
        ref = spec.storage.secret_ref
        if ref is not None and spec.output.uri.startswith("s3://"):
            namespace = job.metadata.namespace or "default"
            data = await self.kube.get_secret_data(namespace, ref.name)
            if data is None:
                raise HeartbeatError(f"secret {namespace}/{ref.name} (spec.storage.secretRef) not found")
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

    async def read(self, job: FineTuneJob, run: int) -> Heartbeat | None:
        """The run's latest heartbeat, or None when the trainer has not written one yet."""
        uri = safe_join(job.spec.output.uri, Layout.status(run))
        storage = await self._storage(job)
        try:
            raw = await asyncio.to_thread(storage.read_json, uri)
        except NotFoundError:
            return None
        except StorageError as exc:
            raise HeartbeatError(f"cannot read {uri}: {exc}") from None
        try:
            return Heartbeat.model_validate(raw)
        except ValidationError as exc:
            raise HeartbeatError(f"{uri} is not a trainer heartbeat ({exc.error_count()} problem(s))") from None
