"""GET /v1/exports/contacts through HTTP: formats, column order, Excel options, filters, masking, scopes."""

from __future__ import annotations

import asyncio
import csv
import getpass
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.security import Role, Scope
from tests.auth import bearer
from tests.factories import ADMIN, grant_marketing, make_attribute, make_contact, make_list
from tests.routers.test_contacts import assert_problem
from tests.routers.test_orders import order
from tests.test_cli import _carnet, _env

URL = "/v1/exports/contacts"
# A manager's token narrowed to exports:read: it may export, but not see personal data.
MASKED = bearer(Role.MANAGER, scopes={Scope.EXPORTS_READ}, subject="exporter@shop.example")
IDENTITY = ["id", "external_id", "email", "email_status", "phone", "first_name", "last_name", "company",
            "job_title", "sector", "gender", "birth_date", "language", "source", "first_contact_at",
            "first_contact_channel", "kind", "lifecycle_stage", "created_at", "updated_at", "last_activity_at"]
ADDRESS = ["address.line1", "address.line2", "address.postal_code", "address.city", "address.region",
           "address.country"]
STATS = ["stats.orders_count", "stats.total_spent", "stats.average_basket", "stats.first_order_at",
         "stats.last_order_at", "stats.last_order_amount", "stats.currency"]


def rows(response: httpx.Response, *, delimiter: str = ",") -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    return list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig")), delimiter=delimiter))


def lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


