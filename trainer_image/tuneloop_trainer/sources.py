"""Bring a job's inputs to local disk: data files and model directories, from s3:// or file://."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tuneloop.api.spec import Storage as StorageSettings
from tuneloop.storage import NotFoundError, Storage
from tuneloop_trainer.errors import InvalidDataError, UnsupportedModelError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class Sources:
    """Fetches inputs once per URI into a local cache."""

    def __init__(self, settings: StorageSettings | None, cache_dir: Path) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self._storages: dict[str, Storage] = {}

    def storage(self, uri: str) -> Storage:
        """The storage for ``uri``'s scheme, built once per run (an S3 client costs ~0.1 s)."""
        scheme = uri.split("://", 1)[0]
        if scheme not in self._storages:
            self._storages[scheme] = Storage.for_uri(uri, self.settings)
        return self._storages[scheme]

    def fetch_data(self, uri: str) -> list[Path]:
        """Local paths of the data at ``uri``: the file itself, or every data file under a prefix."""
        if uri.startswith("file://"):
            path = Path(uri.removeprefix("file://"))
            if path.is_file():
                return [path]
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
                if not files:
                    raise InvalidDataError(f"no data files ({', '.join(DATA_SUFFIXES)}) under {uri}")
                return files
            raise InvalidDataError(f"{uri} does not exist")
        dest = self.cache_dir / "data" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        try:
            storage = self.storage(uri)
            objects = storage.list(uri)
            if not objects:
                raise InvalidDataError(f"nothing found at {uri}; check spec.dataset.uri and the bucket")
            paths = storage.download_prefix(uri, dest) if len(objects) > 1 or objects[0].key else None
            if paths is None:
                target = dest / Path(uri.rstrip("/")).name
                storage.download_file(uri, target)
                paths = [target]
        except NotFoundError as exc:
            raise InvalidDataError(str(exc)) from None
        # Other StorageErrors propagate as crashes: retryable, since S3 hiccups must not end a run for good.
        files = sorted(p for p in paths if p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise InvalidDataError(f"no data files ({', '.join(DATA_SUFFIXES)}) under {uri}")
        return files

    def download_model(self, uri: str, dest: Path) -> Path:
        """Mirror a model directory saved with ``save_pretrained`` from S3."""
        try:
            self.storage(uri).download_prefix(uri, dest)
        except NotFoundError:
            raise UnsupportedModelError(f"model {uri} not found; check spec.model.uri") from None
        return dest
