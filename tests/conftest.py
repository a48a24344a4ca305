import os

# Nothing may be fetched from a model hub in tests. huggingface_hub reads this once, at import,
# so it is set here, before any test module imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = [
    "tests.harness.s3",
    "tests.harness.model_fixtures",
    "tests.harness.k8s_fixtures",
    "tests.harness.kubelet_fixtures",
    "tests.harness.operator",
    "tests.harness.prometheus",
    "tests.harness.reliability",
    "tests.harness.faults_s3",
    "pytester",
]
