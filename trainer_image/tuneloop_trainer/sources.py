"""Bring a job's inputs to local disk: data files and model directories, from s3:// or file://.

Messages name the URI and what to do, never a local cache path or file content. Data
errors do not name the spec field: one fetch serves every data source, and the caller
(:func:`tuneloop_trainer.data.prepare_data`) prefixes the field it was reading.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tuneloop.api.spec import Storage as StorageSettings
from tuneloop.contract import DATA_SUFFIXES
from tuneloop.storage import NotFoundError, Storage, UnsafeKeyError
from tuneloop_trainer.errors import InvalidDataError, UnsupportedModelError

#: Written into a model's cache directory once every object is downloaded: a download cut
#: short (a preempted pod) leaves a directory without it, which the next attempt repeats.
MODEL_COMPLETE_MARKER = ".tuneloop-complete"
_SAFE_KEYS_HINT = (
    "object keys must be plain relative names under the prefix (no '..' or '.' segments, no leading '/', "
    "no backslashes or control characters)"
)


def unsafe_object_key(exc: UnsafeKeyError, uri: str) -> str:
    """``object key '<key>' under <uri> (<why>)`` from the storage layer's refusal, without the
    local paths its message names (the key is repr-escaped and bounded there)."""
    if exc.key is None or exc.problem is None:
        return f"an object key under {uri} (it is not a plain relative name)"
    return f"object key {exc.key} under {uri} ({exc.problem})"


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
            return _local_data(uri)
        dest = self.cache_dir / "data" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        try:
            storage = self.storage(uri)
            objects = storage.list(uri)
            if not objects:
                raise InvalidDataError(f"nothing found at {uri}; check the URI and the bucket")
            paths = storage.download_prefix(uri, dest) if len(objects) > 1 or objects[0].key else None
            if paths is None:
                target = dest / Path(uri.rstrip("/")).name
                storage.download_file(uri, target)
                paths = [target]
        except NotFoundError as exc:
            raise InvalidDataError(str(exc)) from None
        except UnsafeKeyError as exc:
            raise InvalidDataError(
                f"refusing {unsafe_object_key(exc, uri)}; {_SAFE_KEYS_HINT}: rename or delete that object, or "
                "point the URI at a prefix without it"
            ) from None
        # Other StorageErrors propagate as crashes: retryable, since S3 hiccups must not end a run for good.
        files = sorted(p for p in paths if p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise InvalidDataError(f"no data files ({', '.join(DATA_SUFFIXES)}) under {uri}")
        return files

    def download_model(self, uri: str, dest: Path) -> Path:
        """Mirror a model directory saved with ``save_pretrained`` from S3 (once: a complete
        download is marked, and reused by later runs on the same node)."""
        marker = dest / MODEL_COMPLETE_MARKER
        if marker.exists():
            return dest
        try:
            self.storage(uri).download_prefix(uri, dest)
        except NotFoundError:
            raise UnsupportedModelError(f"model {uri} not found; check spec.model.uri") from None
        except UnsafeKeyError as exc:
            raise UnsupportedModelError(
                f"spec.model.uri: refusing {unsafe_object_key(exc, uri)}; {_SAFE_KEYS_HINT}: rename or delete that "
                "object, or save the model under a prefix of its own"
            ) from None
        marker.touch()
        return dest


def _local_data(uri: str) -> list[Path]:
    """A local file, or the data files in a folder and its subfolders.

    A link inside the folder that leads out of it is refused: a folder is often a volume
    others write to, and a link to ``/etc/passwd`` or a service-account token must not end
    up in a model or an error message. (A file named directly by the URI may be a link: the
    user chose it.) Linked subfolders are not descended into.
    """
    path = Path(uri.removeprefix("file://"))
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InvalidDataError(f"{uri} does not exist")
    root = path.resolve()
    files: list[Path] = []
    for p in sorted(path.rglob("*")):
        if p.suffix.lower() not in DATA_SUFFIXES or not p.is_file():
            continue
        if not p.resolve().is_relative_to(root):
            shown = p.relative_to(path).as_posix()
            raise InvalidDataError(
                f"{shown!r} in {uri} is a link to a file outside that folder; copy the file into the folder, or "
                "name it in the URI itself"
            )
        files.append(p)
    if not files:
        raise InvalidDataError(f"no data files ({', '.join(DATA_SUFFIXES)}) under {uri}")
    return files
