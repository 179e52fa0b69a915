"""HTTP contract of /v1/contacts: status codes, problem bodies, headers, and what is stored."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import httpx
import pytest

from app.security import Role
from tests.auth import bearer
from tests.factories import ADMIN, make_attribute, make_contact, unique_email


def _documented_line(start: str) -> str:
    """The line of docs/api.md that starts with `start` (an example's printed answer)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    return next(line for line in doc.splitlines() if line.startswith(start))


def assert_problem(response: httpx.Response, status: int, *fields: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert {"type", "title", "status", "detail", "instance"} <= body.keys()
    assert body["status"] == status
    if fields:
        assert sorted(e["field"] for e in body["errors"]) == sorted(fields), body
    return body


class TestCreateContact:
    async def test_normalizes_email_and_phone(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/v1/contacts",
            json={"email": "  Claire.Martin@Example.COM ", "phone": "06 12 34 56 78", "first_name": "Claire",
                  "address": {"city": "Lyon", "country": "fr"}},
            headers=ADMIN,
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["email"] == "claire.martin@example.com"
        assert body["phone"] == "+33612345678"
        assert body["address"]["country"] == "FR"
        assert body["source"] == "api" and body["kind"] == "prospect" and body["version"] == 1
        assert response.headers["etag"] == '"v1"'
        assert response.headers["location"] == f"/v1/contacts/{body['id']}"

    async def test_duplicate_email_is_409_with_existing_id(self, client: httpx.AsyncClient) -> None:
        first = await make_contact(client, email="dup@example.com")
        response = await client.post("/v1/contacts", json={"email": "DUP@example.com"}, headers=ADMIN)
        assert assert_problem(response, 409)["existing_id"] == first["id"]

    async def test_duplicate_external_id_is_409_with_existing_id(self, client: httpx.AsyncClient) -> None:
        first = await make_contact(client, external_id="C-1")
        response = await client.post("/v1/contacts", json={"external_id": "C-1", "email": unique_email()}, headers=ADMIN)
        assert assert_problem(response, 409)["existing_id"] == first["id"]

    async def test_needs_an_identifier(self, client: httpx.AsyncClient) -> None:
        assert_problem(await client.post("/v1/contacts", json={"first_name": "X"}, headers=ADMIN), 422, "body")

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"email": "not-an-email"}, "email"),
            ({"phone": "12"}, "phone"),
            ({"email": "a@b.fr", "address": {"country": "XX"}}, "address.country"),
            ({"email": "a@b.fr", "nickname": "typo"}, "nickname"),
            ({"email": "a@b.fr", "first_name": 42}, "first_name"),
            ({"email": "a@b.fr", "first_name": "Cl\u0000aire"}, "first_name"),
            ({"email": "a@b.fr", "kind": "alien"}, "kind"),
            ({"email": "a@b.fr", "birth_date": "31/12/1990"}, "birth_date"),
            ({"email": "a@b.fr", "tags": "vip"}, "tags"),
            ({"email": "a@b.fr", "kind": None}, "kind"),
            ({"email": "a@b.fr", "birth_date": "1850-01-01"}, "birth_date"),
            ({"email": "a@b.fr", "address": {"city": "Lyon", "planet": "Earth"}}, "address.planet"),
        ],
    )
    async def test_bad_input_is_422_naming_the_field(self, client: httpx.AsyncClient, body: dict, field: str) -> None:
        assert_problem(await client.post("/v1/contacts", json=body, headers=ADMIN), 422, field)
        listing = await client.get("/v1/contacts", params={"email": "a@b.fr"}, headers=ADMIN)
        assert listing.json()["data"] == []  # nothing half-written

    async def test_malformed_json_is_422(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/v1/contacts", content=b'{"email": "a@b.fr",', headers={**ADMIN, "content-type": "application/json"}
        )
        assert_problem(response, 422, "body")

    async def test_body_over_the_limit_is_413(self, client: httpx.AsyncClient) -> None:
        big = b'{"email": "a@b.fr", "first_name": "' + b"x" * (10 * 1024 * 1024) + b'"}'
        response = await client.post("/v1/contacts", content=big, headers={**ADMIN, "content-type": "application/json"})
        assert_problem(response, 413)

    async def test_unknown_attribute_and_wrong_type_are_422(self, client: httpx.AsyncClient) -> None:
        await make_attribute(client, "shoe_size", "number")
        unknown = await client.post("/v1/contacts", json={"email": unique_email(), "attributes": {"hat": 1}}, headers=ADMIN)
        assert_problem(unknown, 422, "attributes.hat")
        wrong = await client.post(
            "/v1/contacts", json={"email": unique_email(), "attributes": {"shoe_size": "big"}}, headers=ADMIN
        )
        assert_problem(wrong, 422, "attributes.shoe_size")

    async def test_a_text_attribute_with_a_lone_surrogate_is_a_422_not_a_500(self, client: httpx.AsyncClient) -> None:
        # `"\ud800"` is valid JSON but no UTF-8: attribute values are typed by the service, not pydantic, and the
        # driver failed to encode it (500). Create, patch, upsert and a batch item each answer the 422.
        await make_attribute(client, "note_sur", "text")
        headers = {**ADMIN, "Content-Type": "application/json"}
        value = '{"note_sur": "x\\ud800y"}'
        made = await client.post("/v1/contacts", headers=headers,
                                 content=f'{{"email": "{unique_email()}", "attributes": {value}}}'.encode())
        assert_problem(made, 422, "attributes.note_sur")
        contact = await make_contact(client, attributes={"note_sur": "kept"})
        patched = await client.patch(f"/v1/contacts/{contact['id']}", headers=headers,
                                     content=f'{{"attributes": {value}}}'.encode())
        assert_problem(patched, 422, "attributes.note_sur")
        upserted = await client.post("/v1/contacts/upsert", headers=headers,
                                     content=f'{{"email": "{contact["email"]}", "attributes": {value}}}'.encode())
        assert_problem(upserted, 422, "attributes.note_sur")
        item = f'{{"email": "{unique_email()}", "attributes": {value}}}'
        batch = await client.post("/v1/contacts/batch", headers=headers, content=f'{{"items": [{item}]}}'.encode())
        assert batch.status_code == 200 and batch.json()["results"][0]["error"]["errors"][0]["field"] == \
            "attributes.note_sur", batch.text
        assert (await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN)).json()["attributes"] == {
            "note_sur": "kept"}

    async def test_the_documented_wrong_type_example_prints_what_the_server_answers(
        self, client: httpx.AsyncClient
    ) -> None:
        """docs/api.md "Custom attributes": its PATCH example shows the `errors` the server gives, word for word."""
        shown = _documented_line('# [{"field": "attributes.shoe_size"')
        await make_attribute(client, "shoe_size", "number", description="EU size")
        contact = await make_contact(client)
        response = await client.patch(f"/v1/contacts/{contact['id']}", json={"attributes": {"shoe_size": "big"}},
                                      headers={**ADMIN, "Content-Type": "application/merge-patch+json"})
        assert assert_problem(response, 422)["errors"] == json.loads(shown.removeprefix("# "))

    async def test_typed_attributes_are_stored(self, client: httpx.AsyncClient) -> None:
        await make_attribute(client, "size", "enum", options=["S", "M", "L"])
        await make_attribute(client, "likes", "multi_enum", options=["wine", "cheese"])
        await make_attribute(client, "since", "date")
        await make_attribute(client, "optin_sms", "boolean")
        contact = await make_contact(
            client, attributes={"size": "M", "likes": ["cheese", "wine", "cheese"], "since": "2024-02-29",
                                "optin_sms": False},
        )
        assert contact["attributes"] == {"size": "M", "likes": ["cheese", "wine"], "since": "2024-02-29",
                                         "optin_sms": False}
        bad = await client.post("/v1/contacts", json={"email": unique_email(), "attributes": {"size": "XL"}}, headers=ADMIN)
        assert_problem(bad, 422, "attributes.size")


