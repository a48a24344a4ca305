"""Checkpoints: a short local snapshot in the training loop, the upload in the background.

Why it is built this way:

* **The loop pays only for the local snapshot.** :meth:`CheckpointManager.save` copies the
  weights off the device and writes them to local disk synchronously (the loop may change them
  right after), then uploads in a background thread, so training does not stall on S3.
* **Bounded memory and disk.** At most one upload is in flight: a ``save`` first waits for the
  previous one. The local snapshot is removed once its upload ends.
* **Complete means "manifest written last".** Files go up first, ``manifest.json`` (names, sizes,
  SHA-256) last. A checkpoint without a manifest, or whose objects do not match it, does not exist
  (DESIGN.md, "Contracts"): resume never picks a half-uploaded one.
* **Retention never deletes the only good checkpoint.** Older checkpoints are deleted only after
  a newer manifest is written; the last ``keep`` complete ones and the best one (by metric) stay.
  Partial ones left by a killed attempt go too, at the latest when training ends
  (:meth:`CheckpointManager.remove_incomplete`).
* **A checkpoint is data, never code.** Checkpoints live in a shared bucket; loading a pickle from
  there would be a code-execution path (cf. CVE-2025-32434). Weights are safetensors, and the rest
  is loaded only with ``torch.load(weights_only=True)``; :func:`capture_rng` turns RNG states into
  plain lists and tensors so they pass that loader.
* **Only the writer resumes.** Each manifest records who wrote it (``identity``: job namespace,
  name and uid, run, spec hash). A checkpoint whose identity is not the manager's own is invisible
  to :meth:`~CheckpointManager.complete` and :meth:`~CheckpointManager.load` (listed by
  :meth:`~CheckpointManager.foreign`) and is deleted by retention: another spec's optimizer state
  must never continue this one.
* **Corruption falls back.** :meth:`CheckpointManager.load` checks each file's SHA-256 against the
  manifest; a checkpoint that fails any check is skipped with a warning for the previous one.
* **Failures surface.** An upload error is re-raised by the next :meth:`~CheckpointManager.wait`
  or :meth:`~CheckpointManager.save`, never swallowed by the thread.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tuneloop.contract import Layout
from tuneloop.storage import ObjectInfo, Storage, StorageError, safe_join, sha256_file

__all__ = [
    "MANIFEST_FORMAT",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointState",
    "capture_rng",
    "restore_rng",
]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT: Final = "tuneloop-checkpoint/1"
MANIFEST_NAME: Final = Layout.CHECKPOINT_MANIFEST
TENSORS_NAME: Final = "model.safetensors"
OBJECTS_NAME: Final = "state.pt"
META_NAME: Final = "meta.json"
#: Written in this order; the manifest comes after all of them.
_FILES: Final = (TENSORS_NAME, OBJECTS_NAME, META_NAME)


# --- state ------------------------------------------------------------------------------


@dataclass
class CheckpointState:
    """Everything needed to resume training exactly."""

    tensors: dict[str, torch.Tensor]
    """Model/adapter weights; saved with safetensors (no pickle)."""
    objects: dict[str, Any]
    """Optimizer/scheduler/scaler state dicts, RNG states: only what ``torch.load(weights_only=True)``
    accepts (tensors, numbers, strings, None, lists, tuples, dicts)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON: step, epoch, batch position, early-stopping state, unfreezing stage, metrics…"""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: its step, its prefix URI and its manifest."""

    step: int
    uri: str
    manifest: dict[str, Any]

    @property
    def metric(self) -> float | None:
        value = self.manifest.get("metric")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def capture_rng() -> dict[str, Any]:
    """The torch (CPU and CUDA), NumPy and Python RNG states, as plain lists, numbers and tensors.

    NumPy's and Python's states are tuples holding arrays or tuples that ``weights_only`` loading
    refuses or that do not round-trip cleanly; these are flattened so the checkpoint stays data.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_name),
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": int(py_version), "state": [int(x) for x in py_state], "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured (CUDA states only when CUDA is available)."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in state["cuda"]])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["bit_generator"],
            np.asarray(npst["keys"], dtype=np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    pyst = state["python"]
    random.setstate((int(pyst["version"]), tuple(int(x) for x in pyst["state"]), pyst["gauss_next"]))


def _cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies that share nothing: safetensors refuses shared storage (tied weights),
    and the loop may update the originals as soon as ``save`` returns."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        source = tensor.detach()
        copy = torch.empty(source.shape, dtype=source.dtype, device="cpu")
        copy.copy_(source)
        out[name] = copy
    return out


# --- the manager ------------------------------------------------------------------------


class CheckpointManager:
    """Saves checkpoints under ``checkpoints_uri`` (``…/runs/<n>/checkpoints``) and finds, verifies
    and loads them back. See the module docstring for the guarantees.

    Not thread-safe: call it from the training loop's thread only (the upload thread is its own).
    """

    before_commit: Callable[[], None] | None = None
    """Called on the upload thread before an upload touches the step's objects and again right
    before its manifest is written; raises when this process may no longer write the run (another
    writer took its S3 writer lease over, :mod:`tuneloop.lease`): then no manifest is written and
    no retention runs, and the error surfaces at the next :meth:`wait`."""

    def __init__(
        self,
        storage: Storage,
        checkpoints_uri: str,
        local_dir: Path,
        *,
        keep: int,
        best_metric_mode: Literal["min", "max"] | None = None,
        identity: dict[str, Any] | None = None,
        spec_hashes: Collection[str] = (),
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if best_metric_mode not in (None, "min", "max"):
            raise ValueError(f"best_metric_mode must be 'min', 'max' or None, got {best_metric_mode!r}")
        self.storage = storage
        self.checkpoints_uri = checkpoints_uri.rstrip("/")
        self.local_dir = Path(local_dir)
        self.keep = keep
        self.best_metric_mode = best_metric_mode
        self.identity = dict(identity) if identity is not None else None
        """Who writes: recorded in each manifest; only checkpoints with the same identity resume."""
        self.spec_hashes = frozenset(spec_hashes)
        """Other ``specHash`` values an identity may record for the same spec (an older release's
        hash of it, :func:`tuneloop.contract.spec_hashes`): their checkpoints resume too."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future[None] | None = None
        self._manifests: dict[int, tuple[str | None, int, dict[str, Any]]] = {}
        self._lock = threading.Lock()  # guards _manifests (read by both threads)
        self.last_save_seconds: float | None = None
        self.last_upload_seconds: float | None = None
        self.last_bytes: int | None = None
        self.last_flight_seconds: float | None = None
        """Seconds from the last ``save`` handing its snapshot to the upload thread until that upload
        (retention included) was done, failed or not: what a caller waiting for it would have waited.
        Before this process's first upload: the upload time the manifest of the checkpoint
        :meth:`load` resumed records (``uploadSeconds``), if any."""
        self.saves = 0
        self.uploads = 0

    # --- saving ---------------------------------------------------------------------------

    def step_uri(self, step: int) -> str:
        return safe_join(self.checkpoints_uri, Layout.checkpoint_folder(step))

    def save(self, step: int, state: CheckpointState, *, metric: float | None = None, blocking: bool = False) -> None:
        """Snapshot ``state`` locally now, upload it in the background.

        Waits for the previous upload first (re-raising its failure). ``last_save_seconds`` is the
        whole stall the caller pays, including that wait. ``blocking=True`` also waits for this
        upload (use it for the final checkpoint, or before the process exits).
        """
        started = time.monotonic()
        self.wait()
        directory = self.local_dir / Layout.checkpoint_folder(step)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        try:
            save_file(_cpu_copies(state.tensors), str(directory / TENSORS_NAME), metadata={"step": str(step)})
            torch.save(state.objects, directory / OBJECTS_NAME)
            meta = {**state.meta, "step": step}
            (directory / META_NAME).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", "utf-8")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self.saves += 1
        self.last_save_seconds = time.monotonic() - started
        submitted = time.monotonic()

        def upload() -> None:
            try:
                self._upload(step, directory, meta, metric)
            finally:  # before the future is done: whoever waited for it sees this upload's time
                self.last_flight_seconds = time.monotonic() - submitted

        self._pending = self._executor.submit(upload)
        if blocking:
            self.wait()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the in-flight upload is done; re-raise its exception (once).

        Raises :class:`TimeoutError` if it is still running after ``timeout`` seconds (it keeps
        running; call again)."""
        pending = self._pending
        if pending is None:
            return
        try:
            pending.result(timeout=timeout)
        except FutureTimeoutError:
            raise TimeoutError(f"checkpoint upload still running after {timeout} s") from None
        finally:
            if pending.done():
                self._pending = None

    def upload_done(self, timeout: float = 0.0) -> bool:
        """Whether no upload is running, after waiting up to ``timeout`` seconds for the one that
        is. Its outcome (a failure included) is left for :meth:`wait` to collect."""
        pending = self._pending
        return pending is None or bool(futures_wait([pending], timeout=timeout).done)

    def close(self) -> None:
        """Wait for the last upload (re-raising its failure) and stop the upload thread."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def _upload(self, step: int, directory: Path, meta: dict[str, Any], metric: float | None) -> None:
        started = time.monotonic()
        uri = self.step_uri(step)
        try:
            if self.before_commit is not None:  # a writer taken over must not even drop a manifest
                self.before_commit()
            # A re-save of a step (a resumed attempt redoing it) must not leave the old manifest
            # describing new, half-uploaded files: drop it before touching anything else.
            self.storage.delete(safe_join(uri, MANIFEST_NAME))
            with self._lock:
                self._manifests.pop(step, None)
            files = []
            for name in _FILES:
                path = directory / name
                digest = sha256_file(path)
                size = path.stat().st_size
                self.storage.upload_file(path, safe_join(uri, name), sha256=digest)
                files.append({"name": name, "size": size, "sha256": digest})
            manifest = {
                "format": MANIFEST_FORMAT,
                "step": step,
                "epoch": meta.get("epoch"),
                "metric": metric,
                "metrics": meta.get("metrics", {}),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": files,
            }
            if self.identity is not None:
                manifest["identity"] = self.identity
            # How long the data files took: a resumed attempt snapshots early by it from its first
            # checkpoint on, instead of waiting for a whole untimed upload (recipe Cadence).
            manifest["uploadSeconds"] = round(time.monotonic() - started, 3)
            if self.before_commit is not None:  # the commit: only while this process still writes the run
                self.before_commit()
            self.storage.write_json(safe_join(uri, MANIFEST_NAME), manifest)
            self.uploads += 1
            self.last_bytes = sum(int(f["size"]) for f in files)
            self.last_upload_seconds = time.monotonic() - started
            logger.info(
                "checkpoint step %d uploaded to %s (%d bytes in %.2f s)",
                step,
                uri,
                self.last_bytes,
                self.last_upload_seconds,
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        try:
            self._apply_retention(newest=step)
        except (StorageError, OSError) as exc:
            # Old checkpoints left behind cost storage, not correctness: say so and carry on.
            logger.warning("checkpoint retention after step %d failed: %s", step, exc)

    def _apply_retention(self, newest: int) -> None:
        """Delete what is neither among the last ``keep`` complete checkpoints nor the best one.

        Runs right after ``newest``'s manifest was written. Incomplete directories older than
        ``newest`` (leftovers of a killed attempt) go too; newer ones are left alone."""
        groups = self._scan()
        # Steps above ``newest`` belong to an attempt that got further before it died (this one
        # resumed from an older checkpoint): leave them for the next save of that step to replace.
        # Checkpoints of another writer (see ``identity``) can never be resumed: they all go.
        complete = [info for info in self._complete_from(groups) if info.step <= newest]
        foreign = {info.step for info in self._complete_from(groups, own=False)}
        kept = {newest, *(info.step for info in complete[-self.keep :])}
        best = self._best_of(complete)
        if best is not None:
            kept.add(best.step)
        for step in sorted(groups):
            if step in kept or (step > newest and step not in foreign):
                continue
            logger.info("deleted checkpoint step %d (%s)", step, self._delete(step))

    def remove_incomplete(self) -> list[int]:
        """Delete every checkpoint directory of the run that is not complete (no valid manifest,
        or a listed file missing or of the wrong size) and return their steps.

        Retention removes only those older than the newest checkpoint, since a newer one may be
        the next save's to replace; a partial one past the last save of the attempt that finishes
        the run (a SIGTERM's off-cadence checkpoint cut short by SIGKILL) would otherwise stay
        forever. Call this when training has ended: it first waits for this manager's upload, and
        no other writer of the run may be running."""
        self.wait()
        groups = self._scan()
        whole = {info.step for own in (True, False) for info in self._complete_from(groups, own=own)}
        removed = []
        for step in sorted(set(groups) - whole):
            logger.info("deleted incomplete checkpoint step %d (%s)", step, self._delete(step))
            removed.append(step)
        return removed

    def abort_incomplete_uploads(self) -> int:
        """Abort the multipart uploads a killed attempt left unfinished under the checkpoints (they
        are not objects, so :meth:`remove_incomplete` cannot see them, and they are billed until
        aborted). Call it when training has ended, like :meth:`remove_incomplete`."""
        self.wait()
        return self.storage.abort_incomplete_uploads(self.checkpoints_uri + "/")

    def _delete(self, step: int) -> str:
        """Delete the checkpoint of ``step``; returns its URI."""
        uri = self.step_uri(step)
        # Manifest first: a half-deleted checkpoint must already read as incomplete.
        self.storage.delete(safe_join(uri, MANIFEST_NAME))
        self.storage.delete_prefix(uri + "/")
        with self._lock:
            self._manifests.pop(step, None)
        return uri

    # --- finding ----------------------------------------------------------------------------

    def _scan(self) -> dict[int, dict[str, ObjectInfo]]:
        """Objects under the checkpoints prefix, grouped by step (one listing)."""
        groups: dict[int, dict[str, ObjectInfo]] = {}
        for info in self.storage.list(self.checkpoints_uri + "/"):
            head, sep, rest = info.key.partition("/")
            step = Layout.checkpoint_step(head)
            if step is not None and sep and rest:
                groups.setdefault(step, {})[rest] = info
        return groups

    def _manifest(self, step: int, obj: ObjectInfo) -> dict[str, Any] | None:
        """The manifest of ``step`` (cached by ETag and size), or ``None`` if it is unreadable."""
        with self._lock:
            cached = self._manifests.get(step)
        if cached is not None and cached[0] == obj.etag and cached[1] == obj.size and obj.etag is not None:
            return cached[2]
        try:
            manifest = self.storage.read_json(obj.uri)
        except StorageError as exc:
            logger.warning("ignoring checkpoint step %d: unreadable manifest (%s)", step, exc)
            return None
        if not _valid_manifest(manifest, step):
            logger.warning("ignoring checkpoint step %d: malformed manifest %s", step, obj.uri)
            return None
        with self._lock:
            self._manifests[step] = (obj.etag, obj.size, manifest)
        return manifest

    def _own(self, manifest: dict[str, Any]) -> bool:
        if self.identity is None:
            return True
        theirs = manifest.get("identity")
        if not isinstance(theirs, dict):
            return False
        if theirs.get("specHash") in self.spec_hashes:
            theirs = {**theirs, "specHash": self.identity.get("specHash")}
        return theirs == self.identity

    def _complete_from(self, groups: dict[int, dict[str, ObjectInfo]], *, own: bool = True) -> list[CheckpointInfo]:
        """The complete checkpoints written by this manager's identity (``own=False``: by others)."""
        out = []
        for step in sorted(groups):
            objects = groups[step]
            if MANIFEST_NAME not in objects:
                continue
            manifest = self._manifest(step, objects[MANIFEST_NAME])
            if manifest is None:
                continue
            missing = [
                f["name"] for f in manifest["files"] if f["name"] not in objects or objects[f["name"]].size != f["size"]
            ]
            if missing:
                logger.warning("ignoring checkpoint step %d: missing or wrong-sized %s", step, ", ".join(missing))
                continue
            if self._own(manifest) == own:
                out.append(CheckpointInfo(step=step, uri=self.step_uri(step), manifest=manifest))
        return out

    def complete(self) -> list[CheckpointInfo]:
        """Every complete checkpoint of this identity, oldest first (one listing plus uncached
        manifest reads)."""
        return self._complete_from(self._scan())

    def foreign(self) -> list[CheckpointInfo]:
        """Complete checkpoints written by another identity (another job, run or spec): never
        resumed, deleted by retention after this manager's next upload."""
        return self._complete_from(self._scan(), own=False)

    def latest_complete(self) -> CheckpointInfo | None:
        """The newest checkpoint whose manifest exists and whose objects exist with the listed sizes.

        Contents are not hashed here (that is :meth:`load`'s job); this is cheap enough for a
        heartbeat or the operator's view of progress."""
        complete = self.complete()
        return complete[-1] if complete else None

    def _best_of(self, complete: list[CheckpointInfo]) -> CheckpointInfo | None:
        if self.best_metric_mode is None:
            return None
        scored = [info for info in complete if info.metric is not None and not math.isnan(info.metric)]
        if not scored:
            return None
        sign = 1.0 if self.best_metric_mode == "min" else -1.0
        # Ties go to the newest: it has seen more data for the same score.
        return min(scored, key=lambda info: (sign * (info.metric or 0.0), -info.step))

    @property
    def best(self) -> CheckpointInfo | None:
        """The complete checkpoint with the best metric (``None`` without a mode or metrics)."""
        return self._best_of(self.complete())

    @property
    def stats(self) -> dict[str, Any]:
        """Timings and counters for logs and telemetry."""
        pending = self._pending
        return {
            "saves": self.saves,
            "uploads": self.uploads,
            "last_save_seconds": self.last_save_seconds,
            "last_upload_seconds": self.last_upload_seconds,
            "last_bytes": self.last_bytes,
            "upload_in_flight": pending is not None and not pending.done(),
        }

    # --- loading ----------------------------------------------------------------------------

    def load(self, info: CheckpointInfo | None = None) -> tuple[CheckpointInfo, CheckpointState] | None:
        """Download, verify and load ``info`` (default: the newest complete checkpoint).

        A checkpoint that fails verification (SHA-256 or size against the manifest) or loading
        (including a ``state.pt`` that ``weights_only`` refuses) is skipped with a warning, and the
        previous complete one is tried. ``None`` when no checkpoint is usable. Tensors and objects
        come back on the CPU.
        """
        candidates = [c for c in reversed(self.complete()) if info is None or c.step < info.step]
        if info is not None:
            candidates.insert(0, info)
        for candidate in candidates:
            try:
                loaded = candidate, self._load_one(candidate)
            except Exception as exc:
                # Anything: a failed download or hash check (StorageError), a truncated safetensors
                # header, pickle.UnpicklingError from a weights_only refusal, malformed JSON...
                # A bad checkpoint must cost one checkpoint of progress, not the whole run.
                logger.warning(
                    "checkpoint step %d is unusable, trying an older one: %s: %s",
                    candidate.step,
                    type(exc).__name__,
                    exc,
                )
                continue
            recorded = candidate.manifest.get("uploadSeconds")
            if self.last_flight_seconds is None and isinstance(recorded, int | float) and 0 < recorded < math.inf:
                self.last_flight_seconds = float(recorded)
            return loaded
        return None

    def _load_one(self, info: CheckpointInfo) -> CheckpointState:
        names = {f["name"]: f for f in info.manifest["files"]}
        for required in _FILES:
            if required not in names:
                raise ValueError(f"manifest of step {info.step} lists no {required}")
        directory = self.local_dir / f"restore-{Layout.checkpoint_folder(info.step)}"
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        try:
            for name, entry in names.items():
                if name not in _FILES:
                    continue  # a newer writer's extra file: not ours to interpret
                dest = directory / name
                self.storage.download_file(safe_join(info.uri, name), dest, expected_sha256=entry["sha256"])
                if dest.stat().st_size != entry["size"]:
                    raise StorageError(f"{name} of step {info.step} has the wrong size", uri=info.uri)
            tensors = load_file(str(directory / TENSORS_NAME), device="cpu")
            objects = torch.load(directory / OBJECTS_NAME, map_location="cpu", weights_only=True)
            if not isinstance(objects, dict):
                raise TypeError(f"{OBJECTS_NAME} of step {info.step} holds a {type(objects).__name__}, not a dict")
            meta = json.loads((directory / META_NAME).read_text("utf-8"))
            if not isinstance(meta, dict):
                raise TypeError(f"{META_NAME} of step {info.step} is not a JSON object")
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return CheckpointState(tensors=tensors, objects=objects, meta=meta)


def _valid_manifest(manifest: Any, step: int) -> bool:
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return False
    if manifest.get("step") != step or not isinstance(manifest.get("files"), list):
        return False
    return all(
        isinstance(f, dict)
        and isinstance(f.get("name"), str)
        and isinstance(f.get("size"), int)
        and isinstance(f.get("sha256"), str)
        for f in manifest["files"]
    )
