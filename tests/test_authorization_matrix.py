"""Every role x every /v1 operation, generated from the OpenAPI document and the role table.

Denied → 403 naming the missing scopes and no row changed; allowed → never 401/403.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.security import ROLE_SCOPES, Role
from tests.auth import bearer
from tests.conftest import TABLES

OPEN_PREFIXES = ("/v1/public/", "/v1/inbound/")
PATH_VALUES = {"contact_id": str(uuid.uuid4()), "name": "matrix_probe", "jti": "matrix-probe",
               "list_id": str(uuid.uuid4()), "token": "matrix-probe", "external_id": "matrix-probe",
               "segment_id": str(uuid.uuid4()), "destination_id": str(uuid.uuid4()), "delivery_id": "9000000001",
               "import_id": str(uuid.uuid4()), "request_id": str(uuid.uuid4())}


def _operations(app: FastAPI) -> list[tuple[str, str, frozenset[str]]]:
    out = []
    for path, operations in app.openapi()["paths"].items():
        if not path.startswith("/v1/") or path.startswith(OPEN_PREFIXES):
            continue
        for method, operation in operations.items():
            needed = {s for requirement in operation.get("security", []) for s in requirement.get("HTTPBearer", [])}
            out.append((method.upper(), path, frozenset(needed)))
    return out


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)


async def _row_counts(sessions: async_sessionmaker[AsyncSession]) -> dict[str, Any]:
    async with sessions() as session:
        return {t: await session.scalar(text(f"SELECT count(*) FROM {t}")) for t in TABLES}  # noqa: S608


async def test_every_role_on_every_operation(
    app: FastAPI, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    operations = _operations(app)
    assert len(operations) >= 15
    unexpected: list[str] = []
    checked = 0
    for role in Role:
        headers = bearer(role, subject=f"matrix-{role.value}")
        granted = {s.value for s in ROLE_SCOPES[role]}
        for method, path, needed in operations:
            before = await _row_counts(sessions) if method != "GET" else None
            body = {} if method in {"POST", "PUT", "PATCH"} else None
            response = await client.request(method, _url(path), json=body, headers=headers)
            allowed = needed <= granted
            checked += 1
            if allowed and response.status_code in (401, 403):
                unexpected.append(f"{role} {method} {path}: denied {response.status_code}")
            if not allowed:
                if response.status_code != 403:
                    unexpected.append(f"{role} {method} {path}: expected 403, got {response.status_code}")
                elif sorted(response.json()["missing_scopes"]) != sorted(needed - granted):
                    unexpected.append(f"{role} {method} {path}: wrong missing_scopes")
                if before is not None and await _row_counts(sessions) != before:
                    unexpected.append(f"{role} {method} {path}: denied write changed rows")
    assert checked == len(operations) * len(Role)
    assert unexpected == []


@pytest.mark.parametrize("role", list(Role))
def test_role_table_matches_the_contract(role: Role) -> None:
    scopes = {s.value for s in ROLE_SCOPES[role]}
    if role is Role.VIEWER:
        assert all(s.endswith(":read") for s in scopes) and "pii:read" not in scopes and "exports:read" not in scopes
    if role is Role.EDITOR:
        assert not {"contacts:erase", "exports:read", "destinations:read", "destinations:write"} & scopes
    if role is Role.MANAGER:
        assert not {"tokens:admin", "contacts:erase", "retention:run"} & scopes
    if role is Role.INTEGRATION:
        assert {"contacts:write", "orders:write", "events:write", "consents:write", "contacts:read"} <= scopes
