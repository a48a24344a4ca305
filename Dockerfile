# The operator image: Python 3.11 + tuneloop[operator] (Kopf, aiohttp, boto3, prometheus-client, pyarrow for
# Parquet row counts of new data, tzdata for schedules in a time zone).
# No torch stack: the operator never imports it (import-linter contract in pyproject.toml).
# Build from the repository root:  docker build -t ghcr.io/tuneloop/operator:0.1.0 .
# Pinned base (Debian 13 "trixie" slim); bump deliberately, together with constraints.txt.
FROM python:3.11.17-slim-trixie AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY tuneloop ./tuneloop
COPY operator ./operator
# Only because pyproject.toml names the package; it is never imported in this image.
COPY trainer_image/tuneloop_trainer ./trainer_image/tuneloop_trainer
# A regular (non-editable) install: the runtime stage copies the venv and none of /src.
RUN pip install --constraint constraints.txt '.[operator]'

FROM python:3.11.17-slim-trixie

# pip compiled the bytecode at install time; nothing is written next to the sources at run time,
# so the root filesystem can be read-only (the chart's Deployment, helm/tuneloop, mounts an emptyDir on /tmp).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv

# Non-root, numeric UID so runAsNonRoot can verify it.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin tuneloop
USER 10001:10001
# TUNELOOP_METRICS_PORT (Prometheus /metrics) and TUNELOOP_HEALTH_PORT (liveness /healthz) defaults.
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "tuneloop_operator"]
