"""app.fastpath answers `GET /v1/contacts/{id}` exactly as FastAPI's route does.

Every request is sent twice: to the app as configured (the fast path on) and to the same app built with
FAST_READ_PATH=false (FastAPI's router and dependency injection). Status, headers (in order, X-Request-ID
pinned) and bodies must be equal, and a recorder checks which path answered and the route RequestContext saw.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import get_read_sessionmaker, get_sessionmaker, make_engine, make_sessionmaker, plain_dsn
from app.fastpath import ContactReadFastPath, contact_read_route
from app.main import create_app
from app.security import Role, Scope
from app.security.ratelimit import TokenBuckets
from app.security.tokens import issue_access_token
from app.settings import Settings
from tests.auth import TEST_SECRET, bearer
from tests.factories import ADMIN, make_contact

REQUEST_ID = {"X-Request-ID": "fastpath-identity"}


@pytest.fixture(scope="module")
def slow_app(settings: Settings) -> FastAPI:
    return create_app(settings.model_copy(update={"fast_read_path": False}))


@dataclass
class Side:
    """One app behind a client, and what each request's scope held once answered."""

    app: FastAPI
    http: httpx.AsyncClient = field(init=False)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        async def recorder(scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)
            route = scope.get("route")
            # "router" is set by Starlette's router (FastAPI answered), "route" alone by the fast path.
            by = "fastapi" if "router" in scope else "fastpath" if route is not None else "neither"
            self.seen.append({"by": by, "route": (getattr(route, "path", None), getattr(route, "name", None))})

        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=recorder), base_url="http://test")


@dataclass
class Pair:
    fast: Side
    slow: Side

    async def same(self, method: str, path: str, headers: dict[str, str] | None = None,
                   *, by: str = "fastpath") -> httpx.Response:
        """Send to both; assert the same answer; `by`: who must answer on the fast side (fastpath, fastapi, neither)."""
        sent = {**REQUEST_ID, **(headers or {})}
        a = await self.fast.http.request(method, path, headers=sent)
        b = await self.slow.http.request(method, path, headers=sent)
        assert (a.status_code, a.headers.raw, a.content) == (b.status_code, b.headers.raw, b.content), path
        assert self.fast.seen[-1]["by"] == by
        assert self.slow.seen[-1]["by"] == ("neither" if by == "neither" else "fastapi")
        assert self.fast.seen[-1]["route"] == self.slow.seen[-1]["route"]  # metrics and logs label it alike
        return a


def _point(app: FastAPI, makers: async_sessionmaker[AsyncSession]) -> None:
    app.dependency_overrides[get_sessionmaker] = lambda: makers
    app.dependency_overrides[get_read_sessionmaker] = lambda: makers
    app.state.sessionmaker = makers


