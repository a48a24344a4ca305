"""A local kubelet for the Kubernetes API emulator: every pod runs as a local subprocess.

There is no cluster in tests, so nothing runs the pods an operator creates. :class:`LocalKubelet`
plays scheduler and kubelet for one emulated node: a background thread polls the emulator
(:mod:`tests.harness.k8s`) for pods, schedules them against the node's labels and GPUs, runs
the first container of each as a process group on this machine and writes the pod status
back as a real kubelet would (phases, conditions, container states, exit codes, termination
messages), so an operator under test sees real pod lifecycles. Tests inject faults from any
thread: :meth:`LocalKubelet.kill` (a crash or an OOM kill), :meth:`LocalKubelet.evict`
(preemption or eviction) and :meth:`LocalKubelet.lose_node`.

Conventions (see tests/README.md, "The local kubelet"):

- An image whose name contains ``does-not-exist`` cannot be pulled (``ErrImagePull``, then
  ``ImagePullBackOff``); any other image "exists", and the container's ``command`` runs on
  this machine, with ``python``/``python3`` as argv[0] replaced by the kubelet's Python.
- Container paths become host paths under ``workdir/<namespace>/<pod>/``: every argv item and
  env value equal to a ``mountPath`` or below one (also as the value of ``--flag=value``) is
  rewritten. The termination message file is a host file whose path the process gets in
  ``TUNELOOP_TERMINATION_LOG`` (the one Tuneloop convention here: the trainer honours it).
- The process starts from a clean environment: ``PATH`` of this machine, ``HOME`` (the pod's
  directory), ``HOSTNAME``, the pod's env, ``TUNELOOP_TERMINATION_LOG``, then ``env_overrides``.

Everything touches the emulator through :class:`tests.harness.k8s_fixtures.K8sApi` (calls that
run briefly on the emulator's loop) or plain HTTP; no call waits on the loop for long.

The modules: ``runs`` (what is kept of each pod, conventions, scheduling rules), ``status``
(the pod status written back, deletion), ``containers`` (running and stopping a pod's
process group), ``faults`` (fault injection), ``node`` (:class:`LocalKubelet`: lifecycle,
polling, scheduling and admission, the Node object).
"""

from __future__ import annotations

from tests.harness.kubelet.containers import resolve_cluster_dns
from tests.harness.kubelet.node import LocalKubelet
from tests.harness.kubelet.runs import GPU_RESOURCE, MISSING_IMAGE_MARKER, TERMINATION_LOG_ENV

__all__ = [
    "GPU_RESOURCE",
    "MISSING_IMAGE_MARKER",
    "TERMINATION_LOG_ENV",
    "LocalKubelet",
    "resolve_cluster_dns",
]
