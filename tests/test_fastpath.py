"""app.fastpath answers `GET /v1/contacts/{id}` and `POST /v1/contacts/upsert` exactly as FastAPI's routes do.

Every request is sent twice: to the app as configured (the fast paths on) and to the same app built with
FAST_READ_PATH=false and FAST_UPSERT_PATH=false (FastAPI's router and dependency injection). Status, headers (in
order, X-Request-ID pinned) and bodies must be equal, and a recorder checks which path answered and the route
RequestContext saw. Upserts are also sent a third time with the autocommit statements switched off (the
transactional `contacts.upsert`), each of the three from the same database state, ids and clock: the rows written
(contacts, history, outbox) must be equal too.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from app.costly_gate import CostlyReadGate
from app.db import get_read_sessionmaker, get_sessionmaker, make_engine, make_sessionmaker, plain_dsn
from app.fastpath import ContactReadFastPath, ContactUpsertFastPath, contact_read_route, contact_upsert_route
from app.main import create_app
from app.security import Role, Scope
from app.security.ratelimit import TokenBuckets
from app.security.tokens import issue_access_token
from app.services import contacts as contacts_service
from app.services import history as history_service
from app.services import outbox as outbox_service
from app.services import tags as tags_service
from app.settings import Settings
from tests.auth import TEST_SECRET, bearer
from tests.factories import ADMIN, make_attribute, make_contact

REQUEST_ID = {"X-Request-ID": "fastpath-identity"}


@pytest.fixture(scope="module")
def slow_app(settings: Settings) -> FastAPI:
    return create_app(settings.model_copy(update={"fast_read_path": False, "fast_upsert_path": False,
                                                  "costly_read_gate": False}))


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
                   *, by: str = "fastpath", **body: Any) -> httpx.Response:
        """Send to both; assert the same answer; `by`: who must answer on the fast side (fastpath, fastapi, neither)."""
        a = await self.fast.http.request(method, path, headers={**REQUEST_ID, **(headers or {})}, **body)
        b = await self.slow.http.request(method, path, headers={**REQUEST_ID, **(headers or {})}, **body)
        assert_same(a, b)
        assert self.fast.seen[-1]["by"] == by
        assert self.slow.seen[-1]["by"] == ("neither" if by == "neither" else "fastapi")
        assert self.fast.seen[-1]["route"] == self.slow.seen[-1]["route"]  # metrics and logs label it alike
        return a


def assert_same(a: httpx.Response, b: httpx.Response) -> None:
    assert (a.status_code, a.headers.raw, a.content) == (b.status_code, b.headers.raw, b.content), a.request.url


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


def test_the_settings_mount_or_remove_the_fast_paths(app: FastAPI, slow_app: FastAPI) -> None:
    for layer in (ContactReadFastPath, ContactUpsertFastPath, CostlyReadGate):
        assert any(m.cls is layer for m in app.user_middleware)
        assert not any(m.cls is layer for m in slow_app.user_middleware)


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
        # /v1/contacts/duplicates is a costly read: its 401 (the same) comes from app.costly_gate, ahead of FastAPI
        by = "fastpath" if suffix == "duplicates" and not headers else "fastapi"
        await pair.same("GET", "/v1/contacts/" + suffix, headers, by=by)


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
async def test_other_methods_fall_through_to_fastapi(pair: Pair, method: str) -> None:
    await pair.same(method, f"/v1/contacts/{uuid.uuid4()}", ADMIN, by="fastapi")


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "OPTIONS"])
async def test_methods_the_path_does_not_serve_never_reach_either(pair: Pair, method: str) -> None:
    """app.methods answers them (405, or 204 to OPTIONS, with Allow) outside both paths."""
    answer = await pair.same(method, f"/v1/contacts/{uuid.uuid4()}", ADMIN, by="neither")
    assert answer.headers["allow"] == "GET, PATCH, DELETE, OPTIONS"


async def test_other_routes_are_untouched(pair: Pair) -> None:
    await pair.same("GET", "/v1/contacts?limit=1", ADMIN, by="fastapi")
    await pair.same("GET", f"/v1/contacts/{uuid.uuid4()}/history", ADMIN, by="fastapi")


async def test_an_oversized_body_is_refused_first(pair: Pair) -> None:
    """BodySizeLimit sits outside the fast path: a GET declaring a huge body is a 413 either way."""
    await pair.same("GET", f"/v1/contacts/{uuid.uuid4()}", {**ADMIN, "Content-Length": str(10**9)}, by="neither")


# ---- POST /v1/contacts/upsert ----------------------------------------------------------------------------------

UPSERT = "/v1/contacts/upsert"
NOW = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)
# Everything an upsert may write; identity ids are left out (sequences move on when a savepoint is rolled back).
WRITTEN = {
    "contact": "SELECT * FROM contact ORDER BY id",
    "history": "SELECT contact_id, field, old_value, new_value, subject, via, at FROM contact_history ORDER BY id",
    "outbox": "SELECT topic, contact_id, payload, created_at, dispatched_at FROM outbox_message ORDER BY id",
    "tags": "SELECT * FROM tag ORDER BY name",
}


@dataclass
class Replayable:
    """The contact services' clock and ids made repeatable: a write replayed from a savepoint makes the same rows."""

    issued: int = 0

    def new_id(self) -> uuid.UUID:
        self.issued += 1
        return uuid.UUID(int=0x0190_0000_0000_7000_8000_0000_0000_0000 + self.issued)


