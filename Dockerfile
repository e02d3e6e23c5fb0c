# One image for every service; docker-compose.yaml picks the command:
#   gateway-api | gateway-bridge | gateway-worker | gateway migrate
# Build alone: docker build -t heartbeat-gateway .
# Plain Dockerfile syntax (no RUN --mount), so the classic builder of docker-compose 1.29
# builds it as well as BuildKit does.
#
# Every image of the stack (this one and docker/*/Dockerfile) is built from Debian's packages
# on one base, BASE_IMAGE: Debian's own image by default, or one made from Debian's packages
# where no image registry is reachable (docker/base-image.sh; see docs/compose.md).
ARG BASE_IMAGE=debian:trixie-slim

# ---- build: the project and its dependencies (no dev extras) in a virtualenv --------------
FROM ${BASE_IMAGE} AS build

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# pip trusts the system's certificate authorities (those of the base image), not only its own.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt

RUN python3 -m venv /opt/gateway
WORKDIR /src
# The dependencies first, in a layer of their own: a change to the sources alone rebuilds only
# the last step, not the downloads.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' > /tmp/requirements.txt \
 && /opt/gateway/bin/pip install -r /tmp/requirements.txt
# README.md is pyproject's `readme`, so the build needs it.
COPY README.md ./
COPY gateway/ gateway/
COPY bridge/ bridge/
COPY worker/ worker/
COPY api/ api/
RUN /opt/gateway/bin/pip install . --no-deps

# ---- runtime: Python and the virtualenv only (no sources, no build tools), not root --------
FROM ${BASE_IMAGE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway

COPY --from=build /opt/gateway /opt/gateway

ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_LOG_FORMAT=json \
    GATEWAY_API_HOST=0.0.0.0 \
    GATEWAY_HEALTH_HOST=0.0.0.0

# An empty, read-only working directory: pydantic-settings reads `.env` from here if mounted.
WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# api (HTTP, HTTPS), bridge health, worker health
EXPOSE 8000 8443 8010 8011
CMD ["gateway-api"]