@pytest_asyncio.fixture(loop_scope="session")
async def pair(client: httpx.AsyncClient, app: FastAPI, slow_app: FastAPI,
               sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[Pair]:
    """Both apps on the test's transaction (the `client` fixture points the fast one)."""
    _point(slow_app, sessions)
    pair = Pair(Side(app), Side(slow_app))
    yield pair
    slow_app.dependency_overrides.clear()
    await pair.fast.http.aclose()
    await pair.slow.http.aclose()


def test_the_setting_mounts_or_removes_the_fast_path(app: FastAPI, slow_app: FastAPI) -> None:
    assert any(m.cls is ContactReadFastPath for m in app.user_middleware)
    assert not any(m.cls is ContactReadFastPath for m in slow_app.user_middleware)


async def test_a_read_and_a_masked_read(client: httpx.AsyncClient, pair: Pair) -> None:
    contact = await make_contact(client, phone="+33612345678", first_name="Zoé", last_name="Martin",
                                 address={"line1": "1 rue de la Paix", "city": "Lyon"}, tags=["vip"],
                                 external_id=f"ext-{uuid.uuid4().hex[:8]}")
    path = f"/v1/contacts/{contact['id']}"
    full = await pair.same("GET", path, ADMIN)
    assert full.status_code == 200 and full.headers["etag"] == '"v1"' and full.json()["first_name"] == "Zoé"
    assert full.headers["content-type"] == "application/json"
    masked = await pair.same("GET", path, bearer(Role.VIEWER))
    assert masked.status_code == 200 and masked.json()["email"].startswith(contact["email"][0] + "***@")
    await pair.same("GET", path + "?unused=1", ADMIN)  # FastAPI ignores unknown query parameters: so does it
    await pair.same("GET", path.upper().replace("/V1/CONTACTS/", "/v1/contacts/"), ADMIN)  # upper-case hex
    patched = await client.patch(path, json={"company": "Acme"}, headers=ADMIN)
    assert patched.status_code == 200
    assert (await pair.same("GET", path, ADMIN)).headers["etag"] == '"v2"'


async def test_unknown_id(pair: Pair) -> None:
    unknown = uuid.uuid4()
    response = await pair.same("GET", f"/v1/contacts/{unknown}", ADMIN)
    assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"
    assert response.json()["instance"] == f"/v1/contacts/{unknown}"
    await pair.same("GET", f"/v1/contacts/{str(unknown).upper()}", ADMIN)  # instance keeps the caller's spelling


def _token(role: Role = Role.ADMIN, *, ttl_seconds: int = 3600, scopes: set[Scope] | None = None) -> dict[str, str]:
    issued = issue_access_token(TEST_SECRET, subject="s@shop.example", role=role, ttl_seconds=ttl_seconds,
                                scopes=frozenset(scopes) if scopes is not None else None)
    return {"Authorization": f"Bearer {issued.token}"}


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer not-a-jwt"},
    {"Authorization": "Bearer a.b.c"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "bearer " + "x" * 5000},
    {"Authorization": bearer()["Authorization"].replace("Bearer ", "Token ")},
    {"Authorization": bearer()["Authorization"][:-2]},  # signature tampered
    _token(ttl_seconds=-3600),                           # expired
], ids=["none", "empty", "scheme-only", "scheme-space", "garbage", "three-parts", "basic", "huge", "other-scheme",
        "bad-signature", "expired"])