@dataclass
class Writes:
    """Each upsert sent three ways from the same state: fast path, FastAPI's route, the transactional path alone."""

    pair: Pair
    connection: AsyncConnection
    ids: Replayable
    monkeypatch: pytest.MonkeyPatch

    async def same(self, body: Any, headers: dict[str, str] | None = None, *, by: str = "fastpath",
                   **sent: Any) -> httpx.Response:
        sent = {"json": body, **sent} if body is not None else sent
        start = self.ids.issued
        fast, fast_rows = await self._rolled_back(self.pair.fast, headers, sent)
        self.ids.issued = start
        with self.monkeypatch.context() as patch:
            patch.setattr(contacts_service, "fast_upsert", _declined)
            slowest, slowest_rows = await self._rolled_back(self.pair.slow, headers, sent)
        self.ids.issued = start
        slow = await self.pair.slow.http.post(UPSERT, headers={**REQUEST_ID, **(headers or {})}, **sent)
        assert_same(fast, slow)
        assert_same(fast, slowest)
        assert fast_rows == slowest_rows == await self._written()
        assert self.pair.fast.seen[-1]["by"] == by
        assert self.pair.slow.seen[-1]["by"] == self.pair.slow.seen[-2]["by"] == "fastapi"
        assert self.pair.fast.seen[-1]["route"] == self.pair.slow.seen[-1]["route"]
        return slow

    async def _rolled_back(self, side: Side, headers: dict[str, str] | None,
                           sent: dict[str, Any]) -> tuple[httpx.Response, dict[str, list[Any]]]:
        savepoint = await self.connection.begin_nested()
        try:
            response = await side.http.post(UPSERT, headers={**REQUEST_ID, **(headers or {})}, **sent)
            return response, await self._written()
        finally:
            await savepoint.rollback()

    async def _written(self) -> dict[str, list[Any]]:
        return {name: [tuple(row) for row in await self.connection.execute(text(sql))] for name, sql in WRITTEN.items()}


async def _declined(*_args: Any, **_kwargs: Any) -> None:
    return None


@pytest_asyncio.fixture(loop_scope="session")
async def writes(pair: Pair, sessions: async_sessionmaker[AsyncSession],
                 monkeypatch: pytest.MonkeyPatch) -> Writes:
    ids = Replayable()
    monkeypatch.setattr(contacts_service, "new_id", ids.new_id)
    for module in (contacts_service, history_service, outbox_service, tags_service):
        monkeypatch.setattr(module, "utc_now", lambda: NOW)
    return Writes(pair, sessions.kw["bind"], ids, monkeypatch)


def _upsert(**fields: Any) -> dict[str, Any]:
    return {"external_id": f"shop-{uuid.uuid4().hex[:8]}", "email": f"{uuid.uuid4().hex[:10]}@example.com",
            "first_name": "Zoé", "last_name": "Martin", "phone": "06 12 34 56 78", **fields}


async def test_upsert_creates_updates_and_leaves_alone(writes: Writes) -> None:
    body = _upsert(address={"city": "Lyon", "country": "fr"}, birth_date="1990-05-01", kind="customer")
    created = await writes.same(body, ADMIN)
    assert created.status_code == 201 and created.headers["etag"] == '"v1"'
    again = await writes.same(body, ADMIN)
    assert again.status_code == 200 and again.json()["version"] == 1  # unchanged: nothing written
    renamed = await writes.same({"external_id": body["external_id"], "first_name": "Zoe", "company": "Acme"}, ADMIN)
    assert renamed.status_code == 200 and renamed.headers["etag"] == '"v2"'
    cleared = await writes.same({"external_id": body["external_id"], "phone": None, "address": None}, ADMIN)
    assert cleared.json()["phone"] is None and cleared.json()["address"]["city"] is None
    by_email = await writes.same({"email": body["email"].upper(), "language": "fr"}, ADMIN)  # normalized, matched
    assert by_email.json()["id"] == created.json()["id"] and by_email.json()["version"] == 4


