"""One writer per run on S3: the writer lease ``runs/<n>/writer.json``.

The run claim (:mod:`tuneloop.ownership`) lets the same job take its run again (``tuneloop run
--run N`` to resume, the operator's next attempt), so it cannot tell a resume from a second writer
still running: two ``tuneloop run job.yaml --output s3://… --run 1`` at once, or the pod of an
earlier attempt still running on a partitioned node while the operator's next attempt writes the
same run. In a local output a ``flock`` on ``run.json`` tells them apart; S3 has no locks, so
the process that writes a run holds a *lease* there instead (:class:`WriterLease`):

* **Acquired before anything of the run is written**, with a conditional create of
  :meth:`Layout.run_writer <tuneloop.contract.Layout.run_writer>` naming the writer (a random
  id, host, pid, the operator's attempt number, since, last renewed). When it exists, the new
  writer takes it over (a conditional replace, so of two takers one wins) only if it is
  *released* (its writer ended cleanly), *stale* (not renewed for :data:`TTL_RENEWALS` renewal
  periods), held by an *earlier attempt* of the operator (which runs one attempt at a time, so
  an earlier attempt's pod still writing is a zombie), or held by a process of *this host that
  has ended*. Otherwise it is refused: :class:`~tuneloop.ownership.OutputOwnedError` naming the
  holder and when it counts as gone.
* **Renewed** every :data:`RENEW_SECONDS` by a background thread, with a conditional replace
  against the version it last wrote: a writer whose lease was taken over finds out at its next
  renewal and never renews again.
* **Checked** (:meth:`WriterLease.check`: one read) right before a checkpoint manifest is
  committed and before the run's final outputs are written: a writer that lost the lease stops
  there, so a zombie never overwrites the newer attempt's manifest or model.
* **Released** at a clean end (success, failure, SIGTERM) by marking it released (a
  conditional replace, so a lease taken over meanwhile is left alone): a resume right after
  need not wait for it to go stale.

What remains: the check and the write after it are two requests, so a writer that is taken
over in between (a window of one request, milliseconds) still writes once; and staleness
compares the holder's clock (``renewed``) with the taker's, so hosts whose clocks differ by
more than the TTL could take over a live lease.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from tuneloop.contract import Layout
from tuneloop.ownership import OutputOwnedError
from tuneloop.storage import NotFoundError, PreconditionFailedError, Storage, StorageError, safe_join

__all__ = [
    "RENEW_SECONDS",
    "TTL_RENEWALS",
    "WRITER_FORMAT",
    "WriterLease",
    "WriterRecord",
    "takeover_reason",
]

log = logging.getLogger(__name__)

WRITER_FORMAT: Final = "tuneloop-writer/1"
#: Seconds between renewals of a held lease.
RENEW_SECONDS: Final = 30.0
#: A lease not renewed for this many renewal periods is stale: its writer is gone.
TTL_RENEWALS: Final = 3
#: Tries of an acquisition that keeps losing races before giving up.
MAX_TRIES: Final = 10


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class WriterRecord:
    """What ``runs/<n>/writer.json`` says: who writes the run, and since when."""

    writer: str
    """A random id of the writing process (one per acquisition)."""
    host: str
    pid: int
    attempt: int
    """The operator's attempt number (``TUNELOOP_ATTEMPT``); 0 for ``tuneloop run``."""
    since: datetime
    renewed: datetime
    ttl_seconds: float
    """How long after ``renewed`` the lease counts as gone (the holder's renewal period × 3)."""
    released: bool = False
    etag: str = field(default="", compare=False)

    @property
    def expires(self) -> datetime:
        return self.renewed + timedelta(seconds=self.ttl_seconds)

    def stale(self, now: datetime) -> bool:
        return now >= self.expires

    def describe(self) -> str:
        """``pid 4242 on host a-r1-a2-n0 (attempt 2), writing since …, last renewed …``."""
        attempt = f" (attempt {self.attempt})" if self.attempt else ""
        return (
            f"pid {self.pid} on host {self.host}{attempt}, writing since {_utc(self.since)}, "
            f"last renewed {_utc(self.renewed)}"
        )

    def to_json(self) -> bytes:
        body = {
            "format": WRITER_FORMAT,
            "writer": self.writer,
            "host": self.host,
            "pid": self.pid,
            "attempt": self.attempt,
            "since": _utc(self.since),
            "renewed": _utc(self.renewed),
            "ttlSeconds": self.ttl_seconds,
            "released": self.released,
        }
        return json.dumps(body, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, etag: str) -> WriterRecord | None:
        """The record, or ``None`` when ``data`` is not one (then anyone may replace it)."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(raw, dict) or raw.get("format") != WRITER_FORMAT:
            return None
        since, renewed = _parse_time(raw.get("since")), _parse_time(raw.get("renewed"))
        pid, attempt, ttl = raw.get("pid"), raw.get("attempt"), raw.get("ttlSeconds")
        if (
            since is None
            or renewed is None
            or not isinstance(raw.get("writer"), str)
            or not isinstance(pid, int)
            or not isinstance(attempt, int)
            or not isinstance(ttl, int | float)
        ):
            return None
        return cls(
            writer=raw["writer"],
            host=str(raw.get("host") or "?"),
            pid=pid,
            attempt=attempt,
            since=since,
            renewed=renewed,
            ttl_seconds=float(ttl),
            released=raw.get("released") is True,
            etag=etag,
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # someone else's process, or cannot tell: alive
    return True


def takeover_reason(
    record: WriterRecord, *, attempt: int, host: str, pid: int, now: datetime, pid_alive: Callable[[int], bool]
) -> str | None:
    """Why a writer (``attempt``, ``host``, ``pid``) may take over the lease ``record``, or ``None``
    when it may not (the holder may still be writing)."""
    if record.released:
        return f"released by its writer at {_utc(record.renewed)}"
    if record.stale(now):
        return f"not renewed since {_utc(record.renewed)} (more than {record.ttl_seconds:.0f} s): its writer is gone"
    if attempt > record.attempt:
        return f"held by attempt {record.attempt}, earlier than this attempt {attempt}: that pod is gone or a zombie"
    if record.host == host and (record.pid == pid or not pid_alive(record.pid)):
        return f"its process (pid {record.pid} on this host) has ended"
    return None


class WriterLease:
    """The lease on one run of one output (see the module docstring). Not reusable."""

    def __init__(
        self,
        storage: Storage,
        output_uri: str,
        run: int,
        *,
        attempt: int = 0,
        renew_seconds: float = RENEW_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        host: str | None = None,
        pid: int | None = None,
        pid_alive: Callable[[int], bool] = _pid_alive,
    ) -> None:
        self.storage = storage
        self.output_uri = output_uri
        self.run = run
        self.uri = safe_join(output_uri, Layout.run_writer(run))
        self.attempt = attempt
        self.renew_seconds = renew_seconds
        self.clock = clock
        self.host = host if host is not None else socket.gethostname()
        self.pid = pid if pid is not None else os.getpid()
        self.pid_alive = pid_alive
        self.writer = secrets.token_hex(8)
        self.took_over: str | None = None
        """Why an earlier holder's lease was taken over at :meth:`acquire` (``None``: it was free,
        or released)."""
        self._record: WriterRecord | None = None
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the holder's state ---------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this process holds the lease, as far as it knows (no request)."""
        with self._lock:
            return self._record is not None and self._lost is None

    @property
    def lost(self) -> str | None:
        """Why this process no longer holds the lease (``None``: it holds it, or never did)."""
        with self._lock:
            return self._lost

    def _new_record(self, since: datetime | None = None) -> WriterRecord:
        now = self.clock()
        return WriterRecord(
            writer=self.writer,
            host=self.host,
            pid=self.pid,
            attempt=self.attempt,
            since=since or now,
            renewed=now,
            ttl_seconds=self.renew_seconds * TTL_RENEWALS,
        )

    def _read(self) -> WriterRecord | None:
        """The current record (``None``: none); one that is not a record reads as a released one."""
        try:
            versioned = self.storage.read_versioned(self.uri)
        except NotFoundError:
            return None
        record = WriterRecord.from_json(versioned.data, versioned.etag)
        if record is None:
            log.warning("%s is not a writer lease; it is replaced", self.uri)
            epoch = datetime.fromtimestamp(0, UTC)
            return WriterRecord("", "?", 0, 0, epoch, epoch, 0.0, released=True, etag=versioned.etag)
        return record

    # --- acquire, renew, check, release ---------------------------------------------------------

    def acquire(self) -> None:
        """Become the run's writer, or raise :class:`OutputOwnedError` naming the one that is."""
        for _ in range(MAX_TRIES):
            mine = self._new_record()
            try:
                self.storage.create_bytes(self.uri, mine.to_json(), content_type="application/json")
            except PreconditionFailedError:
                pass
            else:
                self._hold()
                return
            current = self._read()
            if current is None:
                continue  # released and removed in between: create again
            why = takeover_reason(
                current, attempt=self.attempt, host=self.host, pid=self.pid, now=self.clock(), pid_alive=self.pid_alive
            )
            if why is None:
                raise OutputOwnedError(self._refusal(current), uri=self.uri)
            try:
                self.storage.replace_bytes(self.uri, mine.to_json(), etag=current.etag, content_type="application/json")
            except PreconditionFailedError:
                continue  # another writer took it over first: decide again
            if not current.released:  # a released lease is free: nothing taken from anyone
                self.took_over = why
            log.info("took over the writer lease %s: %s", self.uri, why)
            self._hold()
            return
        raise StorageError(f"could not acquire {self.uri}: it keeps changing; retry", uri=self.uri)

    def _refusal(self, holder: WriterRecord) -> str:
        where = f"run {self.run} under {self.output_uri}"
        if holder.attempt > self.attempt:
            return (
                f"{where} is written by a later attempt of the operator ({holder.describe()}); this attempt "
                f"({self.attempt}) must not write it and stops"
            )
        what_to_do = (
            "the operator runs one pod of a run at a time: look for a second operator, or a trainer pod started by hand"
            if self.attempt
            else f"wait for it to end (then resume the run with --run {self.run}), or leave out --run for a new run"
        )
        return (
            f"{where} is being written by another process right now: {holder.describe()} "
            f"({Layout.run_writer(self.run)}). It counts as gone if not renewed by {_utc(holder.expires)}; {what_to_do}"
        )

    def _hold(self) -> None:
        if not self._adopt(self._read()):  # its version token, for the next conditional replace
            raise OutputOwnedError(self.lost or "", uri=self.uri)

    def _adopt(self, stored: WriterRecord | None) -> bool:
        """Keep ``stored`` (just read back after writing it) as the version to replace next; when
        another writer's record is there instead, the lease is lost. Whether it is still held."""
        with self._lock:
            if stored is None or stored.writer != self.writer or stored.released:
                if self._lost is None:
                    self._lost = self._lost_message(stored)
                return False
            self._record = stored
            return self._lost is None

    def renew(self) -> bool:
        """Renew the lease (a conditional replace); ``False`` once it is lost. A storage error is
        logged and left to the next renewal (the lease lasts :data:`TTL_RENEWALS` periods)."""
        with self._lock:
            record, lost = self._record, self._lost
        if record is None or lost is not None:
            return False
        renewed = self._new_record(since=record.since)
        try:
            try:
                self.storage.replace_bytes(
                    self.uri, renewed.to_json(), etag=record.etag, content_type="application/json"
                )
            except PreconditionFailedError:
                current = self._read()
                if current is not None and current.writer == self.writer and not current.released:
                    # Our own renewal, whose read-back failed last time: renew from its version.
                    return self._adopt(current) and self.renew()
                self._lose(current)
                return False
            stored = self._read()
        except StorageError as exc:
            log.warning(
                "renewing the writer lease %s failed (retried in %.0f s): %s", self.uri, self.renew_seconds, exc
            )
            return True
        return self._adopt(stored)  # taken over between the replace and the read: lost

    def check(self) -> None:
        """Right before a commit: raise :class:`OutputOwnedError` if another writer took the lease
        over (one read). A storage error is raised as it is (retryable)."""
        with self._lock:
            record, lost = self._record, self._lost
        if record is None:
            raise RuntimeError("check() before acquire()")
        if lost is None:
            current = self._read()
            if current is None or current.writer != self.writer or current.released:
                self._lose(current)
        lost = self.lost
        if lost is not None:
            raise OutputOwnedError(lost, uri=self.uri)

    def release(self) -> None:
        """Mark the lease released, unless another writer holds it by now. Never raises."""
        self.stop()
        with self._lock:
            record, lost = self._record, self._lost
            self._record = None
        if record is None or lost is not None:
            return
        released = replace(self._new_record(since=record.since), released=True)
        try:
            self.storage.replace_bytes(self.uri, released.to_json(), etag=record.etag, content_type="application/json")
        except PreconditionFailedError:
            log.info("writer lease %s was taken over before it was released", self.uri)
        except StorageError as exc:
            log.warning(
                "releasing the writer lease %s failed (it counts as gone at %s): %s",
                self.uri,
                _utc(record.expires),
                exc,
            )

    # --- the renewal thread ---------------------------------------------------------------------

    def start(self) -> None:
        """Renew every ``renew_seconds`` in a background thread until :meth:`stop`, :meth:`release`
        or the loss of the lease."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._renew_loop, name="tuneloop-writer-lease", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            try:
                if not self.renew():
                    log.warning("writer lease %s lost: %s", self.uri, self.lost)
                    return
            except Exception:  # never let the thread die silently with the lease
                log.warning("renewing the writer lease %s failed", self.uri, exc_info=True)

    # --- inside ---------------------------------------------------------------------------------

    def _lose(self, current: WriterRecord | None) -> None:
        with self._lock:
            if self._lost is None:
                self._lost = self._lost_message(current)

    def _lost_message(self, current: WriterRecord | None) -> str:
        where = f"run {self.run} under {self.output_uri}"
        if current is None or not current.writer:
            taker = f"{Layout.run_writer(self.run)} was removed or overwritten"
        elif current.released:
            taker = f"the lease was released by another writer ({current.describe()})"
        else:
            taker = f"another writer took it over: {current.describe()}"
        return f"{where} is no longer this process's to write ({taker}); stopping without committing anything more"
