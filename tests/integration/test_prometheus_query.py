"""The drift query (tuneloop_operator.prom) against a real Prometheus server scraping an exporter
in the test process, and against servers that misbehave (refuse, stall, answer something else)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.harness.prometheus import PrometheusHarness, free_port
from tuneloop_operator.prom import DriftSample, query_scalar

pytestmark = pytest.mark.integration


def query(url: str, promql: str, *, timeout: float = 10.0) -> DriftSample:
    return asyncio.run(query_scalar(url, promql, timeout=timeout))


def test_a_value_above_then_below_the_threshold(prometheus: PrometheusHarness) -> None:
    score = prometheus.gauge("tuneloop_test_drift_score")
    score.set(0.83)
    prometheus.wait_for_value("tuneloop_test_drift_score", 0.83)
    before = datetime.now(UTC)
    sample = query(prometheus.url, "tuneloop_test_drift_score")
    assert sample == DriftSample(value=0.83, error=None, at=sample.at)
    assert sample.at >= before
    assert sample.value is not None and sample.value > 0.5  # above a threshold of 0.5

    score.set(0.12)
    prometheus.wait_for_value("tuneloop_test_drift_score", 0.12)
    sample = query(prometheus.url.rstrip("/") + "/", "tuneloop_test_drift_score")  # a trailing slash is fine
    assert (sample.value, sample.error) == (0.12, None)


def test_scalar_results_and_aggregations_are_one_number(prometheus: PrometheusHarness) -> None:
    prometheus.gauge("tuneloop_test_accuracy").set(0.5)
    prometheus.wait_for_value("tuneloop_test_accuracy", 0.5)
    assert query(prometheus.url, "scalar(tuneloop_test_accuracy) * 2").value == 1.0  # resultType scalar
    assert query(prometheus.url, "1 - tuneloop_test_accuracy / 4").value == 0.875


def test_an_empty_result_is_an_error_not_a_value(prometheus: PrometheusHarness) -> None:
    sample = query(prometheus.url, 'tuneloop_test_metric_that_does_not_exist{model="x"}')
    assert sample.value is None
    assert sample.error is not None
    assert "matched no series" in sample.error
    assert prometheus.url in sample.error


def test_several_series_are_an_error_until_aggregated(prometheus: PrometheusHarness) -> None:
    # 'finetunejob', not 'job': Prometheus renames a scraped 'job' label to 'exported_job'.
    gauge = prometheus.gauge("tuneloop_test_live_accuracy", ["finetunejob"])
    gauge.labels(finetunejob="a").set(0.9)
    gauge.labels(finetunejob="b").set(0.7)
    prometheus.wait_for("tuneloop_test_live_accuracy", lambda r: len(r) == 2)

    sample = query(prometheus.url, "tuneloop_test_live_accuracy")
    assert sample.value is None
    assert sample.error is not None
    assert "returned 2 series" in sample.error
    assert 'finetunejob="a"' in sample.error
    assert "max(" in sample.error

    assert query(prometheus.url, "min(tuneloop_test_live_accuracy)").value == 0.7
    assert query(prometheus.url, 'tuneloop_test_live_accuracy{finetunejob="b"}').value == 0.7


def test_a_promql_syntax_error_is_reported_with_prometheus_reason(prometheus: PrometheusHarness) -> None:
    sample = query(prometheus.url, "sum(tuneloop_test_drift_score")
    assert sample.value is None
    assert sample.error is not None
    assert "refused the query: bad_data" in sample.error
    assert "parse error" in sample.error


@pytest.mark.parametrize(
    ("promql", "expected"),
    [
        ("0 / 0", "returned NaN"),
        ("1 / 0", "returned +Inf"),
        ("tuneloop_test_drift_score[1m]", "range vector"),
        ('"drift"', "returned a string"),
    ],
)
def test_results_that_are_not_one_finite_number(prometheus: PrometheusHarness, promql: str, expected: str) -> None:
    prometheus.gauge("tuneloop_test_drift_score").set(0.3)
    prometheus.wait_for("tuneloop_test_drift_score", lambda r: len(r) == 1)
    sample = query(prometheus.url, promql)
    assert sample.value is None
    assert sample.error is not None
    assert expected in sample.error


def test_a_url_that_is_not_prometheus(prometheus: PrometheusHarness) -> None:
    # The exporter answers every path with its metrics, as text.
    sample = query(prometheus.exporter.url, "up")
    assert sample.value is None
    assert sample.error is not None
    assert "did not answer with JSON" in sample.error
    # A wrong path prefix: Prometheus answers 404.
    sample = query(f"{prometheus.url}/prometheus", "up")
    assert sample.error is not None
    assert "HTTP 404" in sample.error


def test_an_unreachable_url_is_an_error_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    sample = query(url, "up", timeout=5.0)
    assert time.monotonic() - started < 5.0
    assert sample.value is None
    assert sample.error is not None
    assert sample.error.startswith(f"cannot connect to Prometheus at {url}")


@pytest.fixture
def stalled_server() -> Iterator[str]:
    """A server that accepts connections (the kernel completes them) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_stalled_server_times_out_within_the_bound(stalled_server: str) -> None:
    started = time.monotonic()
    sample = query(stalled_server, "up", timeout=1.0)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 3.0
    assert sample.value is None
    assert sample.error == (
        f"Prometheus at {stalled_server} did not answer within 1 s; check that it is up and reachable, "
        "or simplify the query"
    )


def test_a_stalled_server_times_out_with_a_shared_session(stalled_server: str) -> None:
    import aiohttp

    async def run() -> DriftSample:
        async with aiohttp.ClientSession() as session:
            return await query_scalar(stalled_server, "up", timeout=0.5, session=session)

    started = time.monotonic()
    sample = asyncio.run(run())
    assert time.monotonic() - started < 2.5
    assert sample.error is not None
    assert "did not answer within 0.5 s" in sample.error