async def test_upsert_adopts_an_external_id_and_refuses_another(writes: Writes) -> None:
    first = await writes.same(_upsert(external_id=None), ADMIN)
    email = first.json()["email"]
    adopted = await writes.same({"email": email, "external_id": "E-1"}, ADMIN)
    assert adopted.status_code == 200 and adopted.json()["external_id"] == "E-1"
    refused = await writes.same({"email": email, "external_id": "E-2"}, ADMIN)
    assert refused.status_code == 409 and refused.json()["existing_id"] == first.json()["id"]


async def test_upsert_taking_a_held_key_falls_back_and_is_409(writes: Writes) -> None:
    holder = (await writes.same(_upsert(), ADMIN)).json()
    other = await writes.same(_upsert(), ADMIN)
    taken = await writes.same({"external_id": other.json()["external_id"], "email": holder["email"]}, ADMIN,
                              by="fastapi")
    assert taken.status_code == 409 and taken.json()["existing_id"] == holder["id"]


async def test_upsert_timestamps_keep_their_instant_in_history(writes: Writes) -> None:
    body = _upsert(first_contact_at="2024-01-01T10:00:00+02:00")
    await writes.same(body, ADMIN)
    await writes.same({"external_id": body["external_id"], "first_contact_at": "2024-02-01T09:30:00.5"}, ADMIN)
    await writes.same({"external_id": body["external_id"], "first_contact_at": "2024-02-01T09:30:00.5Z"}, ADMIN)
    # the old value with a fraction of a second, the new one without (the update's history is written in SQL)
    await writes.same({"external_id": body["external_id"], "first_contact_at": "0999-03-01T00:00:00-01:30"}, ADMIN)
    await writes.same({"external_id": body["external_id"], "first_contact_at": None}, ADMIN)


async def test_upsert_changing_every_column_writes_the_same_history(writes: Writes) -> None:
    body = _upsert(company="Acme", job_title="CTO", sector="retail", gender="female", birth_date="1990-05-01",
                   address={"line1": "1 rue A", "line2": "bis", "postal_code": "69001", "city": "Lyon",
                            "region": "ARA", "country": "fr"}, language="fr", source="checkout",
                   first_contact_at="2024-01-01T10:00:00.000001Z", first_contact_channel="web", kind="customer")
    created = (await writes.same(body, ADMIN)).json()
    changed = _upsert(external_id=body["external_id"], first_name="Zoe", last_name="Durand", phone="0698765432",
                      company="Beta", job_title=None, sector="food", gender="male", birth_date="1991-06-02",
                      address={"line1": "2 rue B", "postal_code": "75001", "city": "Paris", "region": None,
                               "country": "be"}, language="nl", source="store", first_contact_at="2025-01-01T10:00:00Z",
                      first_contact_channel=None, kind="prospect")
    updated = await writes.same(changed, ADMIN)
    assert updated.json()["id"] == created["id"] and updated.json()["version"] == 2
    assert updated.json()["email"] == changed["email"]  # a new email for the contact matched by external_id


async def test_upsert_keeping_an_address_someone_erased_is_no_change_of_it(client: httpx.AsyncClient,
                                                                           writes: Writes) -> None:
    keeper = await make_contact(client, phone="+33612345680")
    erased = await make_contact(client, phone="+33612345680")
    assert (await client.delete(f"/v1/contacts/{erased['id']}", headers=ADMIN)).status_code == 204
    kept = await writes.same({"email": keeper["email"], "phone": "06 12 34 56 80", "first_name": "Kept"}, ADMIN)
    assert kept.status_code == 200 and kept.json()["first_name"] == "Kept"


async def test_upsert_of_an_erased_person_falls_back_and_is_409(client: httpx.AsyncClient, writes: Writes) -> None:
    erased = await make_contact(client, phone="+33612345679")
    assert (await client.delete(f"/v1/contacts/{erased['id']}", headers=ADMIN)).status_code == 204
    again = await writes.same(_upsert(email=erased["email"], phone=None), ADMIN, by="fastapi")
    assert again.status_code == 409 and again.json()["suppressed"] == ["email"]
    someone = await writes.same(_upsert(), ADMIN)
    moved = await writes.same({"external_id": someone.json()["external_id"], "phone": "06 12 34 56 79"}, ADMIN,
                              by="fastapi")
    assert moved.status_code == 409 and moved.json()["suppressed"] == ["phone"]


