"""Schemathesis against openapi/openapi.json, in-process: valid and malformed requests on every operation.

Two runs per operation, both checked with every Schemathesis check but `positive_data_acceptance` (CHECKS):
- `test_coverage`: the coverage phase, deterministic: each parameter and property at its boundaries and just past
  them, each required one missing, wrong types, every method the path does not declare, `OPTIONS`.
- `test_fuzz`: Hypothesis-generated valid (positive) and malformed (negative) requests, FUZZ_EXAMPLES per operation
  and mode (see README); derandomized unless FUZZ_EXAMPLES is set.
Every response must be a documented status code with its documented content type, headers and schema, never a 5xx;
malformed input is refused (4xx); an undeclared method is a 405 with `Allow`, which matches the document; a missing
token is a 401 and a success never comes without a valid one. The app runs against its own committed database
(dropped afterwards), so its writes never reach other tests.
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
    CheckContext,
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation
from schemathesis.core.transport import Response
from schemathesis.python import asgi

from app.main import create_app
from app.migrations import upgrade
from app.settings import Settings
from tests.auth import bearer
from tests.conftest import _recreate, _with_database

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))  # per operation and generation mode
MIN_TOTAL_REQUESTS = 5000  # both tests together (the coverage phase sends ~4,500)
AUTH_ENFORCED: set[str] = set()  # operations whose auth ignored_auth confirmed (per process)


@schemathesis.check
def ignored_auth_once(ctx: CheckContext, response: Response, case: schemathesis.Case) -> bool | None:
    """ignored_auth, confirmed once per operation as `schemathesis run` does: each probe is two more requests."""
    ctx.auth_enforced_operations = AUTH_ENFORCED
    return ignored_auth(ctx, response, case)  # type: ignore[no-any-return]


# All but positive_data_acceptance (a valid request may still be refused: an unknown id, a stale version, a state).
# use_after_free and ensure_resource_availability need the stateful phase's request chains: not run here.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, unsupported_method, missing_required_header,
          allow_header_conformance, ignored_auth_once]

SCHEMA = schemathesis.openapi.from_path(SCHEMA_PATH)
OPERATIONS = [(op.path, op.method.upper()) for op in (r.ok() for r in SCHEMA.get_all_operations())]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
# The same document, coverage phase only (its cases are fixed: no example count applies).
COVERAGE = schemathesis.openapi.from_path(SCHEMA_PATH, config=SchemathesisConfig.from_dict({"phases": {
    "examples": {"enabled": False}, "fuzzing": {"enabled": False}, "stateful": {"enabled": False},
    "coverage": {"enabled": True}}}))

# Visible budget: each test reports the requests it sent as `fuzz_requests`; when the whole module ran,
# tests/conftest.py fails the run below MIN_TOTAL_REQUESTS (ignored_auth's probes are not counted).
FUZZ_TESTS = len(OPERATIONS) * (len(MODES) + 1)  # test_fuzz per mode, test_coverage


def _credentials(case: schemathesis.Case) -> dict[str, str]:
    """An admin token, unless the case leaves Authorization out on purpose (negative headers): a 401 is then due."""
    sent = {name.lower() for name in case.headers or {}}
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER) and "authorization" not in sent:
        return {}
    return bearer()


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
    SCHEMA.app = COVERAGE.app = app
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
    sent = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        nonlocal sent
        sent += 1
        case.call_and_validate(app=fuzz_app, headers=_credentials(case), checks=CHECKS)

    try:
        run()
    except Unsatisfiable:
        if sent or mode is not GenerationMode.NEGATIVE:
            raise
        # No parameters, or only an unconstrained string: nothing can violate the schema.
        pytest.skip("no malformed input exists for this operation")
    record_property("fuzz_requests", sent)


@COVERAGE.parametrize()
@settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_coverage(fuzz_app: FastAPI, case: schemathesis.Case, record_property: pytest.RecordProperty) -> None:
    record_property("fuzz_requests", 1)
    case.operation.schema.app = fuzz_app  # parametrize works on a copy of COVERAGE; ignored_auth's probes use its app
    case.call_and_validate(app=fuzz_app, headers=_credentials(case), checks=CHECKS)
