"""The published contract states what the server enforces: Schemathesis' `positive_data_acceptance` check.

Every operation of openapi/openapi.json gets CONTRACT_EXAMPLES requests that the document allows (positive
generation, fixed seed, operations in the document's order), sent in-process to the app with an admin token,
against a committed PostgreSQL database of its own. A request the document allows but the server refuses (400,
412, 413, 415, 422, ...: anything but 2xx, 3xx, 401, 403, 404, 409, 429) counts its operation as failing. The
operations that still fail, and why no JSON Schema can say it, are listed in docs/api.md ("What the contract
cannot say"); this test keeps their number at most MAX_FAILING.

    bin/contract-check                        # the report: count and, per failing operation, one refused request
    CONTRACT_SEED=7 bin/contract-check        # another seed
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.python import asgi
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from app.settings import Settings
from tests.auth import bearer
from tests.conftest import migrated_database

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "10"))  # per operation
SEED = int(os.environ.get("CONTRACT_SEED", "16"))
MAX_FAILING = 19  # each explained in docs/api.md; issue 16 asks for 10: not reachable honestly (see there)
REPORT = os.environ.get("CONTRACT_REPORT")  # a path: bin/contract-check writes the failing operations there


@pytest.fixture(scope="module")
def contract_app(server_url: str, worker_id: str, settings: Settings) -> Iterator[FastAPI]:
    """A committed database of its own, migrated to head; the app's lifespan builds its engine there."""
    with migrated_database(server_url, f"carnet_contract_{worker_id}_{os.getpid()}") as url:
        yield create_app(settings.model_copy(update={
            "database_url": url, "rate_limit_per_second": 1e9, "rate_limit_burst": 10**9,
            "lifecycle_refresh_seconds": 0,
        }))
        asgi.shutdown_lifespans()


def _refusal(response: object) -> str:
    """The status and what the problem body names (field and message), short enough for a report line."""
    status = getattr(response, "status_code", "?")
    try:
        body = json.loads(getattr(response, "content", b"") or b"null")
    except ValueError:
        return f"{status}"
    if isinstance(body, dict):
        errors = body.get("errors") or []
        first = errors[0] if errors and isinstance(errors[0], dict) else None
        said = f"{first.get('field')}: {first.get('message')}" if first else body.get("detail") or body.get("title")
        return f"{status} {str(said)[:160]}"
    return f"{status}"


def measure(app: FastAPI) -> tuple[int, dict[str, list[str]]]:
    """Send every operation its positive examples; the number of operations and, per failing one, its refusals."""
    schema = schemathesis.openapi.from_path(SCHEMA_PATH)
    schema.app = app
    failing: dict[str, list[str]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        # An admin token where the contract asks for one; public and inbound routes get what was generated (the
        # Brevo receiver reads its own secret from Authorization). One subject per operation: Idempotency-Keys are
        # per subject, so a key generated for one operation is not "reused" by the next one (within an operation,
        # a key generated twice for two bodies is refused, and counts).
        token = bearer(subject=f"contract: {operation.label}")
        refusals = _refusals(operation, token if operation.definition.raw.get("security") else None)
        if refusals:
            failing[operation.label] = refusals
    return len(operations), failing


def _refusals(operation: APIOperation, headers: dict[str, str] | None) -> list[str]:
    """The distinct refusals among the operation's positive examples (every example runs; nothing shrinks)."""
    refusals: list[str] = []

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def run(case: schemathesis.Case) -> None:
        response = case.call(headers=headers)
        try:
            case.validate_response(response, checks=[positive_data_acceptance], headers=headers)
        except (Failure, FailureGroup):
            if (refusal := _refusal(response)) not in refusals:
                refusals.append(refusal)

    run()
    return refusals


def test_positive_data_acceptance(contract_app: FastAPI, record_property: pytest.RecordProperty) -> None:
    total, failing = measure(contract_app)
    record_property("contract_failing_operations", len(failing))
    lines = [f"positive_data_acceptance: {len(failing)} of {total} operations refuse data the contract allows "
             f"(seed {SEED}, {EXAMPLES} examples an operation)"]
    for label, refusals in sorted(failing.items()):
        lines += [f"  {label}: {refusals[0]}", *(f"    also {refusal}" for refusal in refusals[1:])]
    if REPORT:
        Path(REPORT).write_text("\n".join(lines) + "\n")
    assert len(failing) <= MAX_FAILING, "\n".join(lines)
