"""The Tuneloop operator: Kopf handlers that reconcile FineTuneJobs into trainer pods.

It never runs training code itself and never imports the torch stack (see the
import-linter contracts in pyproject.toml).
"""
