"""The heartbeat against a real (moto) S3 server: written by HeartbeatSink, read back by the
operator's way (Storage.read_json, then Heartbeat.model_validate)."""

from __future__ import annotations

import math

import pytest

from tests.harness.s3 import S3Harness
from tuneloop.contract import Heartbeat, Layout
from tuneloop.storage import Storage
from tuneloop_trainer.progress import StepReport
from tuneloop_trainer.telemetry import HeartbeatSink

pytestmark = pytest.mark.integration


def test_heartbeat_round_trips_through_s3(s3: S3Harness) -> None:
    uri = s3.uri(f"jobs/sentiment/{Layout.status(2)}")
    storage = Storage.for_uri(uri)
    sink = HeartbeatSink(storage, uri, min_interval=5.0)
    sink.phase("training")
    for step in range(1, 4):
        sink.step(
            StepReport(
                step=step,
                total_steps=8,
                epoch=step / 4,
                loss=math.nan if step == 3 else 2.0 / step,
                learning_rate=1e-4,
                grad_norm=1.0,
                tokens=256,
                samples=4,
                seconds=0.1,
                tokens_per_second=2560.0,
                eta_seconds=0.5 * (8 - step),
            )
        )
    sink.set_checkpoint(3, s3.uri(f"jobs/sentiment/{Layout.checkpoint(2, 3)}"))
    sink.evaluation(3, "validation", {"loss": 0.7, "accuracy": 0.75})
    assert sink.flush(10)
    beat = Heartbeat.model_validate(storage.read_json(uri))
    assert beat.run == 2
    assert beat.phase == "training"
    assert beat.metrics == {"loss": 0.7, "accuracy": 0.75}
    assert beat.last_checkpoint is not None
    assert beat.last_checkpoint.step == 3
    sink.close()

    beat = Heartbeat.model_validate(storage.read_json(uri))
    assert beat.step == 3
    assert beat.total_steps == 8
    assert beat.progress_percentage == 37
    assert beat.loss is None  # NaN travels as null
    assert beat.estimated_remaining_seconds == 2
    assert sink.failures == 0
    assert s3.list_keys("jobs/") == [f"jobs/sentiment/{Layout.status(2)}"]


def test_unreachable_bucket_never_raises(s3: S3Harness) -> None:
    uri = s3.uri(Layout.status(1), bucket="no-such-bucket-tuneloop")
    sink = HeartbeatSink(Storage.for_uri(uri), uri)
    sink.phase("training")
    sink.close()
    assert sink.writes == 0
    assert sink.failures == 1