async def test_upsert_with_tags_or_attributes_goes_to_the_transactional_path(client: httpx.AsyncClient,
                                                                            writes: Writes) -> None:
    await make_attribute(client, "shoe_size", "number")
    tagged = await writes.same(_upsert(tags=["vip"]), ADMIN, by="fastapi")
    assert tagged.status_code == 201 and tagged.json()["tags"] == ["vip"]
    sized = await writes.same({"external_id": tagged.json()["external_id"], "attributes": {"shoe_size": 38}}, ADMIN,
                              by="fastapi")
    assert sized.json()["attributes"] == {"shoe_size": 38}


async def test_upsert_masked_for_a_writer_without_pii_read(writes: Writes) -> None:
    masked = await writes.same(_upsert(), _token(Role.EDITOR, scopes={Scope.CONTACTS_READ, Scope.CONTACTS_WRITE}))
    assert masked.status_code == 201 and masked.json()["pii_masked"] is True
    assert masked.json()["email"].endswith("@example.com") and "***" in masked.json()["email"]


async def test_upsert_a_receipt_for_a_writer_without_contacts_read(writes: Writes) -> None:
    receipt = await writes.same(_upsert(), _token(Role.EDITOR, scopes={Scope.CONTACTS_WRITE}))
    assert receipt.status_code == 201 and set(receipt.json()) == {"id", "created", "version"}


@pytest.mark.parametrize("body", [
    {"external_id": "x", "email": "not an email"},
    {"external_id": "x", "phone": "12"},
    {"first_name": "no key"},
    {"external_id": "x", "kind": None},
    {"external_id": "x", "unknown": 1},
    [],
    "text",
    None,
], ids=["email", "phone", "no-key", "null-kind", "unknown-field", "array", "string", "null"])
async def test_invalid_bodies_get_fastapis_422(writes: Writes, body: Any) -> None:
    for headers in (ADMIN, {}):  # without a token FastAPI answers 401 before looking at the body: so does it
        response = await writes.same(None, {**headers, "Content-Type": "application/json"}, by="fastapi",
                                     content=json.dumps(body).encode())
        assert response.status_code == (422 if headers else 401)


@pytest.mark.parametrize(("content", "statuses"), [
    (b"", (422, 401)),                         # no body: FastAPI's dependencies run first, then "field required"
    (b"{", (422, 422)),                        # JSON that does not parse: refused before any dependency
    (b'{"external_id": "x",}', (422, 422)),
    (b"\xff\xfe", (422, 422)),
    (b"[" * 5000, (422, 422)),                 # too deep for the parser: json_invalid, as bytes that are not JSON
], ids=["empty", "cut", "trailing-comma", "not-utf8", "deep"])
async def test_unparsable_bodies_get_fastapis_answer(writes: Writes, content: bytes, statuses: tuple[int, int]) -> None:
    for headers, status in zip((ADMIN, {}), statuses, strict=True):
        response = await writes.same(None, {**headers, "Content-Type": "application/json"}, by="fastapi",
                                     content=content)
        assert response.status_code == status