class TestIdempotency:
    async def test_same_key_same_body_replays_the_first_response(self, client: httpx.AsyncClient) -> None:
        headers = {**ADMIN, "Idempotency-Key": "k-1"}
        body = {"email": unique_email(), "first_name": "Léa"}
        first = await client.post("/v1/contacts", json=body, headers=headers)
        again = await client.post("/v1/contacts", json=dict(reversed(body.items())), headers=headers)
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert (again.headers["etag"], again.headers["location"]) == (first.headers["etag"], first.headers["location"])

    async def test_same_key_other_body_is_422(self, client: httpx.AsyncClient) -> None:
        headers = {**ADMIN, "Idempotency-Key": "k-2"}
        assert (await client.post("/v1/contacts", json={"email": unique_email()}, headers=headers)).status_code == 201
        other = await client.post("/v1/contacts", json={"email": unique_email()}, headers=headers)
        assert_problem(other, 422, "Idempotency-Key")

    async def test_a_failed_request_does_not_burn_the_key(self, client: httpx.AsyncClient) -> None:
        taken = await make_contact(client)
        headers = {**ADMIN, "Idempotency-Key": "k-3"}
        body = {"email": taken["email"]}
        assert (await client.post("/v1/contacts", json=body, headers=headers)).status_code == 409
        assert (await client.post("/v1/contacts", json=body, headers=headers)).status_code == 409


