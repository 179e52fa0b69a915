"""Idempotency-Key on the creates outside contacts and lists: attributes, tags, tokens (imports: test_imports.py)."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.auth import bearer
from tests.factories import ADMIN
from tests.routers.test_contacts import assert_problem


def keyed(key: str | None = None, headers: dict[str, str] = ADMIN) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key or uuid.uuid4().hex}


@pytest.mark.parametrize(("path", "body", "other"), [
    ("/v1/attributes", {"name": "shoe_size", "type": "number", "description": "EU"},
     {"name": "shoe_size", "type": "text"}),
    ("/v1/tags", {"name": "salon-2026", "description": "Met at the fair"}, {"name": "salon-2027"}),
])
class TestCatalogueCreates:
    async def test_a_repeat_replays_the_first_201(self, client: httpx.AsyncClient, path: str, body: dict,
                                                  other: dict) -> None:
        headers = keyed()
        first = await client.post(path, json=body, headers=headers)
        assert first.status_code == 201, first.text
        again = await client.post(path, json=dict(reversed(body.items())), headers=headers)  # key order is moot
        assert again.status_code == 201, again.text  # not 409 duplicate-...
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers

    async def test_same_key_other_body_is_422_and_no_key_is_still_409(
        self, client: httpx.AsyncClient, path: str, body: dict, other: dict
    ) -> None:
        headers = keyed()
        assert (await client.post(path, json=body, headers=headers)).status_code == 201
        assert_problem(await client.post(path, json=other, headers=headers), 422, "Idempotency-Key")
        assert_problem(await client.post(path, json=body, headers=ADMIN), 409)
        assert_problem(await client.post(path, json=body, headers=keyed()), 409)  # a new key is a new request

    async def test_a_failed_first_attempt_leaves_the_key_free(self, client: httpx.AsyncClient, path: str,
                                                              body: dict, other: dict) -> None:
        assert (await client.post(path, json=body, headers=ADMIN)).status_code == 201
        headers = keyed()
        assert_problem(await client.post(path, json=body, headers=headers), 409)  # nothing stored
        assert (await client.post(path, json={**body, "name": body["name"] + "_b"}, headers=headers)).status_code == 201


class TestTokenIssuance:
    """A repeat never mints a second token, and the first token is never stored to be replayed."""

    async def test_a_repeat_is_409_naming_the_first_token_and_mints_nothing(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        headers = keyed("mint-1")
        # a subject no other test mints for: the count below reads the shared, committed token table
        body = {"subject": "mint-once@shop.example", "role": "viewer", "ttl_seconds": 3600}
        first = await client.post("/v1/tokens", json=body, headers=headers)
        assert first.status_code == 201, first.text
        issued = first.json()
        again = await client.post("/v1/tokens", json=body, headers=headers)
        problem = assert_problem(again, 409)
        assert problem["type"].endswith("/token-already-issued")
        assert problem["jti"] == issued["jti"] and issued["jti"] in problem["detail"]
        assert issued["token"] not in again.text
        async with sessions() as session:
            minted = await session.scalar(
                text("SELECT count(*) FROM access_token WHERE subject = 'mint-once@shop.example'"))
            stored = (await session.execute(text(
                "SELECT status_code, response_body::text AS body, response_headers::text AS headers "
                "FROM idempotency_record WHERE key = 'mint-1'"))).mappings().one()
        assert minted == 1
        assert stored["status_code"] == 201 and issued["jti"] in stored["body"]
        assert issued["token"] not in stored["body"] and issued["token"] not in stored["headers"]
        me = await client.get("/v1/me", headers={"Authorization": f"Bearer {issued['token']}"})
        assert me.status_code == 200 and me.json()["subject"] == "mint-once@shop.example"

    async def test_same_key_other_body_is_422(self, client: httpx.AsyncClient) -> None:
        headers = keyed()
        first = await client.post("/v1/tokens", json={"subject": "a", "role": "viewer"}, headers=headers)
        assert first.status_code == 201
        assert_problem(await client.post("/v1/tokens", json={"subject": "b", "role": "viewer"}, headers=headers), 422,
                       "Idempotency-Key")

    async def test_keys_belong_to_the_caller(self, client: httpx.AsyncClient) -> None:
        body = {"subject": "s", "role": "viewer"}
        for owner in ("one@shop.example", "two@shop.example"):
            response = await client.post("/v1/tokens", json=body, headers=keyed("shared", bearer(subject=owner)))
            assert response.status_code == 201, response.text

    async def test_without_a_key_each_request_mints(self, client: httpx.AsyncClient) -> None:
        body = {"subject": "s", "role": "viewer"}
        jtis = {(await client.post("/v1/tokens", json=body, headers=ADMIN)).json()["jti"] for _ in range(2)}
        assert len(jtis) == 2