async def claire(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    return await make_contact(client, **{
        "email": f"claire.{uuid.uuid4().hex[:6]}@example.com", "phone": "06 12 34 56 78", "first_name": "Claire",
        "last_name": "Lefèvre", "company": "Ateliers Dupont", "birth_date": "1985-04-12",
        "address": {"line1": "12 rue de la Paix", "postal_code": "75002", "city": "Paris", "country": "FR"},
        **fields})


class TestCsv:
    async def test_columns_in_stable_order_with_attributes_last_by_name(self, client: httpx.AsyncClient) -> None:
        await make_attribute(client, "shoe_size", "number")
        await make_attribute(client, "colours", "multi_enum", options=["red", "blue"])
        await make_attribute(client, "newsletter_optin", "boolean")
        made = await claire(client, tags=["vip", "paris"],
                            attributes={"shoe_size": 38, "colours": ["red", "blue"], "newsletter_optin": True})
        response = await client.get(URL, headers=ADMIN)
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        assert response.headers["content-disposition"].startswith('attachment; filename="contacts-')
        header = next(csv.reader(io.StringIO(response.text)))
        assert header == [*IDENTITY, *ADDRESS, *STATS, "tags", "attr.colours", "attr.newsletter_optin",
                          "attr.shoe_size"]
        [row] = rows(response)
        assert row["id"] == made["id"] and row["email"] == made["email"] and row["phone"] == "+33612345678"
        assert (row["first_name"], row["last_name"], row["birth_date"]) == ("Claire", "Lefèvre", "1985-04-12")
        assert (row["address.line1"], row["address.postal_code"], row["address.country"]) == (
            "12 rue de la Paix", "75002", "FR")
        assert (row["stats.orders_count"], row["stats.total_spent"], row["stats.average_basket"]) == ("0", "0.00", "")
        assert row["tags"] == "vip|paris"
        assert (row["attr.colours"], row["attr.newsletter_optin"], row["attr.shoe_size"]) == ("red|blue", "true", "38")
        assert len(row["created_at"]) == 19 and row["created_at"][10] == " "  # "YYYY-MM-DD HH:MM:SS", UTC

    async def test_excel_options_bom_and_semicolon(self, client: httpx.AsyncClient) -> None:
        await claire(client, company="Dupont; Fils & Cie")
        response = await client.get(URL, params={"bom": "true", "delimiter": ";"}, headers=ADMIN)
        assert response.content.startswith(b"\xef\xbb\xbfid;external_id;email;")
        [row] = rows(response, delimiter=";")
        assert row["company"] == "Dupont; Fils & Cie" and row["last_name"] == "Lefèvre"
        plain = await client.get(URL, headers=ADMIN)
        assert plain.content.startswith(b"id,external_id,")

    async def test_multiline_and_quoted_cells_round_trip(self, client: httpx.AsyncClient) -> None:
        await claire(client, job_title='Head of "Growth"', address={"line1": "Bât. B\nEscalier 2", "city": "Lyon"})
        [row] = rows(await client.get(URL, headers=ADMIN))
        assert row["job_title"] == 'Head of "Growth"' and row["address.line1"] == "Bât. B\nEscalier 2"

    async def test_cells_that_a_spreadsheet_would_run_are_neutralized(self, client: httpx.AsyncClient) -> None:
        await claire(client, company='=HYPERLINK("http://evil.example")', job_title="@SUM(A1)", sector="-2+3")
        for headers in (ADMIN, MASKED):
            [row] = rows(await client.get(URL, headers=headers))
            assert row["company"] == "'=HYPERLINK(\"http://evil.example\")"
            assert (row["job_title"], row["sector"]) == ("'@SUM(A1)", "'-2+3")
        [row] = rows(await client.get(URL, headers=ADMIN))
        assert row["phone"] == "+33612345678"  # a validated E.164 number is not a formula

    async def test_attribute_cells_keep_quotes_backslashes_and_are_neutralized(
        self, client: httpx.AsyncClient
    ) -> None:
        await make_attribute(client, "styles", "multi_enum", options=['say "hi"', "back\\slash", "=cmd", "plain"])
        await make_attribute(client, "motto", "text")
        await claire(client, attributes={"styles": ['say "hi"', "back\\slash", "plain"], "motto": "=1+1"})
        await claire(client, attributes={"styles": []})
        await claire(client, attributes={"styles": ["=cmd"]})
        for headers in (ADMIN, MASKED):  # the COPY path and the masked cursor path agree
            exported = rows(await client.get(URL, headers=headers))
            assert sorted((r["attr.styles"], r["attr.motto"]) for r in exported) == sorted([
                ('say "hi"|back\\slash|plain', "'=1+1"), ("", ""), ("'=cmd", "")])

    async def test_masked_without_pii_read(self, client: httpx.AsyncClient) -> None:
        made = await claire(client)
        [row] = rows(await client.get(URL, headers=MASKED))
        assert row["email"] == made["email"][0] + "***@example.com"
        assert row["phone"] == "+33 6 ** ** ** 78"
        assert (row["first_name"], row["last_name"], row["birth_date"], row["address.line1"]) == (
            "C***", "L***", "", "***")
        assert (row["company"], row["address.city"], row["address.postal_code"]) == (
            "Ateliers Dupont", "Paris", "75002")
        body = (await client.get(URL, headers=MASKED)).text
        assert made["email"] not in body and "Lefèvre" not in body and "rue de la Paix" not in body

    async def test_both_paths_write_the_same_bytes_when_nothing_is_personal(self, client: httpx.AsyncClient) -> None:
        await make_attribute(client, "since", "date")
        await make_contact(client, email=None, external_id="SHOP-1", company="ACME", tags=["b2b"],
                           attributes={"since": "2020-02-29"}, address={"city": "Lyon", "postal_code": "69001"})
        assert (await client.put("/v1/orders/X-1", json=order({"external_id": "SHOP-1"}),
                                 headers=ADMIN)).status_code == 201
        unmasked = await client.get(URL, headers=ADMIN)
        assert unmasked.text == (await client.get(URL, headers=MASKED)).text
        [row] = rows(unmasked)
        assert row["stats.total_spent"] == "49.90" and row["attr.since"] == "2020-02-29"
        assert row["stats.last_order_at"][:10] == row["stats.first_order_at"][:10]

    async def test_empty_file_is_the_header_alone(self, client: httpx.AsyncClient) -> None:
        response = await client.get(URL, headers=ADMIN)
        assert response.status_code == 200 and response.text.count("\n") == 1


class TestJsonLines:
    async def test_one_contact_per_line_like_the_api(self, client: httpx.AsyncClient) -> None:
        made = await claire(client, tags=["vip"], attributes={})
        [line] = lines(await client.get(URL, params={"format": "jsonl"}, headers=ADMIN))
        api = (await client.get(f"/v1/contacts/{made['id']}", headers=ADMIN)).json()
        for key in ("id", "email", "phone", "first_name", "last_name", "birth_date", "tags", "attributes", "kind",
                    "version", "pii_masked"):
            assert line[key] == api[key], key
        assert line["address"] == api["address"]
        assert line["stats"]["total_spent"] == "0.00" and line["stats"]["orders_count"] == 0
        assert line["created_at"].endswith("+00:00") and line["created_at"][:19] == api["created_at"][:19]

    async def test_masked_without_pii_read(self, client: httpx.AsyncClient) -> None:
        made = await claire(client)
        [line] = lines(await client.get(URL, params={"format": "jsonl"}, headers=MASKED))
        assert line["pii_masked"] is True and line["email"] == made["email"][0] + "***@example.com"
        assert (line["first_name"], line["birth_date"], line["address"]["line1"]) == ("C***", None, "***")
        assert line["address"]["city"] == "Paris"


class TestFilters:
    async def test_segment(self, client: httpx.AsyncClient) -> None:
        vip = await claire(client, tags=["vip"])
        await claire(client)
        vip_filter = {"all": [{"field": "tags", "op": "contains", "value": "vip"}]}
        segment = (await client.post("/v1/segments", json={"name": f"vip-{uuid.uuid4().hex[:6]}", "filter": vip_filter},
                                     headers=ADMIN)).json()
        assert [r["id"] for r in rows(await client.get(URL, params={"segment": segment["id"]}, headers=ADMIN))] == [
            vip["id"]]

    async def test_list_members_subscribed_by_default(self, client: httpx.AsyncClient) -> None:
        made = await make_list(client)
        staying, leaving = await claire(client), await claire(client)
        await claire(client)  # not on the list
        for contact in (staying, leaving):
            await grant_marketing(client, contact["id"])
            joined = await client.put(f"/v1/lists/{made['id']}/members/{contact['id']}", headers=ADMIN)
            assert joined.status_code == 201
        await client.delete(f"/v1/lists/{made['id']}/members/{leaving['id']}", headers=ADMIN)

        def ids(response: httpx.Response) -> set[str]:
            return {r["id"] for r in rows(response)}

        assert ids(await client.get(URL, params={"list": made["id"]}, headers=ADMIN)) == {staying["id"]}
        left = await client.get(URL, params={"list": made["id"], "list_status": "unsubscribed"}, headers=ADMIN)
        assert ids(left) == {leaving["id"]}
        assert ids(await client.get(URL, params={"list": made["id"], "list_status": "any"}, headers=ADMIN)) == {
            staying["id"], leaving["id"]}

    async def test_list_status_alone_is_about_every_list(self, client: httpx.AsyncClient) -> None:
        """Without `list`, `list_status` keeps the contacts on at least one list in that status."""
        first, second = await make_list(client), await make_list(client)
        subscribed, unsubscribed, both, nowhere = [await claire(client) for _ in range(4)]
        for made, contact in ((first, subscribed), (first, unsubscribed), (first, both), (second, both)):
            await grant_marketing(client, contact["id"])
            joined = await client.put(f"/v1/lists/{made['id']}/members/{contact['id']}", headers=ADMIN)
            assert joined.status_code == 201
        for made, contact in ((first, unsubscribed), (second, both)):
            await client.delete(f"/v1/lists/{made['id']}/members/{contact['id']}", headers=ADMIN)

        async def ids(**params: str) -> set[str]:
            return {r["id"] for r in rows(await client.get(URL, params=params, headers=ADMIN))}

        assert await ids(list_status="subscribed") == {subscribed["id"], both["id"]}
        assert await ids(list_status="unsubscribed") == {unsubscribed["id"], both["id"]}
        assert await ids(list_status="pending") == set()
        assert await ids(list_status="any") == {subscribed["id"], unsubscribed["id"], both["id"]}
        assert await ids() == {subscribed["id"], unsubscribed["id"], both["id"], nowhere["id"]}

    async def test_unknown_segment_or_list_is_404_before_streaming(self, client: httpx.AsyncClient) -> None:
        body = assert_problem(await client.get(URL, params={"segment": str(uuid.uuid4())}, headers=ADMIN), 404)
        assert body["type"].endswith("/segment-not-found")
        body = assert_problem(await client.get(URL, params={"list": str(uuid.uuid4())}, headers=ADMIN), 404)
        assert body["type"].endswith("/list-not-found")

    async def test_bad_options_are_422_naming_the_parameter(self, client: httpx.AsyncClient) -> None:
        for params, field in (({"format": "xlsx"}, "format"), ({"delimiter": "|"}, "delimiter"),
                              ({"segment": "nope"}, "segment"), ({"list": "nope"}, "list"),
                              ({"list_status": "all"}, "list_status"), ({"bom": "maybe"}, "bom")):
            body = assert_problem(await client.get(URL, params=params, headers=ADMIN), 422)
            assert field in json.dumps(body["errors"]), (params, body)


class TestAccess:
    async def test_anonymous_is_401_and_roles_without_exports_read_are_403(self, client: httpx.AsyncClient) -> None:
        assert_problem(await client.get(URL), 401)
        for role in (Role.VIEWER, Role.EDITOR, Role.INTEGRATION):
            body = assert_problem(await client.get(URL, headers=bearer(role)), 403)
            assert body["missing_scopes"] == ["exports:read"]
        assert (await client.get(URL, headers=bearer(Role.MANAGER))).status_code == 200


    async def test_the_segment_and_list_filters_need_the_scopes_of_their_member_routes(
        self, client: httpx.AsyncClient
    ) -> None:
        """`segment` and `list` export what /v1/segments/{id}/contacts and /v1/lists/{id}/members list: a token
        narrowed to exports:read gets neither, as GET /v1/contacts?segment= refuses it (and before any lookup: an
        unknown id is the same 403)."""
        made = await make_list(client)
        segment = (await client.post("/v1/segments", json={"name": f"s-{uuid.uuid4().hex[:6]}", "filter": {
            "all": [{"field": "kind", "op": "eq", "value": "customer"}]}}, headers=ADMIN)).json()
        for params, scope in (({"segment": segment["id"]}, "segments:read"), ({"list": made["id"]}, "lists:read"),
                              ({"segment": str(uuid.uuid4())}, "segments:read")):
            body = assert_problem(await client.get(URL, params=params, headers=MASKED), 403)
            assert body["missing_scopes"] == [scope], (params, body)
        both = bearer(Role.MANAGER, scopes={Scope.EXPORTS_READ, Scope.SEGMENTS_READ, Scope.LISTS_READ})
        for params in ({"segment": segment["id"]}, {"list": made["id"]}):
            assert (await client.get(URL, params=params, headers=both)).status_code == 200


class TestCli:
    @pytest.mark.committing
    async def test_carnet_export_cut_short_is_journaled_with_who_ran_it(
        self, committing_client: httpx.AsyncClient, database_url: str, engine: Any, tmp_path: Path
    ) -> None:
        """`carnet export | head`: the reader goes away, the write fails. The entry was written in the export's own
        transaction, which then rolled back: rows out, nothing journaled. And it named `cli`, not who ran it."""
        async with engine.begin() as connection:
            await connection.execute(text(
                "INSERT INTO contact (id, email, email_status, kind, lifecycle_stage, attributes, tags, orders_count, "
                "total_spent, version, created_at, updated_at, source) SELECT gen_random_uuid(), 'cli-cut-' || g || "
                "'@shop.example', 'unverified', 'prospect', 'prospect', '{}', '{}', 0, 0, 1, now(), now(), 'api' "
                "FROM generate_series(1, 20000) g"))
        env = _env(DATABASE_URL=database_url, JWT_SECRET="cli-secret-" + "z" * 40)

        def cut_short() -> tuple[bytes, int]:
            process = subprocess.Popen(
                [sys.executable, "-m", "app", "export", "--format", "jsonl"], stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
            assert process.stdout is not None
            head = process.stdout.read(4096)
            process.stdout.close()  # as `head` does
            return head, process.wait(timeout=60)

        head, code = await asyncio.to_thread(cut_short)
        assert head.count(b"\n") >= 1 and code != 0  # rows went out, then the export failed
        async with engine.connect() as connection:
            rows = (await connection.execute(text(
                "SELECT subject, token_id, ref_count, detail FROM journal_pending WHERE action = 'exports.contacts' "
                "UNION ALL SELECT subject, token_id, ref_count, detail FROM journal_entry "
                "WHERE action = 'exports.contacts'"))).mappings().all()
        [entry] = rows
        assert entry["subject"] == f"cli:{getpass.getuser()}" and entry["token_id"] == "cli"
        assert entry["ref_count"] == 20000 and entry["detail"]["format"] == "jsonl"

    async def test_carnet_export_writes_the_same_file(
        self, committing_client: httpx.AsyncClient, database_url: str, tmp_path: Path
    ) -> None:
        made = [await claire(committing_client) for _ in range(3)]
        env = _env(DATABASE_URL=database_url, JWT_SECRET="cli-secret-" + "z" * 40)
        out = tmp_path / "contacts.csv"
        done = await asyncio.to_thread(_carnet, "export", "--delimiter", ";", "--bom", "--output", str(out),
                                       env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "3 contact(s) exported" in done.stderr
        content = out.read_bytes()
        assert content.startswith(b"\xef\xbb\xbfid;external_id;")
        exported = list(csv.DictReader(io.StringIO(content.decode("utf-8-sig")), delimiter=";"))
        assert sorted(r["id"] for r in exported) == sorted(c["id"] for c in made)
        assert {r["last_name"] for r in exported} == {"Lefèvre"}  # the owner's CLI is not masked
        jsonl = await asyncio.to_thread(_carnet, "export", "--format", "jsonl", env=env, cwd=tmp_path)
        assert jsonl.returncode == 0, jsonl.stderr
        assert len(jsonl.stdout.splitlines()) == 3
        bad = await asyncio.to_thread(_carnet, "export", "--format", "xlsx", env=env, cwd=tmp_path)
        assert bad.returncode == 2
        unknown = await asyncio.to_thread(_carnet, "export", "--segment", str(uuid.uuid4()), env=env, cwd=tmp_path)
        assert unknown.returncode == 1 and "no segment" in unknown.stderr
