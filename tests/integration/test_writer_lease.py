"""The writer lease against S3 (moto over HTTP): its conditional create and replace
(``If-None-Match: *``, ``If-Match``) decide who writes a run. The rules are in
tests/unit/test_writer_lease.py; the trainer end to end in tests/reliability/test_bad_inputs.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.harness.s3 import S3Harness
from tuneloop.lease import RENEW_SECONDS, TTL_RENEWALS, WriterLease
from tuneloop.ownership import OutputOwnedError
from tuneloop.storage import Storage

pytestmark = pytest.mark.integration


def test_one_writer_at_a_time_on_s3_stale_and_earlier_attempts_taken_over(s3: S3Harness) -> None:
    out = s3.uri("out/")
    now = [datetime(2026, 12, 6, 12, 0, tzinfo=UTC)]

    def lease(host: str, attempt: int = 0) -> WriterLease:
        return WriterLease(Storage.for_uri(out), out, 1, attempt=attempt, clock=lambda: now[0], host=host, pid=7)

    first = lease("a")
    first.acquire()
    with pytest.raises(OutputOwnedError, match="pid 7 on host a, writing since 2026-12-06T12:00:00Z"):
        lease("b").acquire()
    assert first.renew()
    now[0] += timedelta(seconds=RENEW_SECONDS * TTL_RENEWALS)  # first stopped renewing
    stale_taker = lease("c", attempt=1)
    stale_taker.acquire()
    assert stale_taker.took_over is not None and stale_taker.took_over.startswith("not renewed since")
    assert not first.renew()
    later = lease("d", attempt=2)
    later.acquire()  # at once: attempt 1 is earlier
    with pytest.raises(OutputOwnedError, match=r"took it over: pid 7 on host d \(attempt 2\)"):
        stale_taker.check()
    stale_taker.release()  # leaves the later attempt's lease alone
    assert json.loads(s3.get_bytes("out/runs/1/writer.json"))["host"] == "d"
    later.release()
    assert json.loads(s3.get_bytes("out/runs/1/writer.json"))["released"] is True
    lease("e").acquire()  # released: at once
