"""Tuneloop: a Kubernetes operator for fine-tuning foundation models, continuously.

This core package holds what every part shares: the FineTuneJob API (:mod:`tuneloop.api`),
CRD generation (:mod:`tuneloop.crd`, from the schema of :mod:`tuneloop.openapi` and the CEL
rules of :mod:`tuneloop.cel`), manifest validation and the ``tuneloop`` CLI. It imports
neither Kopf nor the torch stack.
"""

__version__ = "0.1.0"