async def test_refused_tokens(pair: Pair, headers: dict[str, str]) -> None:
    response = await pair.same("GET", f"/v1/contacts/{uuid.uuid4()}", headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_lowercase_scheme_is_accepted_by_both(pair: Pair) -> None:
    lower = {"Authorization": bearer()["Authorization"].replace("Bearer ", "bearer ")}
    assert (await pair.same("GET", f"/v1/contacts/{uuid.uuid4()}", lower)).status_code == 404


async def test_missing_scope(pair: Pair) -> None:
    response = await pair.same("GET", f"/v1/contacts/{uuid.uuid4()}", _token(Role.EDITOR, scopes={Scope.PII_READ}))
    assert response.status_code == 403 and response.json()["missing_scopes"] == ["contacts:read"]


async def test_revoked_token_in_the_database_and_in_memory(client: httpx.AsyncClient, pair: Pair) -> None:
    path = f"/v1/contacts/{uuid.uuid4()}"
    issued = (await client.post("/v1/tokens", json={"subject": "intern@shop.example", "role": "viewer"},
                                headers=ADMIN)).json()
    token = {"Authorization": f"Bearer {issued['token']}"}
    assert (await pair.same("GET", path, token)).status_code == 404
    assert (await client.delete(f"/v1/tokens/{issued['jti']}", headers=ADMIN)).status_code == 200
    # No lifespan here: the revocation listeners are not running, so both ask the database (the fallback).
    refused = await pair.same("GET", path, token)
    assert refused.status_code == 401 and refused.json()["detail"] == "token revoked"
    other = _token(Role.VIEWER)
    jti = (await client.get("/v1/me", headers=other)).json()["token_id"]
    for side in (pair.fast, pair.slow):
        side.app.state.revocations.add(jti)  # what the listener does on NOTIFY
    assert (await pair.same("GET", path, other)).json()["detail"] == "token revoked"


async def test_rate_limited_token(pair: Pair) -> None:
    path = f"/v1/contacts/{uuid.uuid4()}"
    token = _token()
    saved = pair.fast.app.state.rate_limiter, pair.slow.app.state.rate_limiter
    try:
        for side in (pair.fast, pair.slow):
            side.app.state.rate_limiter = TokenBuckets(rate=0.01, burst=2)
        statuses = [(await pair.same("GET", path, token)).status_code for _ in range(3)]
        assert statuses == [404, 404, 429]
        limited = await pair.same("GET", path, token)
        assert limited.headers["retry-after"] == "100" and limited.headers["content-type"] == "application/problem+json"
    finally:
        pair.fast.app.state.rate_limiter, pair.slow.app.state.rate_limiter = saved


@pytest.mark.parametrize("suffix", [
    "not-a-uuid",
    "12345678123456781234567812345678",        # another spelling pydantic reads: FastAPI's to answer
    "{12345678-1234-5678-1234-567812345678}",
    "12345678-1234-5678-1234-56781234567",    # one digit short
    "12345678-1234-5678-1234-567812345678/",  # trailing slash
    "12345678-1234-5678-1234-567812345678/x",
    " 12345678-1234-5678-1234-567812345678",
    "duplicates",
])
async def test_other_paths_fall_through_to_fastapi(pair: Pair, suffix: str) -> None:
    for headers in (ADMIN, {}):
        await pair.same("GET", "/v1/contacts/" + suffix, headers, by="fastapi")


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_other_methods_fall_through_to_fastapi(pair: Pair, method: str) -> None:
    await pair.same(method, f"/v1/contacts/{uuid.uuid4()}", ADMIN, by="fastapi")


async def test_other_routes_are_untouched(pair: Pair) -> None:
    await pair.same("GET", "/v1/contacts?limit=1", ADMIN, by="fastapi")
    await pair.same("GET", f"/v1/contacts/{uuid.uuid4()}/history", ADMIN, by="fastapi")


async def test_an_oversized_body_is_refused_first(pair: Pair) -> None:
    """BodySizeLimit sits outside the fast path: a GET declaring a huge body is a 413 either way."""
    await pair.same("GET", f"/v1/contacts/{uuid.uuid4()}", {**ADMIN, "Content-Length": str(10**9)}, by="neither")


# ---- the production pool (not the test transaction): reads and a dead connection ------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def pooled_pair(committing_client: httpx.AsyncClient, app: FastAPI, slow_app: FastAPI,
                      database_url: str) -> AsyncIterator[tuple[Pair, str]]:
    """Both apps on their own engine with a pool of ONE connection, so that killing it is what the next read meets.

    Their revocation listeners run, as in production: else each request would also take a connection to ask the
    database (the listener-down fallback), two per request, more than this pool holds.
    """
    contact = await make_contact(committing_client, first_name="Élodie")  # committed: both engines see it
    engines = [make_engine(database_url, pool_size=1) for _ in range(2)]
    for side_app, engine in zip((app, slow_app), engines, strict=True):
        _point(side_app, make_sessionmaker(engine))
        side_app.state.revocations.start(plain_dsn(database_url))
    pair = Pair(Side(app), Side(slow_app))
    try:
        for _ in range(100):
            if all(a.state.revocations.is_revoked("-") is not None for a in (app, slow_app)):
                break
            await asyncio.sleep(0.05)
        yield pair, contact["id"]
    finally:
        for side_app in (app, slow_app):
            await side_app.state.revocations.stop()
        await pair.fast.http.aclose()
        await pair.slow.http.aclose()
        slow_app.dependency_overrides.clear()
        for engine in engines:
            await engine.dispose()


async def _kill_pooled_connection(app: FastAPI, database_url: str) -> None:
    bind = app.state.sessionmaker.kw["bind"]
    async with bind.connect() as connection:  # the pool's only connection
        pid = await connection.scalar(text("SELECT pg_backend_pid()"))
    admin = await asyncpg.connect(plain_dsn(database_url))
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


@pytest.mark.committing
async def test_pooled_reads_and_a_dead_connection_is_503_then_recovers(
    pooled_pair: tuple[Pair, str], database_url: str
) -> None:
    pair, contact_id = pooled_pair
    path = f"/v1/contacts/{contact_id}"
    assert (await pair.same("GET", path, ADMIN)).json()["first_name"] == "Élodie"
    await pair.same("GET", path, bearer(Role.VIEWER))
    for side in (pair.fast, pair.slow):
        await _kill_pooled_connection(side.app, database_url)
    down = await pair.same("GET", path, ADMIN)
    assert down.status_code == 503 and down.headers["retry-after"] == "2"
    assert down.headers["content-type"] == "application/problem+json"
    assert (await pair.same("GET", path, ADMIN)).status_code == 200  # the dead connection was dropped: recovered


def test_refuses_to_mount_on_a_route_of_another_shape() -> None:
    other = FastAPI()

    @other.get("/v1/contacts/{contact_id}")
    async def get_contact(contact_id: uuid.UUID) -> None:
        return None

    with pytest.raises(RuntimeError, match="changed shape"):
        contact_read_route(other)
    with pytest.raises(RuntimeError, match="no GET"):
        contact_read_route(FastAPI())
