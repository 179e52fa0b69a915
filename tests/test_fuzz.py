"""Schemathesis against openapi/openapi.json, in-process: valid and malformed requests on every operation.

Every response must be a documented status code with its documented content type and schema, and never a 5xx.
The default run is bounded (FUZZ_EXAMPLES per operation and mode, see README); raise it for a longer run.
The app runs against its own committed database (dropped afterwards), so its writes never reach other tests.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from app.main import create_app
from app.migrations import upgrade
from app.settings import Settings
from tests.auth import bearer
from tests.conftest import _recreate, _with_database

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "55"))  # per operation and generation mode
MIN_TOTAL_REQUESTS = 5000
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]

SCHEMA = schemathesis.openapi.from_path(SCHEMA_PATH)
OPERATIONS = [(op.path, op.method.upper()) for op in (r.ok() for r in SCHEMA.get_all_operations())]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]

# Visible budget: the planned request count (each example is one request; fewer only when an operation's
# input space is exhausted, e.g. GET /healthz). The per-test counts are reported as `fuzz_requests`.
assert EXAMPLES * len(OPERATIONS) * len(MODES) >= MIN_TOTAL_REQUESTS, "raise FUZZ_EXAMPLES"


@pytest.fixture(scope="module")
def fuzz_app(server_url: str, worker_id: str, settings: Settings) -> Iterator[FastAPI]:
    """A committed database of its own, migrated to head; the app's lifespan builds its engine there."""
    name = f"carnet_fuzz_{worker_id}_{os.getpid()}"  # concurrent runs on one server never collide
    asyncio.run(_recreate(server_url, name))
    url = _with_database(server_url, name)
    upgrade(url)
    app = create_app(settings.model_copy(update={
        "database_url": url, "rate_limit_per_second": 1e9, "rate_limit_burst": 10**9, "lifecycle_refresh_seconds": 0,
    }))
    SCHEMA.app = app
    yield app
    asgi.shutdown_lifespans()
    asyncio.run(_drop(server_url, name))


async def _drop(server_url: str, name: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    dsn = make_url(server_url).set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn.split("?")[0], timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_fuzz(fuzz_app: FastAPI, path: str, method: str, mode: GenerationMode,
              record_property: pytest.RecordProperty) -> None:
    operation = SCHEMA[path][method]
    headers = bearer()
    sent = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        nonlocal sent
        sent += 1
        case.call_and_validate(app=fuzz_app, headers=headers, checks=CHECKS)

    try:
        run()
    except Unsatisfiable:
        if sent or mode is not GenerationMode.NEGATIVE:
            raise
        # No parameters, or only an unconstrained string: nothing can violate the schema.
        pytest.skip("no malformed input exists for this operation")
    record_property("fuzz_requests", sent)
