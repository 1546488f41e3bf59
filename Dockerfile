# Mailroom container image.
#
#   docker build -t mailroom .
#   docker run -d -p 8080:8080 -v mailroom-data:/data -e MAILROOM_API_KEYS=... mailroom
#
# Stage 1 ("builder") turns the project and all of its dependencies into wheels.
# Stage 2 ("runtime") installs only those wheels into a virtual environment on a
# clean copy of the base image: no compilers, no pip cache, no tests, no build tools.
#
# BASE is any Debian-like image with python3 (>= 3.11) and its venv module: the
# official slim image by default; CI passes a locally debootstrapped Debian base,
# whose interpreter is /usr/bin/python3 rather than /usr/local/bin/python, which is
# why every step calls "python3" through PATH.
ARG BASE=python:3.11-slim

# --------------------------------------------------------------------------- builder
FROM ${BASE} AS builder

# Optional package-index settings for builds behind a mirror or a private index:
# --build-arg PIP_INDEX_URL=https://mirror.example/simple, or a pip.conf made
# available to the build (CI bind-mounts one and passes PIP_CONFIG_FILE). They exist
# only in this stage, which is not part of the final image.
ARG PIP_INDEX_URL
ARG PIP_CONFIG_FILE

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

RUN python3 -m venv /opt/build

# Dependencies first, from pyproject.toml alone, so that this (slow) layer stays
# cached while only the code changes. Every dependency ships binary wheels; should
# one ever need compiling, install the compiler here: this stage is thrown away.
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
 && /opt/build/bin/pip wheel --wheel-dir /wheels --requirement /tmp/requirements.txt

# Then the project itself (.dockerignore keeps the context to pyproject.toml,
# README.md and service/).
COPY . /src
RUN /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels /src

# --------------------------------------------------------------------------- runtime
FROM ${BASE} AS runtime

# An unprivileged system account with a fixed, numeric uid/gid (Kubernetes
# runAsNonRoot needs a numeric USER). /data holds the SQLite database and the
# generated secret-key file, so only that account may read it.
RUN groupadd --system --gid 10001 mailroom \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
            --shell /usr/sbin/nologin mailroom \
 && install -d -o 10001 -g 10001 -m 0700 /data

# Install the wheels from the builder stage (bind-mounted, so they never become a
# layer), offline and ignoring any pip configuration; then remove pip and setuptools
# from the venv: nothing installs anything at run time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/tmp/wheels \
    python3 -m venv /opt/venv \
 && PIP_CONFIG_FILE=/dev/null /opt/venv/bin/python -m pip install \
        --no-index --no-cache-dir --disable-pip-version-check /tmp/wheels/*.whl \
 && /opt/venv/bin/python -m pip uninstall --yes --disable-pip-version-check pip setuptools \
 && /opt/venv/bin/python -c "import service"

# Configuration is environment only (see README): listen on all interfaces inside
# the container, keep state in the volume.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8 \
    MAILROOM_HOST=0.0.0.0 \
    MAILROOM_PORT=8080 \
    MAILROOM_DATABASE=/data/mailroom.db

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

# Labels last: CREATED/REVISION change on every build and must not invalidate the
# cached layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="Mailroom" \
      org.opencontainers.image.description="Mail accounts as a REST microservice: POP3 retrieval into a local store, SMTP delivery from a durable outbox." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT"

# The image's own interpreter and the standard library: no curl/wget needed.
# urlopen raises (exit status 1) on a refused connection, a timeout or a non-2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MAILROOM_PORT', '8080'), timeout=4)"]

# SIGTERM starts a graceful shutdown: the server stops accepting requests, finishes
# in-flight work and closes the database before exiting. Give it time with
# `docker stop -t 30` / `stop_grace_period: 30s`.
STOPSIGNAL SIGTERM

CMD ["/opt/venv/bin/python", "-m", "service"]
