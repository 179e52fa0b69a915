"""The "floor" for bench_api.py: the least a FastAPI + asyncpg service can do for the same two calls.

No auth, no middleware, no ORM, no validation beyond a plain pydantic body model, no history:
one SQL statement per request on a raw asyncpg pool sized like Carnet's (10 + 10 overflow).
The row goes out as JSON through pydantic-core, the serializer Carnet uses too.

Run by bench_api.py as `uvicorn floor_app:app --app-dir bench`, with FLOOR_DATABASE_URL set.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
from fastapi import FastAPI, Response
from pydantic import BaseModel
from pydantic_core import to_json

SELECT_SQL = "SELECT * FROM contact WHERE id = $1"

# Every NOT NULL column without a server default is given; the rest take their server defaults.
UPSERT_SQL = """
INSERT INTO contact (id, external_id, email, phone, first_name, last_name,
                     email_status, kind, lifecycle_stage, source, created_at, updated_at, version)
VALUES ($1, $2, $3, $4, $5, $6, 'unverified', 'prospect', 'prospect', 'api', $7, $7, 1)
ON CONFLICT (external_id) WHERE external_id IS NOT NULL DO UPDATE SET
    email = EXCLUDED.email,
    phone = EXCLUDED.phone,
    first_name = EXCLUDED.first_name,
    last_name = EXCLUDED.last_name,
    updated_at = EXCLUDED.updated_at,
    version = contact.version + 1
RETURNING *, (xmax = 0) AS inserted
"""


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return to_json(content)


class UpsertBody(BaseModel):
    external_id: str
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    phone: str | None = None


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(os.environ["FLOOR_DATABASE_URL"], min_size=10, max_size=20, init=_init)
    try:
        yield
    finally:
        await app.state.pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/floor/contacts/{contact_id}")
async def get_contact(contact_id: uuid.UUID) -> Response:
    row = await app.state.pool.fetchrow(SELECT_SQL, contact_id)
    if row is None:
        return JSONBody({"detail": "not found"}, status_code=404)
    return JSONBody(dict(row))


@app.post("/floor/contacts/upsert")
async def upsert_contact(body: UpsertBody) -> Response:
    row = await app.state.pool.fetchrow(
        UPSERT_SQL, uuid.uuid4(), body.external_id, body.email, body.phone, body.first_name, body.last_name,
        datetime.now(UTC),
    )
    data = dict(row)
    created = data.pop("inserted")
    return JSONBody(data, status_code=201 if created else 200)
