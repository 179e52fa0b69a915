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
# embedded PostgreSQL. Set PUBLIC_BASE_URL to the address people and emailing tools reach Carnet at.
#
# Carnet is installed from its wheel, as on any server: the wheel carries the migrations (app/migration_scripts),
# so the image holds no source tree and no editable install. bin/check-wheel (run by CI) does the same steps
# outside a container: build, install into a fresh virtualenv, migrate and serve from an empty directory.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- wheel: built from the sources, which stay in this stage ----------------------------------------
FROM ${PYTHON_IMAGE} AS wheel

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY alembic ./alembic
RUN pip wheel --no-deps --wheel-dir /dist .

# ---- venv: dependencies first (a layer reused while only Carnet's code changes), then the wheel -------
FROM ${PYTHON_IMAGE} AS venv

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install --upgrade pip \
 && pip install -r /tmp/requirements.txt \
 && (pip uninstall --yes setuptools || true)
COPY --from=wheel /dist /tmp/dist
RUN pip install --no-deps /tmp/dist/carnet-*.whl \
 && rm -rf /tmp/dist /tmp/requirements.txt /tmp/pyproject.toml \
 && cd / && carnet --help >/dev/null \
 && python -c "import app.migrations as m; assert str(m.script_location()).startswith('/opt/venv/')"

# ---- runtime ----------------------------------------------------------------------------------------
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

# The virtualenv alone (Carnet and its dependencies), owned by root and read-only for the service user.
COPY --from=venv /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/carnet-entrypoint

# Nothing to keep on disk: the bootstrap admin token is printed once per database (the database remembers it).
WORKDIR /var/lib/carnet
USER carnet:carnet

EXPOSE 8000

# /healthz is "the process answers"; readiness (database + schema, workers seen) is /readyz, for orchestrators.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]

ENTRYPOINT ["carnet-entrypoint"]
CMD ["api"]
