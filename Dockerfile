# syntax=docker/dockerfile:1.7
#
# Carnet image: one image, three roles chosen by the first argument (docker/entrypoint.sh):
#   api (default)  migrate, then serve on 0.0.0.0:$PORT (8000)
#   migrate        bring the schema to head and exit
#   worker         `carnet worker` (outbox deliveries, imports)
#   anything else  run as given, e.g. `carnet token create --role admin --subject me@shop.example`
#
# Needs DATABASE_URL (postgresql://user:pass@host:5432/db) and JWT_SECRET (32+ characters) at run time:
# the app refuses to boot without JWT_SECRET once DATABASE_URL is set, and the image never uses the
# embedded PostgreSQL.
#
# Why an editable install at /srv/carnet rather than `pip install .` into site-packages:
# app/migrations.py finds Alembic's files at `Path(app.__file__).parents[1] / "alembic.ini"`. After a
# plain `pip install .` app/ lives in site-packages, so that path is site-packages/alembic.ini, which
# does not exist. `pip install -e /srv/carnet` keeps app/ in /srv/carnet, next to alembic.ini and
# alembic/, while still installing the `carnet` console script and the distribution metadata that
# create_app reads (importlib.metadata.version("carnet")); that metadata is also why PYTHONPATH alone
# would not do. The editable hook points at /srv/carnet, so the runtime stage puts the source at
# exactly that path.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: the virtual environment ------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /srv/carnet
# Metadata first so the dependency layer is reused while only app code changes.
# README.md* is a glob on purpose: pyproject names it, but the build tolerates its absence.
COPY pyproject.toml README.md* ./
RUN mkdir app && touch app/__init__.py \
 && pip install --upgrade pip setuptools wheel \
 && pip install -e . \
 && rm -rf app

COPY app ./app
COPY alembic ./alembic
COPY alembic.ini ./
# Same dependencies as above (already satisfied): this refreshes the editable hook for the real tree.
RUN pip install --no-deps -e . \
 && python -m compileall -q app alembic \
 && carnet --help >/dev/null

# ---- runtime --------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="carnet" \
      org.opencontainers.image.description="Headless customer-data service: the customer file as an API"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8000 \
    DATA_DIR=/var/lib/carnet

# A fixed uid/gid so volumes can be prepared on the host; no login shell, no home to write to.
RUN groupadd --system --gid 10001 carnet \
 && useradd --system --uid 10001 --gid carnet --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin carnet \
 && mkdir -p /var/lib/carnet \
 && chown carnet:carnet /var/lib/carnet

COPY --from=builder /opt/venv /opt/venv
# Source, alembic.ini and alembic/ together, owned by root and read-only for the service user.
COPY --from=builder /srv/carnet /srv/carnet
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/carnet-entrypoint

# DATA_DIR holds the "bootstrap admin token already printed" marker (`carnet serve` prints an admin
# token to stderr once per data dir); keep it on a volume so restarts do not print a new one.
VOLUME ["/var/lib/carnet"]
WORKDIR /srv/carnet
USER carnet:carnet

EXPOSE 8000

# /healthz is "the process answers"; readiness (database + schema) is /readyz, for orchestrators.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]

ENTRYPOINT ["carnet-entrypoint"]
CMD ["api"]