@pytest.mark.parametrize(("headers", "status"), [
    ({"Content-Type": "application/json; charset=utf-8"}, 201),
    ({"Content-Type": "application/merge-patch+json"}, 201),  # FastAPI reads any +json body as JSON
    ({"Content-Type": "text/plain"}, 415),  # a problem naming the Content-Type (app.problems)
    ({"Idempotency-Key": "k-1"}, 201),
], ids=["charset", "json-suffix", "text", "idempotency-key"])
async def test_other_requests_fall_through_to_fastapi(writes: Writes, headers: dict[str, str], status: int) -> None:
    body = json.dumps(_upsert()).encode()
    response = await writes.same(None, {**ADMIN, "Content-Type": "application/json", **headers}, by="fastapi",
                                 content=body)
    assert response.status_code == status


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer not-a-jwt"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
], ids=["none", "garbage", "basic"])
async def test_upsert_refused_tokens(writes: Writes, headers: dict[str, str]) -> None:
    response = await writes.same(_upsert(), headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_upsert_missing_scope(writes: Writes) -> None:
    response = await writes.same(_upsert(), bearer(Role.VIEWER))
    assert response.status_code == 403 and response.json()["missing_scopes"] == ["contacts:write"]


async def test_upsert_rate_limited_token_is_counted_once(writes: Writes) -> None:
    pair, token = writes.pair, _token()
    saved = pair.fast.app.state.rate_limiter, pair.slow.app.state.rate_limiter
    try:
        for side in (pair.fast, pair.slow):  # the fast side gets one request per `same`, the slow side two
            side.app.state.rate_limiter = TokenBuckets(rate=0.001, burst=2 if side is pair.fast else 4)
        first = await writes.same(_upsert(tags=["vip"]), token, by="fastapi")  # falls through: one token taken
        second = await writes.same(_upsert(), token)
        limited = await writes.same(_upsert(), token)
        assert [first.status_code, second.status_code, limited.status_code] == [201, 201, 429]
    finally:
        pair.fast.app.state.rate_limiter, pair.slow.app.state.rate_limiter = saved


async def test_an_oversized_upsert_is_413_either_way(pair: Pair) -> None:
    big = json.dumps(_upsert(company="x" * (2 * 1024 * 1024))).encode()
    declared = await pair.same("POST", UPSERT, {**ADMIN, "Content-Type": "application/json"}, by="neither",
                               content=big)
    assert declared.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: BodySizeLimit refuses while the body streams in
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    answers = [await side.http.post(UPSERT, headers={**REQUEST_ID, **ADMIN, "Content-Type": "application/json"},
                                    content=chunks()) for side in (pair.fast, pair.slow)]
    assert_same(*answers)
    assert answers[0].status_code == 413 and pair.fast.seen[-1]["by"] == "fastapi"


async def test_an_upsert_without_content_length_goes_to_fastapi(writes: Writes) -> None:
    """The fast path sits outside BodySizeLimit and MethodGate: it takes only a body framed by a Content-Length both
    let through; a streamed one goes past them to FastAPI, same answer, same rows."""
    headers = {**ADMIN, "Content-Type": "application/json"}
    created = await writes.same(None, headers, by="fastapi", content=_Streamed(json.dumps(_upsert()).encode()))
    assert created.status_code == 201


@dataclass
class _Streamed:
    """A body sent in two chunks without Content-Length, each time it is sent."""

    data: bytes

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[:10]
        yield self.data[10:]


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


@pytest.mark.committing
async def test_pooled_upsert_on_a_dead_connection_is_503_then_recovers(
    pooled_pair: tuple[Pair, str], database_url: str
) -> None:
    pair, _contact_id = pooled_pair
    for side in (pair.fast, pair.slow):
        await _kill_pooled_connection(side.app, database_url)
    down = await pair.same("POST", UPSERT, ADMIN, json=_upsert())  # nothing written: the same body twice
    assert down.status_code == 503 and down.headers["retry-after"] == "2"
    for side in (pair.fast, pair.slow):
        assert (await side.http.post(UPSERT, json=_upsert(), headers=ADMIN)).status_code == 201


def test_refuses_to_mount_on_a_route_of_another_shape() -> None:
    other = FastAPI()

    @other.get("/v1/contacts/{contact_id}")
    async def get_contact(contact_id: uuid.UUID) -> None:
        return None

    @other.post("/v1/contacts/upsert")
    async def upsert_contact(payload: dict[str, Any]) -> None:
        return None

    with pytest.raises(RuntimeError, match="changed shape"):
        contact_read_route(other)
    with pytest.raises(RuntimeError, match="changed shape"):
        contact_upsert_route(other)
    with pytest.raises(RuntimeError, match="no GET"):
        contact_read_route(FastAPI())
    with pytest.raises(RuntimeError, match="no POST"):
        contact_upsert_route(FastAPI())


@pytest.mark.parametrize("row", [
    {"email": "a@example.com", "first_name": "Zoé", "city": "Lyon", "birth_date": datetime(1990, 5, 1).date()},
    {"external_id": "E-1", "attributes": {"size": 38, "gone": None, "vip": False}, "tags": ["a", "b"], "kind": "x"},
    {"external_id": "E-2", "tags": [], "attributes": {}, "phone": None, "first_contact_at": NOW},
])
def test_a_creation_entry_names_the_fields_of_the_diff_from_nothing(row: dict[str, Any]) -> None:
    field, old, new = contacts_service._creation(row)
    assert (field, old) == ("created", None)
    assert new == {"fields": [name for name, _, _ in contacts_service._diff({}, row)]}
