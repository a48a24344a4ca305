"""Observability as code: the Grafana dashboard and the metrics reference, generated.

Not part of the installed distribution and never imported by the operator or the trainer: the
generators need ``grafana-foundation-sdk`` (a test/dev dependency). Run from the repository root::

    python -m observability          # rewrite helm/tuneloop/dashboards/tuneloop.json and the docs
    python -m observability --check  # exit 1 when a generated file is out of date (make lint)
"""
