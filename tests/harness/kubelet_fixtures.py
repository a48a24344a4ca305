"""Pytest fixture for the local kubelet (register with ``pytest_plugins``).

- ``local_kubelet`` (function): a started :class:`~tests.harness.kubelet.LocalKubelet` for the
  test's ``k8s_api`` (node ``local-node``, 8 GPUs), working under ``tmp_path``. It stops (every
  pod process SIGKILLed) before ``k8s_api`` is torn down and before the next test resets the
  emulator, since it depends on ``k8s_api``. The test fails at teardown if the kubelet's
  polling thread raised (a harness bug).

Other settings (node labels, GPUs, ``env_overrides``): ``with LocalKubelet(k8s_api, path, ...)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.k8s_fixtures import K8sApi
from tests.harness.kubelet import LocalKubelet


@pytest.fixture
def local_kubelet(k8s_api: K8sApi, tmp_path: Path) -> Iterator[LocalKubelet]:
    """A started local kubelet on the test's emulator; stopped at teardown (see the module docstring)."""
    with LocalKubelet(k8s_api, tmp_path / "kubelet") as kubelet:
        yield kubelet
    if kubelet.errors:
        pytest.fail("the local kubelet raised internally:\n" + "\n".join(kubelet.errors), pytrace=False)
