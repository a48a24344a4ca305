"""The writer lease of a run (tuneloop/lease.py): who may write ``runs/<n>/`` of an S3 output.

Run against the file backend, which has the same conditional writes (create if absent, replace if
unchanged); the S3 case runs the trainer against moto (tests/integration/test_writer_lease.py,
tests/reliability/test_bad_inputs.py). Clocks are injected: nothing here waits.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tuneloop.contract import Layout
from tuneloop.lease import RENEW_SECONDS, TTL_RENEWALS, WriterLease
from tuneloop.ownership import OutputOwnedError
from tuneloop.storage import FileStorage, StorageError, VersionedBytes

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
TTL = RENEW_SECONDS * TTL_RENEWALS


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def lease(tmp_path: Path, clock: Clock, *, host: str = "node-a", pid: int = 100, attempt: int = 0) -> WriterLease:
    return WriterLease(
        FileStorage(),
        f"file://{tmp_path}/out",
        1,
        attempt=attempt,
        clock=clock,
        host=host,
        pid=pid,
        pid_alive=lambda _pid: True,
    )


def record(tmp_path: Path) -> dict[str, object]:
    return json.loads((tmp_path / "out" / Layout.run_writer(1)).read_text())


def test_the_first_writer_holds_the_lease_and_says_who_it_is(tmp_path: Path, clock: Clock) -> None:
    first = lease(tmp_path, clock)
    first.acquire()
    assert first.held and first.took_over is None
    written = record(tmp_path)
    assert written["host"] == "node-a" and written["pid"] == 100 and written["attempt"] == 0
    assert written["since"] == written["renewed"] == "2026-12-06T12:00:00Z" and written["released"] is False
    assert written["ttlSeconds"] == TTL


def test_a_second_writer_is_refused_naming_the_holder_and_when_it_counts_as_gone(tmp_path: Path, clock: Clock) -> None:
    lease(tmp_path, clock).acquire()
    clock.advance(TTL - 1)  # not stale yet
    second = lease(tmp_path, clock, host="laptop", pid=200)
    with pytest.raises(OutputOwnedError) as refused:
        second.acquire()
    message = str(refused.value)
    assert f"run 1 under file://{tmp_path}/out is being written by another process right now" in message
    assert "pid 100 on host node-a, writing since 2026-12-06T12:00:00Z, last renewed 2026-12-06T12:00:00Z" in message
    assert "counts as gone if not renewed by 2026-12-06T12:01:30Z" in message
    assert "--run 1" in message and "leave out --run" in message
    assert not second.held and record(tmp_path)["host"] == "node-a"  # nothing written


def test_renewing_keeps_the_lease_and_a_stale_one_is_taken_over(tmp_path: Path, clock: Clock) -> None:
    first = lease(tmp_path, clock)
    first.acquire()
    for _ in range(5):  # renewed in time: never stale
        clock.advance(RENEW_SECONDS)
        assert first.renew()
        with pytest.raises(OutputOwnedError):
            lease(tmp_path, clock, host="laptop").acquire()
    clock.advance(TTL)  # its writer stopped renewing (killed, or cut off from S3)
    second = lease(tmp_path, clock, host="laptop", pid=200)
    second.acquire()
    assert second.took_over is not None and "not renewed since 2026-12-06T12:02:30Z" in second.took_over
    assert not first.renew()  # the old writer finds out at its next renewal...
    with pytest.raises(OutputOwnedError, match=r"another writer took it over: pid 200 on host laptop"):
        first.check()  # ...and its next commit stops
    second.check()  # the new one goes on


def test_a_later_attempt_takes_over_at_once_and_the_earlier_one_stops_at_its_check(
    tmp_path: Path, clock: Clock
) -> None:
    zombie = lease(tmp_path, clock, host="pod-r1-a1-n0", pid=1, attempt=1)
    zombie.acquire()
    clock.advance(1)  # freshly renewed: only the attempt number decides
    later = lease(tmp_path, clock, host="pod-r1-a2-n0", pid=1, attempt=2)
    later.acquire()
    assert later.took_over is not None and "held by attempt 1, earlier than this attempt 2" in later.took_over
    assert zombie.held  # it does not know yet: no request made
    with pytest.raises(OutputOwnedError) as stopped:
        zombie.check()
    assert "no longer this process's to write" in str(stopped.value)
    assert "pid 1 on host pod-r1-a2-n0 (attempt 2)" in str(stopped.value)
    assert not zombie.renew() and zombie.lost is not None
    zombie.release()  # must not release the later attempt's lease
    assert record(tmp_path)["host"] == "pod-r1-a2-n0" and record(tmp_path)["released"] is False
    with pytest.raises(OutputOwnedError, match=r"is written by a later attempt of the operator .*attempt 2"):
        lease(tmp_path, clock, host="pod-r1-a1-n0", attempt=1).acquire()
    with pytest.raises(OutputOwnedError, match="one pod of a run at a time: look for a second operator"):
        lease(tmp_path, clock, host="hand-made-pod", attempt=2).acquire()  # the same attempt twice


def test_a_clean_end_releases_the_lease_so_a_resume_need_not_wait(tmp_path: Path, clock: Clock) -> None:
    first = lease(tmp_path, clock)
    first.acquire()
    first.release()
    assert record(tmp_path)["released"] is True and not first.held
    resumed = lease(tmp_path, clock, host="laptop", pid=300)
    resumed.acquire()  # at once, without waiting for the TTL
    assert resumed.held and resumed.took_over is None  # nothing taken from anyone: said nowhere


def test_an_ended_process_of_the_same_host_is_taken_over_but_a_live_one_is_not(tmp_path: Path, clock: Clock) -> None:
    lease(tmp_path, clock, pid=100).acquire()  # killed with SIGKILL: never released
    alive = WriterLease(
        FileStorage(), f"file://{tmp_path}/out", 1, clock=clock, host="node-a", pid=101, pid_alive=lambda p: p != 100
    )
    alive.acquire()
    assert alive.took_over == "its process (pid 100 on this host) has ended"
    with pytest.raises(OutputOwnedError):  # pid 101 is alive
        lease(tmp_path, clock, host="node-a", pid=102).acquire()


def test_a_renewal_thread_stops_on_release(tmp_path: Path, clock: Clock) -> None:
    first = lease(tmp_path, clock)
    first.acquire()
    first.start()
    first.release()
    assert first._thread is None and record(tmp_path)["released"] is True


def test_garbage_in_writer_json_does_not_block_a_writer(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "out" / Layout.run_writer(1)
    path.parent.mkdir(parents=True)
    path.write_text("not json")
    first = lease(tmp_path, clock)
    first.acquire()
    assert first.held and record(tmp_path)["pid"] == 100


class FlakyReads(FileStorage):
    """Reads fail while ``failing`` (a store that times out now and then)."""

    failing = False

    def read_versioned(self, uri: str) -> VersionedBytes:
        if self.failing:
            raise StorageError("read timed out", uri=uri)
        return super().read_versioned(uri)


def test_a_renewal_whose_read_back_failed_is_not_mistaken_for_a_takeover(tmp_path: Path, clock: Clock) -> None:
    storage = FlakyReads()
    first = WriterLease(storage, f"file://{tmp_path}/out", 1, clock=clock, host="a", pid=1, pid_alive=lambda _: True)
    first.acquire()
    clock.advance(RENEW_SECONDS)
    storage.failing = True
    assert first.renew()  # written, but its new version unknown: retried next time
    storage.failing = False
    clock.advance(RENEW_SECONDS)
    assert first.renew() and first.held  # the version it missed was its own
    first.check()
    assert record(tmp_path)["renewed"] == "2026-12-06T12:01:00Z"
