"""The operator's environment configuration: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tuneloop_operator.settings import DEFAULT_TRAINER_IMAGE, OperatorSettings, SettingsError

pytestmark = pytest.mark.unit


def test_defaults_are_the_documented_ones() -> None:
    s = OperatorSettings.from_env({})
    assert s.trainer_image == DEFAULT_TRAINER_IMAGE
    assert s.namespaces == ()  # cluster-wide
    assert (s.metrics_port, s.health_port) == (8080, 8081)
    assert s.reconcile_interval == 30.0
    assert (s.backoff_base_seconds, s.backoff_max_seconds, s.max_preemptions) == (10.0, 360.0, 20)
    assert s.stuck_terminating_seconds == 300.0


def test_values_are_parsed() -> None:
    s = OperatorSettings.from_env(
        {
            "TUNELOOP_TRAINER_IMAGE": " registry.local/trainer:1.2 ",
            "TUNELOOP_NAMESPACES": "ml, research ,,",
            "TUNELOOP_METRICS_PORT": "0",
            "TUNELOOP_RECONCILE_INTERVAL": "2.5",
            "TUNELOOP_MAX_PREEMPTIONS": "3",
            "TUNELOOP_STUCK_TERMINATING_SECONDS": "90",
            "TUNELOOP_LOG_LEVEL": "debug",
        }
    )
    assert s.stuck_terminating_seconds == 90.0
    assert s.trainer_image == "registry.local/trainer:1.2"
    assert s.namespaces == ("ml", "research")
    assert s.metrics_port == 0  # disabled
    assert s.reconcile_interval == 2.5 and s.max_preemptions == 3 and s.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("TUNELOOP_METRICS_PORT", "http", "not a number"),
        ("TUNELOOP_HEALTH_PORT", "70000", "not a port number"),
        ("TUNELOOP_RECONCILE_INTERVAL", "0", "at least"),
        ("TUNELOOP_BACKOFF_BASE_SECONDS", "-1", "at least"),
        ("TUNELOOP_MAX_PREEMPTIONS", "2.5", "whole number"),
        ("TUNELOOP_STUCK_TERMINATING_SECONDS", "soon", "not a number"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as info:
        OperatorSettings.from_env({name: value})
    assert name in str(info.value) and says in str(info.value)


def test_the_operator_refuses_to_start_on_a_bad_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tuneloop_operator"],
        env={"TUNELOOP_METRICS_PORT": "eighty", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "TUNELOOP_METRICS_PORT='eighty' is not a number" in result.stderr
    assert "Traceback" not in result.stderr
