# orders-consumer image: python:3.11-slim, runs as a non-root user.
#
#   docker build -t orders-consumer .
#   docker run --rm -e ORDERS_CONSUMER_CONNECTION_STRING=... -p 9464:9464 orders-consumer
#
# The default command consumes with the prod settings (config/prod.yaml). Pass
# `run --env sit`, or any other `orders-consumer` command, to override it.
# Build argument EXTRAS selects optional dependencies, for example EXTRAS=tracing.

FROM python:3.11-slim AS build

# python-qpid-proton (used by the bundled local broker) is built from source when pip
# finds no wheel for the platform, which needs a C compiler. Only this stage has one.
# The compiler is not pinned: Debian replaces package versions in point releases, and
# nothing from this stage but the virtualenv reaches the final image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY handlers ./handlers
COPY localbus ./localbus

ARG EXTRAS=""
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ".${EXTRAS:+[$EXTRAS]}"


FROM python:3.11-slim

# A fixed numeric id, so Kubernetes can check runAsNonRoot without a name lookup.
ARG UID=10001
RUN groupadd --system --gid "${UID}" consumer \
    && useradd --system --uid "${UID}" --gid consumer --no-create-home \
        --shell /usr/sbin/nologin consumer

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY config ./config
# The bundled handlers keep their SQLite store under var/ (store_path).
RUN mkdir var && chown consumer:consumer var

# The operations server must listen on all interfaces inside a container, or the
# kubelet probes and Prometheus cannot reach it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORDERS_CONSUMER_CONFIG_DIR=/app/config \
    ORDERS_CONSUMER_METRICS_HOST=0.0.0.0 \
    ORDERS_CONSUMER_METRICS_PORT=9464

USER ${UID}
EXPOSE 9464

# Docker's own health check. Kubernetes ignores it and uses the Deployment's probes.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2)"]

ENTRYPOINT ["orders-consumer"]
CMD ["run", "--env", "prod"]