class TestGetContact:
    async def test_unknown_id_is_404(self, client: httpx.AsyncClient) -> None:
        assert_problem(await client.get(f"/v1/contacts/{uuid.uuid4()}", headers=ADMIN), 404)

    async def test_malformed_id_is_422(self, client: httpx.AsyncClient) -> None:
        assert_problem(await client.get("/v1/contacts/not-a-uuid", headers=ADMIN), 422, "contact_id")

    async def test_viewer_sees_masked_personal_data(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client, email="claire.martin@example.com", phone="+33612345612",
                                     first_name="Claire", last_name="Martin", birth_date="1990-05-01",
                                     address={"line1": "3 rue de la Paix", "city": "Lyon"})
        masked = (await client.get(f"/v1/contacts/{contact['id']}", headers=bearer(Role.VIEWER))).json()
        assert masked["email"] == "c***@example.com"
        assert masked["phone"] == "+33 6 ** ** ** 12"
        assert (masked["first_name"], masked["last_name"], masked["birth_date"]) == ("C***", "M***", None)
        assert masked["address"] == {**contact["address"], "line1": "***"}
        assert masked["pii_masked"] is True
        full = (await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN)).json()
        assert full["email"] == "claire.martin@example.com" and full["pii_masked"] is False


class TestUpsert:
    async def test_creates_then_updates_by_external_id(self, client: httpx.AsyncClient) -> None:
        body = {"external_id": "shop-42", "email": unique_email(), "first_name": "Ana"}
        created = await client.post("/v1/contacts/upsert", json=body, headers=ADMIN)
        assert created.status_code == 201
        updated = await client.post("/v1/contacts/upsert", json={"external_id": "shop-42", "last_name": "Diaz"},
                                    headers=ADMIN)
        assert updated.status_code == 200
        assert updated.json()["id"] == created.json()["id"]
        assert (updated.json()["first_name"], updated.json()["last_name"], updated.json()["version"]) == ("Ana", "Diaz", 2)

    async def test_matches_by_email_and_adopts_the_external_id(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        response = await client.post("/v1/contacts/upsert", json={"email": contact["email"], "external_id": "E-9"},
                                     headers=ADMIN)
        assert response.status_code == 200 and response.json()["id"] == contact["id"]
        assert response.json()["external_id"] == "E-9"

    async def test_email_of_a_contact_with_another_external_id_is_409(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client, external_id="A-1")
        response = await client.post("/v1/contacts/upsert", json={"email": contact["email"], "external_id": "B-2"},
                                     headers=ADMIN)
        assert assert_problem(response, 409)["existing_id"] == contact["id"]

    async def test_unchanged_upsert_writes_nothing(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client, first_name="Zoé")
        again = await client.post("/v1/contacts/upsert", json={"email": contact["email"], "first_name": "Zoé"},
                                  headers=ADMIN)
        assert again.status_code == 200 and again.json()["version"] == 1

    async def test_tags_are_only_added(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client, tags=["vip"])
        response = await client.post("/v1/contacts/upsert", json={"email": contact["email"], "tags": ["newsletter"]},
                                     headers=ADMIN)
        assert response.json()["tags"] == ["vip", "newsletter"]


class TestBatchNullKind:
    async def test_null_kind_in_a_batch_item_fails_that_item_only(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        items = [{"email": contact["email"], "kind": None}, {"email": unique_email()}]
        body = (await client.post("/v1/contacts/batch", json={"items": items}, headers=ADMIN)).json()
        assert [r["status"] for r in body["results"]] == ["error", "created"]


class TestBatch:
    async def test_one_bad_item_never_sinks_the_others(self, client: httpx.AsyncClient) -> None:
        existing = await make_contact(client, external_id="X-1")
        items = [{"email": unique_email()}, {"email": "broken"}, {"external_id": "X-1", "last_name": "Roux"},
                 {"email": unique_email(), "unknown": 1}]
        response = await client.post("/v1/contacts/batch", json={"items": items}, headers=ADMIN)
        assert response.status_code == 200, response.text
        body = response.json()
        assert [r["status"] for r in body["results"]] == ["created", "error", "updated", "error"]
        assert (body["created"], body["updated"], body["errors"]) == (1, 1, 2)
        assert body["results"][1]["error"]["errors"][0]["field"] == "email"
        assert body["results"][2]["id"] == existing["id"]

    async def test_unknown_key_with_nul_is_named_printably_and_replayed(self, client: httpx.AsyncClient) -> None:
        # Found by schemathesis: the field name echoed a NUL, and jsonb refused the idempotent response (500).
        items = [{"email": unique_email(), "a\u0000b": 1}]
        headers = {**ADMIN, "Idempotency-Key": "nul-key-1"}
        response = await client.post("/v1/contacts/batch", json={"items": items}, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["error"]["errors"][0]["field"] == "a\\u0000b"
        replay = await client.post("/v1/contacts/batch", json={"items": items}, headers=headers)
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json() == response.json()

    async def test_body_that_is_not_utf8_is_a_422_problem(self, client: httpx.AsyncClient) -> None:
        # Found by schemathesis: FastAPI's undocumented 400 "error parsing the body".
        headers = {**ADMIN, "Content-Type": "application/json"}
        response = await client.post("/v1/contacts", content=b"\xff\xfe{", headers=headers)
        assert assert_problem(response, 422, "body")["errors"][0]["code"] == "json_invalid"

    async def test_body_nested_past_the_parser_is_a_422_naming_it(self, client: httpx.AsyncClient) -> None:
        # 200,000 `[` (well under the body limit): json.loads raises RecursionError, which FastAPI turned into its
        # undocumented 400 "There was an error parsing the body", naming no field.
        headers = {**ADMIN, "Content-Type": "application/json"}
        for path in ("/v1/contacts", "/v1/segments/preview", "/v1/contacts/batch"):
            response = await client.post(path, content=b"[" * 200_000, headers=headers)
            assert assert_problem(response, 422, "body")["errors"][0]["code"] == "json_invalid", path

    @pytest.mark.parametrize("bad", [None, "n@x.fr", ["n@x.fr"], 42])
    async def test_an_item_that_is_not_an_object_fails_alone(self, client: httpx.AsyncClient, bad: object) -> None:
        email = unique_email()
        response = await client.post("/v1/contacts/batch", json={"items": [bad, {"email": email}]}, headers=ADMIN)
        assert response.status_code == 200, response.text
        body = response.json()
        assert [r["status"] for r in body["results"]] == ["error", "created"]
        assert (body["created"], body["updated"], body["errors"]) == (1, 0, 1)
        error = body["results"][0]["error"]
        assert (error["status"], error["errors"][0]["field"]) == (422, "body")
        assert (await client.get("/v1/contacts", params={"email": email}, headers=ADMIN)).json()["data"]

    async def test_more_than_1000_items_is_422(self, client: httpx.AsyncClient) -> None:
        items = [{"email": f"p{i}@example.com"} for i in range(1001)]
        assert_problem(await client.post("/v1/contacts/batch", json={"items": items}, headers=ADMIN), 422, "items")


class TestListContacts:
    async def test_filters(self, client: httpx.AsyncClient) -> None:
        lyon = await make_contact(client, last_name="Lefèvre", address={"city": "Lyon", "postal_code": "69001",
                                  "country": "FR"}, tags=["vip", "b2b"], kind="customer")
        await make_contact(client, last_name="Lefort", address={"city": "Paris", "postal_code": "75001"}, tags=["vip"])
        cases = [
            ({"city": "LYON"}, [lyon["id"]]),
            ({"postal_code": "69001"}, [lyon["id"]]),
            ({"tag": ["vip", "b2b"]}, [lyon["id"]]),
            ({"kind": "customer"}, [lyon["id"]]),
            ({"q": "lefè"}, [lyon["id"]]),
            ({"email": lyon["email"].upper()}, [lyon["id"]]),
            ({"country": "fr", "q": "lef"}, [lyon["id"]]),
        ]
        for params, expected in cases:
            response = await client.get("/v1/contacts", params=params, headers=ADMIN)
            assert response.status_code == 200, (params, response.text)
            assert [c["id"] for c in response.json()["data"]] == expected, params

    async def test_q_matches_words_and_phone(self, client: httpx.AsyncClient) -> None:
        jean = await make_contact(client, first_name="Jean", last_name="Dupont", company="Acme", phone="0611223344")
        await make_contact(client, first_name="Jeanne", last_name="Martin")
        for q in ("jean dup", "DUPONT", "acme", "06 11 22 33 44", "+33611223344"):
            ids = [c["id"] for c in (await client.get("/v1/contacts", params={"q": q}, headers=ADMIN)).json()["data"]]
            assert ids == [jean["id"]], q
        # LIKE wildcards in q are literal characters
        assert (await client.get("/v1/contacts", params={"q": "%"}, headers=ADMIN)).json()["data"] == []

    async def test_keyset_pages_are_stable_under_concurrent_inserts(self, client: httpx.AsyncClient) -> None:
        names = [f"Page{i:02d}" for i in range(7)]
        for name in names:
            await make_contact(client, last_name=name, tags=["paging"])
        seen: list[str] = []
        cursor = None
        while True:
            params = {"tag": "paging", "sort": "last_name", "limit": 3, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/v1/contacts", params=params, headers=ADMIN)).json()
            seen += [c["last_name"] for c in page["data"]]
            if len(seen) == 3:  # someone inserts rows sorting before and after the cursor
                await make_contact(client, last_name="Page00a", tags=["paging"])
                await make_contact(client, last_name="Page99", tags=["paging"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [*names, "Page99"]

    @pytest.mark.parametrize("sort", ["created_at", "-created_at", "updated_at", "-updated_at", "last_name",
                                      "-last_name", "last_order_at", "-last_order_at"])
    async def test_every_sort_pages_through_every_row_once(self, client: httpx.AsyncClient, sort: str) -> None:
        made = {(await make_contact(client, last_name=n, tags=["sorting"]))["id"] for n in ("b", None, "a", "c", None)}
        seen: list[str] = []
        cursor = None
        for _ in range(10):
            params = {"tag": "sorting", "sort": sort, "limit": 2, **({"cursor": cursor} if cursor else {})}
            response = await client.get("/v1/contacts", params=params, headers=ADMIN)
            assert response.status_code == 200, response.text
            seen += [c["id"] for c in response.json()["data"]]
            cursor = response.json()["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(made)

    async def test_forged_cursor_is_422(self, client: httpx.AsyncClient) -> None:
        for cursor in ("garbage", "eyJzIjoiY3JlYXRlZF9hdCJ9", "A" * 60):
            assert_problem(await client.get("/v1/contacts", params={"cursor": cursor}, headers=ADMIN), 422, "cursor")

    async def test_a_cursor_does_not_reveal_the_sort_value(self, client: httpx.AsyncClient) -> None:
        """Cursors are opaque: one handed on (to a token without pii:read, a log) carries no last name."""
        tag = uuid.uuid4().hex[:8]
        for name in (f"Zyx{tag}a", f"Zyx{tag}b"):
            await make_contact(client, last_name=name)
        cursor = (await client.get("/v1/contacts", params={"limit": 1, "sort": "-last_name"},
                                   headers=ADMIN)).json()["next_cursor"]
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        assert f"zyx{tag}".encode() not in raw.lower() and b"last_name" not in raw

    async def test_cursor_of_another_sort_is_422(self, client: httpx.AsyncClient) -> None:
        for _ in range(3):
            await make_contact(client)
        page = (await client.get("/v1/contacts", params={"limit": 1}, headers=ADMIN)).json()
        response = await client.get("/v1/contacts", params={"limit": 1, "sort": "last_name",
                                                            "cursor": page["next_cursor"]}, headers=ADMIN)
        assert_problem(response, 422, "cursor")

    @pytest.mark.parametrize("param", ["q", "city", "postal_code", "external_id"])
    async def test_nul_in_a_filter_is_422(self, client: httpx.AsyncClient, param: str) -> None:
        assert_problem(await client.get("/v1/contacts", params={param: "a\x00b"}, headers=ADMIN), 422, param)

    async def test_searching_personal_data_needs_pii_read(self, client: httpx.AsyncClient) -> None:
        await make_contact(client, email="secret.person@example.com")
        for params in ({"q": "secret"}, {"email": "secret.person@example.com"}):
            response = await client.get("/v1/contacts", params=params, headers=bearer(Role.VIEWER))
            assert assert_problem(response, 403)["missing_scopes"] == ["pii:read"]

    @pytest.mark.parametrize("limit", ["0", "1001", "-1", "lots"])
    async def test_limit_out_of_range_is_422(self, client: httpx.AsyncClient, limit: str) -> None:
        assert_problem(await client.get("/v1/contacts", params={"limit": limit}, headers=ADMIN), 422, "limit")


class TestUpdateContact:
    async def test_merge_patch_semantics(self, client: httpx.AsyncClient) -> None:
        await make_attribute(client, "color", "text")
        await make_attribute(client, "tier", "number")
        contact = await make_contact(client, first_name="Marc", company="Acme", address={"city": "Lyon", "line1": "1 rue"},
                                     attributes={"color": "red", "tier": 2})
        response = await client.patch(
            f"/v1/contacts/{contact['id']}",
            json={"company": None, "address": {"city": "Paris"}, "attributes": {"color": None, "tier": 3}},
            headers={**ADMIN, "content-type": "application/merge-patch+json"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["first_name"], body["company"]) == ("Marc", None)
        assert (body["address"]["city"], body["address"]["line1"]) == ("Paris", "1 rue")
        assert body["attributes"] == {"tier": 3}
        assert body["version"] == 2 and response.headers["etag"] == '"v2"'

    async def test_stale_if_match_is_412_and_changes_nothing(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        url = f"/v1/contacts/{contact['id']}"
        ok = await client.patch(url, json={"first_name": "A"}, headers={**ADMIN, "If-Match": '"v1"'})
        assert ok.status_code == 200
        stale = await client.patch(url, json={"first_name": "B"}, headers={**ADMIN, "If-Match": '"v1"'})
        assert_problem(stale, 412)
        assert (await client.get(url, headers=ADMIN)).json()["first_name"] == "A"
        assert_problem(await client.put(f"{url}/tags/x", headers={**ADMIN, "If-Match": '"v1"'}), 412)

    async def test_removing_the_last_identifier_is_422(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        response = await client.patch(f"/v1/contacts/{contact['id']}", json={"email": None}, headers=ADMIN)
        assert_problem(response, 422, "body")

    async def test_taking_another_contacts_email_is_409(self, client: httpx.AsyncClient) -> None:
        holder, other = await make_contact(client), await make_contact(client)
        response = await client.patch(f"/v1/contacts/{other['id']}", json={"email": holder["email"]}, headers=ADMIN)
        assert assert_problem(response, 409)["existing_id"] == holder["id"]
        assert (await client.get(f"/v1/contacts/{other['id']}", headers=ADMIN)).json()["email"] == other["email"]


class TestHistory:
    async def test_every_change_is_recorded_with_subject_and_via(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client, first_name="Paul")
        editor = bearer(Role.EDITOR, subject="editor@shop.example")
        await client.patch(f"/v1/contacts/{contact['id']}", json={"first_name": "Pierre", "address": {"city": "Nice"}},
                           headers=editor)
        history = (await client.get(f"/v1/contacts/{contact['id']}/history", headers=ADMIN)).json()["data"]
        latest = {(h["field"], h["old_value"], h["new_value"], h["subject"], h["via"]) for h in history[:2]}
        assert latest == {("first_name", "Paul", "Pierre", "editor@shop.example", "api"),
                          ("address.city", None, "Nice", "editor@shop.example", "api")}
        assert [(h["field"], h["old_value"], h["subject"], h["via"]) for h in history[2:]] == [
            ("created", None, "tester@shop.example", "api")]
        assert {"email", "first_name", "source"} <= set(history[2]["new_value"]["fields"])

    async def test_a_creation_is_one_entry_naming_the_fields_set_without_their_values(
        self, client: httpx.AsyncClient
    ) -> None:
        """Its values are the contact's own, or the old value of the entry that changed each (data minimisation:
        the history holds no second copy of a person's data), as an import's creation entry."""
        contact = await make_contact(client, email="lea.martin@example.com", first_name="Léa",
                                     address={"city": "Lyon"})
        await client.patch(f"/v1/contacts/{contact['id']}", json={"first_name": "Lea"}, headers=ADMIN)
        history = (await client.get(f"/v1/contacts/{contact['id']}/history", headers=ADMIN)).json()["data"]
        assert [(h["field"], h["old_value"], h["new_value"]) for h in history] == [
            ("first_name", "Léa", "Lea"),
            ("created", None, {"fields": ["address.city", "email", "first_name", "kind", "source"]}),
        ]

    async def test_viewer_sees_masked_values(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client, email="paul.durand@example.com")
        await client.patch(f"/v1/contacts/{contact['id']}", json={"email": "paul.d@example.com"}, headers=ADMIN)
        history = (await client.get(f"/v1/contacts/{contact['id']}/history", headers=bearer(Role.VIEWER))).json()
        email_entry = next(h for h in history["data"] if h["field"] == "email")
        assert (email_entry["old_value"], email_entry["new_value"]) == ("p***@example.com", "p***@example.com")

    async def test_pages(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client, first_name="A", last_name="B", company="C")
        await client.patch(f"/v1/contacts/{contact['id']}", json={"first_name": "D", "last_name": "E"}, headers=ADMIN)
        first = (await client.get(f"/v1/contacts/{contact['id']}/history", params={"limit": 2}, headers=ADMIN)).json()
        rest = (await client.get(f"/v1/contacts/{contact['id']}/history",
                                 params={"cursor": first["next_cursor"]}, headers=ADMIN)).json()
        fields = [h["field"] for h in first["data"] + rest["data"]]
        assert sorted(fields[:2]) == ["first_name", "last_name"] and fields[2:] == ["created"]
        assert rest["next_cursor"] is None

    @pytest.mark.parametrize("cursor", ["9223372036854775808", "99999999999999999999"])
    async def test_cursor_beyond_int64_is_422(self, client: httpx.AsyncClient, cursor: str) -> None:
        contact = await make_contact(client)
        response = await client.get(f"/v1/contacts/{contact['id']}/history", params={"cursor": cursor}, headers=ADMIN)
        assert_problem(response, 422, "cursor")


class TestContactTags:
    async def test_put_and_delete_a_tag(self, client: httpx.AsyncClient) -> None:
        contact = await make_contact(client)
        url = f"/v1/contacts/{contact['id']}/tags/salon-2026"
        assert (await client.put(url, headers=ADMIN)).json()["tags"] == ["salon-2026"]
        assert (await client.put(url, headers=ADMIN)).json()["version"] == 2  # idempotent
        catalogue = (await client.get("/v1/tags", headers=ADMIN)).json()
        assert "salon-2026" in [t["name"] for t in catalogue]
        assert (await client.delete(url, headers=ADMIN)).json()["tags"] == []

    async def test_a_tag_name_in_the_path_is_trimmed_as_in_a_body(self, client: httpx.AsyncClient) -> None:
        """The contract declares a tag name with a non-blank character (pattern), and bodies trim text: the path
        must neither make a blank tag nor a second ` vip ` beside `vip`."""
        contact = await make_contact(client, tags=["vip"])
        assert_problem(await client.put(f"/v1/contacts/{contact['id']}/tags/%20", headers=ADMIN), 422, "name")
        held = await client.put(f"/v1/contacts/{contact['id']}/tags/%20vip%20", headers=ADMIN)
        assert (held.status_code, held.json()["tags"], held.json()["version"]) == (200, ["vip"], 1)
        assert [t["name"] for t in (await client.get("/v1/tags", headers=ADMIN)).json()].count(" vip ") == 0
        gone = await client.delete(f"/v1/contacts/{contact['id']}/tags/vip%20", headers=ADMIN)
        assert gone.json()["tags"] == []

    async def test_deleting_a_tag_takes_it_off_every_contact(self, client: httpx.AsyncClient) -> None:
        a = await make_contact(client, tags=["old", "keep"])
        b = await make_contact(client, tags=["old"])
        assert (await client.delete("/v1/tags/old", headers=ADMIN)).status_code == 204
        for contact, tags in ((a, ["keep"]), (b, [])):
            assert (await client.get(f"/v1/contacts/{contact['id']}", headers=ADMIN)).json()["tags"] == tags
        history = (await client.get(f"/v1/contacts/{b['id']}/history", headers=ADMIN)).json()["data"]
        assert (history[0]["field"], history[0]["old_value"], history[0]["new_value"]) == ("tags", ["old"], [])
        assert_problem(await client.delete("/v1/tags/old", headers=ADMIN), 404)


class TestAttributeDefinitions:
    @pytest.mark.parametrize("body", [
        {"name": "no_options", "type": "enum"},
        {"name": "twice", "type": "multi_enum", "options": ["a", "a"]},
        {"name": "not_enum", "type": "text", "options": ["a"]},
    ])
    async def test_an_options_fault_names_options(self, client: httpx.AsyncClient, body: dict) -> None:
        """As PATCH /v1/attributes/{name} does: the 422 names `options`, not `body` (docs/api.md, Errors)."""
        assert_problem(await client.post("/v1/attributes", json=body, headers=ADMIN), 422, "options")


class TestAttributeDefinitionETag:
    """API.md: a single resource's GET returns an ETag; PATCH/DELETE accept If-Match and answer 412 when stale."""

    async def test_get_and_patch_answer_an_etag_and_a_stale_if_match_is_412(self, client: httpx.AsyncClient) -> None:
        await make_attribute(client, "colour", "enum", options=["red"])
        read = await client.get("/v1/attributes/colour", headers=ADMIN)
        first = read.headers["etag"]
        changed = await client.patch("/v1/attributes/colour", json={"options": ["red", "blue"]},
                                     headers={**ADMIN, "If-Match": first})
        assert changed.status_code == 200, changed.text
        assert changed.headers["etag"] not in (first, None)
        assert (await client.get("/v1/attributes/colour", headers=ADMIN)).headers["etag"] == changed.headers["etag"]
        stale = await client.patch("/v1/attributes/colour", json={"options": ["red", "blue", "green"]},
                                   headers={**ADMIN, "If-Match": first})
        assert assert_problem(stale, 412)["type"].endswith("/precondition-failed")
        assert (await client.get("/v1/attributes/colour", headers=ADMIN)).json()["options"] == ["red", "blue"]
        assert_problem(await client.patch("/v1/attributes/colour", json={"description": "x"},
                                          headers={**ADMIN, "If-Match": "garbage"}), 422, "If-Match")

    async def test_delete_with_a_stale_if_match_is_412_and_keeps_it(self, client: httpx.AsyncClient) -> None:
        await make_attribute(client, "stale_one", "text")
        first = (await client.get("/v1/attributes/stale_one", headers=ADMIN)).headers["etag"]
        await client.patch("/v1/attributes/stale_one", json={"description": "changed"}, headers=ADMIN)
        assert_problem(await client.delete("/v1/attributes/stale_one", headers={**ADMIN, "If-Match": first}), 412)
        assert (await client.get("/v1/attributes/stale_one", headers=ADMIN)).status_code == 200
        current = (await client.get("/v1/attributes/stale_one", headers=ADMIN)).headers["etag"]
        deleted = await client.delete("/v1/attributes/stale_one", headers={**ADMIN, "If-Match": current})
        assert deleted.status_code == 204, deleted.text


TOO_LATE = "9999-12-31T23:59:59-23:59"  # year 10000 in UTC
TOO_EARLY = "0001-01-01T00:00:00+23:59"  # year 0 in UTC


class TestTimestampRange:
    """An offset that pushes a timestamp outside years 1-9999 in UTC (what timestamptz stores): 422, never 500."""

    @pytest.mark.parametrize("moment", [TOO_LATE, TOO_EARLY])
    @pytest.mark.parametrize("param", ["created_after", "updated_after"])
    async def test_list_filters(self, client: httpx.AsyncClient, param: str, moment: str) -> None:
        assert_problem(await client.get("/v1/contacts", params={param: moment}, headers=ADMIN), 422, param)

    @pytest.mark.parametrize("moment", [TOO_LATE, TOO_EARLY])
    async def test_first_contact_at(self, client: httpx.AsyncClient, moment: str) -> None:
        body = {"email": unique_email(), "first_contact_at": moment}
        assert_problem(await client.post("/v1/contacts", json=body, headers=ADMIN), 422, "first_contact_at")
        contact = await make_contact(client)
        patched = await client.patch(f"/v1/contacts/{contact['id']}", json={"first_contact_at": moment}, headers=ADMIN)
        assert_problem(patched, 422, "first_contact_at")

    @pytest.mark.parametrize("moment", [TOO_LATE, TOO_EARLY])
    async def test_consent_occurred_at(self, client: httpx.AsyncClient, moment: str) -> None:
        contact = await make_contact(client)
        body = {"purpose": "email_marketing", "action": "withdrawn", "occurred_at": moment}
        response = await client.post(f"/v1/contacts/{contact['id']}/consents", json=body, headers=ADMIN)
        assert_problem(response, 422, "occurred_at")

    @pytest.mark.parametrize("moment", [TOO_LATE, TOO_EARLY])
    async def test_segment_condition(self, client: httpx.AsyncClient, moment: str) -> None:
        filter_ = {"all": [{"field": "created_at", "op": "gt", "value": moment}]}
        response = await client.post("/v1/segments/preview", json={"filter": filter_}, headers=ADMIN)
        assert_problem(response, 422, "filter.all[0].value")

    # The two ends themselves: asyncpg sends them as -infinity/infinity, which came back without an offset.
    @pytest.mark.parametrize("moment", ["0001-01-01T00:00:00", "0001-01-01T01:00:00+01:00",
                                        "9999-12-31T23:59:59.999999Z"])
    async def test_the_two_ends_are_refused(self, client: httpx.AsyncClient, moment: str) -> None:
        body = {"email": unique_email(), "first_contact_at": moment}
        assert_problem(await client.post("/v1/contacts", json=body, headers=ADMIN), 422, "first_contact_at")

    @pytest.mark.parametrize(("sent", "echoed"), [
        ("0001-01-01T00:00:01", "0001-01-01T00:00:01Z"),  # no offset: UTC
        ("0001-01-01T01:00:00.000001+01:00", "0001-01-01T00:00:00.000001Z"),
        ("9999-12-31T23:59:59.999998", "9999-12-31T23:59:59.999998Z"),
        ("9999-12-30T23:59:59-23:59", "9999-12-31T23:58:59Z"),
    ])
    async def test_the_edges_are_stored_and_echoed_in_utc(self, client: httpx.AsyncClient, sent: str,
                                                          echoed: str) -> None:
        created = await make_contact(client, first_contact_at=sent)
        assert created["first_contact_at"] == echoed
        read = (await client.get(f"/v1/contacts/{created['id']}", headers=ADMIN)).json()
        assert read["first_contact_at"] == echoed
        listing = await client.get("/v1/contacts", params={"created_after": sent}, headers=ADMIN)
        assert listing.status_code == 200


async def test_a_long_non_ascii_last_name_makes_a_cursor_the_server_takes_back(client: httpx.AsyncClient) -> None:
    """150 Cyrillic letters: escaped as \\uXXXX the sort value alone made the cursor longer than the 1,000 characters
    the `cursor` parameter allowed, so the server refused its own cursor; as UTF-8 it is ~700."""
    made = {(await make_contact(client, last_name="Жанна" * 30))["id"] for _ in range(2)}
    first = await client.get("/v1/contacts", params={"sort": "last_name", "limit": 1}, headers=ADMIN)
    cursor = first.json()["next_cursor"]
    assert cursor and len(cursor) <= 1000
    rest = await client.get("/v1/contacts", params={"sort": "last_name", "limit": 1, "cursor": cursor}, headers=ADMIN)
    assert rest.status_code == 200, rest.text
    assert {c["id"] for c in first.json()["data"] + rest.json()["data"]} == made
