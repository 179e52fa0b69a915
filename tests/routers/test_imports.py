"""HTTP contract of /v1/imports, with real-world files generated in the tests and the runner called directly."""

from __future__ import annotations

import csv
import io
import json
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import driver_connection, get_read_sessionmaker, get_sessionmaker
from app.main import create_app
from app.security import Role, Scope
from app.services import suppressions
from app.services.imports import batch, store
from app.services.imports.runner import run_next
from app.settings import Settings
from tests.auth import bearer
from tests.csv_samples import FRENCH_HEADER, build_csv, french_file, plain_file
from tests.factories import ADMIN, PROOF, grant_marketing, make_attribute, make_contact, make_list
from tests.routers.test_contacts import assert_problem

MASKED = bearer(Role.MANAGER, scopes={Scope.IMPORTS_WRITE}, subject="importer@shop.example")


async def upload(
    client: httpx.AsyncClient, data: bytes, *, headers: dict[str, str] = ADMIN, filename: str = "clients.csv",
    **fields: Any,
) -> httpx.Response:
    form: dict[str, str | list[str]] = {}
    for key, value in fields.items():
        if isinstance(value, list):
            form[key] = value
        elif isinstance(value, dict):
            form[key] = json.dumps(value)
        else:
            form[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return await client.post("/v1/imports", files={"file": (filename, data, "text/csv")}, data=form,
                             headers=headers)


async def run_import(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings, data: bytes,
    **fields: Any,
) -> dict[str, Any]:
    """Upload, run the job as the worker would, and answer its final state."""
    response = await upload(client, data, **fields)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    assert await run_next(sessions, settings) is True
    job = await client.get(f"/v1/imports/{response.json()['id']}", headers=ADMIN)
    assert job.status_code == 200, job.text
    return job.json()  # type: ignore[no-any-return]


async def report(client: httpx.AsyncClient, import_id: str, headers: dict[str, str] = ADMIN) -> list[dict[str, str]]:
    response = await client.get(f"/v1/imports/{import_id}/rejects", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.text)))


async def contacts_by_email(sessions: async_sessionmaker[AsyncSession]) -> dict[str, dict[str, Any]]:
    async with sessions() as session:
        rows = await session.execute(text("SELECT * FROM contact WHERE email IS NOT NULL"))
        return {r["email"]: dict(r) for r in rows.mappings()}


async def rows(sessions: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> list[tuple[Any, ...]]:
    async with sessions() as session:
        return [tuple(r) for r in await session.execute(text(sql), params)]


async def count(sessions: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> int:
    async with sessions() as session:
        return int(await session.scalar(text(sql), params) or 0)


class TestFrenchExcelFile:
    async def test_counts_reasons_and_values(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        await make_attribute(client, "taille", "enum", options=["S", "M", "L"])
        sample = french_file()
        async with sessions.begin() as session:
            await suppressions.suppress(session, [{"email": e, "phone": None} for e in sample.suppressed],
                                        reason="erasure")
        existing = await make_contact(client, email="client.5@exemple.fr", first_name="Ancien", company="Avant")

        job = await run_import(client, sessions, settings, sample.data)

        assert job["status"] == "done", job
        assert (job["encoding"], job["delimiter"]) == ("cp1252", ";")
        assert job["columns"] == {
            "Nom": "last_name", "Prénom": "first_name", "E-mail": "email", "Téléphone": "phone",
            "Adresse": "address.line1", "Code postal": "address.postal_code", "Ville": "address.city",
            "Société": "company", "Date de naissance": "birth_date", "Pays": "address.country",
            "Taille": "attributes.taille",
        }
        good = len(sample.good)
        assert job["total_rows"] == job["processed_rows"] == sample.rows
        assert job["created"] == good - 1
        assert job["updated"] == 1
        assert job["rejected"] == len(sample.bad) + len(sample.duplicates)
        assert job["skipped"] == len(sample.suppressed)
        assert job["rows_per_second"] > 0

        lines = await report(client, job["id"])
        by_row: dict[int, list[dict[str, str]]] = {}
        for line in lines:
            by_row.setdefault(int(line["row"]), []).append(line)
        for row_number, reason in sample.bad.items():
            assert any(reason in line["reason"] for line in by_row[row_number]), (row_number, by_row[row_number])
        for row_number, original in sample.duplicates.items():
            assert by_row[row_number] == [{"row": str(row_number), "column": "E-mail", "field": "email",
                                           "reason": f"duplicate of row {original}",
                                           "value": by_row[row_number][0]["value"]}]
        for row_number in sample.suppressed_rows:
            assert "erased" in by_row[row_number][0]["reason"]
            assert by_row[row_number][0]["value"] == ""  # the erased address is not written back in the report
        assert set(by_row) == set(sample.bad) | set(sample.duplicates) | set(sample.suppressed_rows)

        stored = await contacts_by_email(sessions)
        first = stored["client.0@exemple.fr"]
        assert (first["last_name"], first["first_name"], first["city"], first["company"]) == (
            "Lefèvre0", "François", "Besançon", "Café des Arts")
        assert (first["phone"], first["country"], first["birth_date"].isoformat()) == ("+33612340000", "FR",
                                                                                      "1960-01-01")
        assert first["attributes"] == {"taille": "S"} and first["source"] == "import"
        assert stored["client.3@exemple.fr"]["address_line1"] == "12 rue de l'Église\r\nBâtiment B"
        updated = stored["client.5@exemple.fr"]
        assert updated["id"] == uuid.UUID(existing["id"]) and updated["first_name"] == "Hélène"
        assert updated["company"] == "Avant"  # a blank cell never erases
        assert not any(e.startswith("efface.") for e in stored)
        # one `created` entry per new contact; one entry per changed field of the updated one
        assert await count(sessions, "SELECT count(*) FROM contact_history WHERE via = 'import' "
                                     "AND field = 'created'") == good - 1
        # the entry names the import and the file's row (later batches find a created row's keys through it)
        (created,) = [v for (v,) in await rows(
            sessions, "SELECT new_value FROM contact_history WHERE field = 'created' AND contact_id = :id",
            id=first["id"])]
        assert created == {"import_id": job["id"], "row": 2}
        changed = {r: (o, n) for r, o, n in await rows(
            sessions, "SELECT field, old_value, new_value FROM contact_history WHERE via = 'import' "
                      "AND contact_id = :id", id=updated["id"])}
        assert sorted(changed) == ["address.city", "address.country", "address.line1", "address.postal_code",
                                   "attributes.taille", "birth_date", "first_name", "last_name", "phone"]
        assert changed["first_name"] == ("Ancien", "Hélène")
        # good - 1 created by the import, plus the existing contact created through the API
        assert await count(sessions, "SELECT count(*) FROM outbox_message WHERE topic = 'contact.created'") == good
        assert await count(sessions, "SELECT count(*) FROM outbox_message WHERE topic = 'contact.updated' "
                                     "AND contact_id = :id", id=updated["id"]) == 1
        subjects = await rows(sessions, "SELECT DISTINCT subject FROM contact_history WHERE via = 'import'")
        assert subjects == [("tester@shop.example",)]


class TestFormats:
    async def test_utf8_bom_commas_english_headers(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        data = build_csv(["E-mail address", "First Name", "Last name", "Mobile", "Zip", "City", "Country"],
                         [["zoé@exemple.fr", "Zoé", "Ñúñez", "+32 470 12 34 56", "1000", "Bruxelles", "BE"],
                          ["Ana@Example.com", "Ana", "", "06 98 76 54 32", "75001", "Paris", "fr"]],
                         delimiter=",", encoding="utf-8", bom=True)
        job = await run_import(client, sessions, settings, data)
        assert (job["status"], job["encoding"], job["delimiter"], job["created"]) == ("done", "utf-8-sig", ",", 2)
        stored = await contacts_by_email(sessions)
        assert stored["zoé@exemple.fr"]["last_name"] == "Ñúñez"
        assert stored["zoé@exemple.fr"]["phone"] == "+32470123456"
        assert stored["ana@example.com"]["phone"] == "+33698765432"
        assert stored["ana@example.com"]["country"] == "FR"

    async def test_tabs_utf8_without_bom_and_quoted_newlines(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        data = build_csv(["Courriel", "Nom", "Adresse"],
                         [["a@exemple.fr", "Dupont", "1 rue A\nescalier B\n3e étage"], ["b@exemple.fr", "Durand", ""]],
                         delimiter="\t", encoding="utf-8", newline="\n")
        job = await run_import(client, sessions, settings, data)
        assert (job["delimiter"], job["encoding"], job["created"], job["total_rows"]) == ("\t", "utf-8", 2, 2)
        stored = await contacts_by_email(sessions)
        assert stored["a@exemple.fr"]["address_line1"] == "1 rue A\nescalier B\n3e étage"

    async def test_blank_lines_are_not_rows_and_row_numbers_follow_the_file(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        data = b"Email;Nom\r\nx@exemple.fr;X\r\n;;\r\nnot-an-email;Y\r\n\r\n"
        job = await run_import(client, sessions, settings, data)
        assert (job["created"], job["rejected"], job["total_rows"]) == (1, 1, 2)
        assert [(r["row"], r["column"]) for r in await report(client, job["id"])] == [("4", "Email")]


class TestRejectReport:
    async def test_values_are_masked_without_pii_read(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        data = build_csv(["Email", "Nom", "Téléphone", "Ville"],
                         [["claire@exemple.fr", "Martin", "06 12 34 56 78", "Lyon"],
                          ["CLAIRE@exemple.fr", "Martin", "", "Lyon"],
                          ["paul@exemple.fr", "Durand", "0612", "Lyon"],
                          ["marc@exemple.fr", "D" * 300, "", "L" * 300]])
        job = await run_import(client, sessions, settings, data)
        assert job["rejected"] == 3
        plain = await report(client, job["id"])
        masked = await report(client, job["id"], headers=MASKED)
        assert [r["value"] for r in plain] == ["claire@exemple.fr", "0612", "D" * 200 + "…", "L" * 200 + "…"]
        assert [r["value"] for r in masked] == ["c***@exemple.fr", "***", "D***", "L" * 200 + "…"]
        assert [r["reason"] for r in masked] == [r["reason"] for r in plain]
        assert masked[0]["reason"] == "duplicate of row 2"

    async def test_unknown_import_is_404(self, client: httpx.AsyncClient) -> None:
        assert_problem(await client.get(f"/v1/imports/{uuid.uuid4()}/rejects", headers=ADMIN), 404)
        assert_problem(await client.get(f"/v1/imports/{uuid.uuid4()}", headers=ADMIN), 404)


class TestPolicies:
    async def test_create_only_skips_existing_and_update_only_skips_new(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        await make_contact(client, email="old@exemple.fr", first_name="Old")
        data = build_csv(["Email", "Prénom"], [["old@exemple.fr", "Changed"], ["new@exemple.fr", "New"]])
        job = await run_import(client, sessions, settings, data, mode="create_only")
        assert (job["created"], job["updated"], job["skipped"]) == (1, 0, 1)
        assert (await contacts_by_email(sessions))["old@exemple.fr"]["first_name"] == "Old"
        assert "create_only" in (await report(client, job["id"]))[0]["reason"]

        data = build_csv(["Email", "Prénom"], [["old@exemple.fr", "Changed"], ["newer@exemple.fr", "New"]])
        job = await run_import(client, sessions, settings, data, mode="update_only")
        assert (job["created"], job["updated"], job["skipped"]) == (0, 1, 1)
        stored = await contacts_by_email(sessions)
        assert stored["old@exemple.fr"]["first_name"] == "Changed" and "newer@exemple.fr" not in stored

    async def test_blank_cells_keep_values_unless_blank_erases(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        await make_attribute(client, "points", "number")
        await make_contact(client, email="k@exemple.fr", first_name="Keep", company="Acme", attributes={"points": 3})
        data = build_csv(["Email", "Prénom", "Société", "Points"], [["k@exemple.fr", "", "", ""]])
        job = await run_import(client, sessions, settings, data)
        assert (job["updated"], job["unchanged"]) == (0, 1)
        kept = (await contacts_by_email(sessions))["k@exemple.fr"]
        assert (kept["first_name"], kept["company"], kept["attributes"]) == ("Keep", "Acme", {"points": 3})

        job = await run_import(client, sessions, settings, data, blank_erases=True)
        assert job["updated"] == 1
        erased = (await contacts_by_email(sessions))["k@exemple.fr"]
        assert (erased["first_name"], erased["company"], erased["attributes"]) == (None, None, {})

    async def test_external_id_matching_and_refusals(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        a = await make_contact(client, email="a@exemple.fr", external_id="C-1")
        await make_contact(client, email="b@exemple.fr", external_id="C-2")
        await make_contact(client, email="c@exemple.fr")
        data = build_csv(["Code client", "Email", "Nom"], [
            ["C-1", "a2@exemple.fr", "New email for C-1"],      # matched by external_id, email changes
            ["C-9", "b@exemple.fr", "Email of C-2"],            # refused: that email belongs to C-2
            ["C-2", "a@exemple.fr", "Takes a's email"],          # refused: another contact holds it
            ["C-3", "c@exemple.fr", "c gets an external_id"],   # matched by email, external_id set
        ])
        job = await run_import(client, sessions, settings, data)
        assert (job["updated"], job["rejected"], job["created"]) == (2, 2, 0)
        reasons = [r["reason"] for r in await report(client, job["id"])]
        assert reasons == ["this email belongs to a contact with another external_id",
                           "another contact already holds this email"]
        stored = await contacts_by_email(sessions)
        assert stored["a2@exemple.fr"]["id"] == uuid.UUID(a["id"])
        assert stored["c@exemple.fr"]["external_id"] == "C-3"

    async def test_dry_run_writes_nothing(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        await make_contact(client, email="exists@exemple.fr", first_name="A")
        before = await count(sessions, "SELECT (SELECT count(*) FROM contact) + (SELECT count(*) FROM contact_history)"
                                       " + (SELECT count(*) FROM outbox_message) + (SELECT count(*) FROM tag)")
        data = build_csv(["Email", "Prénom"], [["exists@exemple.fr", "B"], ["exists@exemple.fr", "C"],
                                                ["new@exemple.fr", "N"], ["bad", "X"]])
        job = await run_import(client, sessions, settings, data, dry_run=True, tags=["salon-2026"])
        assert (job["status"], job["created"], job["updated"], job["rejected"]) == ("done", 1, 1, 2)
        after = await count(sessions, "SELECT (SELECT count(*) FROM contact) + (SELECT count(*) FROM contact_history)"
                                      " + (SELECT count(*) FROM outbox_message) + (SELECT count(*) FROM tag)")
        assert after == before
        assert (await contacts_by_email(sessions))["exists@exemple.fr"]["first_name"] == "A"

    @pytest.mark.parametrize("options", [{}, {"mode": "create_only"}, {"dry_run": True}], ids=str)
    async def test_duplicates_of_created_rows_in_later_batches(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings,
        options: dict[str, Any],
    ) -> None:
        # Two rows a batch; rows 4-6, 8 and 10 repeat a key of a row that created a contact in an earlier batch.
        data = build_csv(["Email", "Code client", "Nom"], [
            ["a@exemple.fr", "C1", "A"], ["b@exemple.fr", None, "B"],
            ["a@exemple.fr", None, "again A"], ["z@exemple.fr", "C1", "again C1"],
            ["b@exemple.fr", "C9", "again B"], ["new@exemple.fr", None, "N"],
            ["a@exemple.fr", None, "third A"], ["y@exemple.fr", "C9", "Y"],  # C9's first row was a duplicate
            ["b@exemple.fr", "C5", "again B"], ["c@exemple.fr", "C5", "C"],  # so was C5's, in the same batch
        ])
        small = settings.model_copy(update={"import_batch_rows": 2})
        job = await run_import(client, sessions, small, data, **options)
        assert (job["created"], job["updated"], job["skipped"], job["rejected"]) == (5, 0, 0, 5)
        assert [(r["row"], r["column"], r["reason"], r["value"]) for r in await report(client, job["id"])] == [
            ("4", "Email", "duplicate of row 2", "a@exemple.fr"),
            ("5", "Code client", "duplicate of row 2", "C1"),
            ("6", "Email", "duplicate of row 3", "b@exemple.fr"),
            ("8", "Email", "duplicate of row 2", "a@exemple.fr"),
            ("10", "Email", "duplicate of row 3", "b@exemple.fr"),
        ]
        if not options.get("dry_run"):
            names = {e: c["last_name"] for e, c in (await contacts_by_email(sessions)).items()}
            assert names == {"a@exemple.fr": "A", "b@exemple.fr": "B", "new@exemple.fr": "N", "y@exemple.fr": "Y",
                             "c@exemple.fr": "C"}

    async def test_a_created_rows_number_is_found_in_its_history_entry_or_in_an_older_jobs_c_key(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        """Earlier batches' created rows, as the next batch looks them up: through the contact's `created` history
        entry, or through the `c:<contact id>` key a job begun before that entry held the row left instead."""
        response = await upload(client, build_csv(["Email"], [["x@exemple.fr"]]))
        job_id = uuid.UUID(response.json()["id"])
        recent = await make_contact(client, email="recent@exemple.fr")
        older = await make_contact(client, email="older@exemple.fr")
        async with sessions.begin() as session:
            await session.execute(text(
                "INSERT INTO contact_history (contact_id, field, new_value, subject, via, at) "
                "VALUES (:id, 'created', CAST(:entry AS jsonb), 'cli:test', 'import', now())"),
                {"id": uuid.UUID(recent["id"]), "entry": json.dumps({"import_id": str(job_id), "row": 9})})
            await session.execute(text("INSERT INTO import_key (import_id, key, row_number) VALUES (:job, :key, 7)"),
                                  {"job": job_id, "key": f"c:{older['id']}"})
            connection = await driver_connection(session)
            found = await connection.fetch(batch._EARLIER_KEYS_SQL, job_id, [],
                                           ["recent@exemple.fr", "older@exemple.fr", "x@exemple.fr"], [])
        assert sorted((r["key"], r["row_number"]) for r in found) == [("e:older@exemple.fr", 7),
                                                                      ("e:recent@exemple.fr", 9)]

    async def test_tags_are_added_to_every_imported_row(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        await make_contact(client, email="t@exemple.fr", tags=["vip"])
        data = build_csv(["Email"], [["t@exemple.fr"], ["u@exemple.fr"]])
        job = await run_import(client, sessions, settings, data, tags=["salon-2026, lyon"])
        assert (job["created"], job["updated"]) == (1, 1)
        stored = await contacts_by_email(sessions)
        assert stored["t@exemple.fr"]["tags"] == ["vip", "salon-2026", "lyon"]
        assert stored["u@exemple.fr"]["tags"] == ["salon-2026", "lyon"]
        assert await count(sessions, "SELECT count(*) FROM tag WHERE name IN ('salon-2026', 'lyon')") == 2


class TestListAndConsent:
    async def test_subscribes_with_the_consent_and_changes_no_other_status(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        newsletter = await make_list(client)
        other = await make_list(client)
        left = await make_contact(client, email="left@exemple.fr")
        await grant_marketing(client, left["id"], occurred_at="2026-01-01T00:00:00Z")
        assert (await client.put(f"/v1/lists/{newsletter['id']}/members/{left['id']}", headers=ADMIN)).status_code \
            in (200, 201)
        assert (await client.delete(f"/v1/lists/{newsletter['id']}/members/{left['id']}", headers=ADMIN)
                ).status_code == 200
        in_other = await make_contact(client, email="other@exemple.fr")
        await grant_marketing(client, in_other["id"])
        assert (await client.put(f"/v1/lists/{other['id']}/members/{in_other['id']}", headers=ADMIN)).status_code \
            in (200, 201)
        data = build_csv(["Email", "Nom"], [["new@exemple.fr", "N"], ["left@exemple.fr", "L"],
                                             ["other@exemple.fr", "O"]])
        consent = {"occurred_at": "2025-06-01T10:00:00Z", "source": "salon-2025", "proof": PROOF}
        job = await run_import(client, sessions, settings, data, list_id=newsletter["id"], consent=consent)
        assert (job["created"], job["subscribed"]) == (1, 2)
        lines = await report(client, job["id"])
        assert [(r["row"], r["reason"]) for r in lines] == [
            ("3", "not subscribed: the contact unsubscribed from this list after the import's consent")]
        statuses = dict(await rows(sessions, "SELECT c.email, m.status FROM list_membership m JOIN contact c "
                                             "ON c.id = m.contact_id WHERE m.list_id = :l", l=newsletter["id"]))
        assert statuses == {"new@exemple.fr": "subscribed", "left@exemple.fr": "unsubscribed",
                            "other@exemple.fr": "subscribed"}
        assert await count(sessions, "SELECT count(*) FROM list_membership WHERE list_id = :l", l=other["id"]) == 1
        grants = await rows(sessions, "SELECT e.source, e.recorded_by, e.proof->>'wording' FROM consent_event e "
                                      "JOIN contact c ON c.id = e.contact_id WHERE c.email = 'new@exemple.fr'")
        assert grants == [("salon-2025", "tester@shop.example", PROOF["wording"])]
        assert await count(sessions, "SELECT count(*) FROM outbox_message WHERE topic = 'membership.subscribed' "
                                     "AND payload->>'list_id' = :l", l=newsletter["id"]) == 3  # 1 by the API

    async def test_double_opt_in_list_makes_pending_members_and_asks_confirmation(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        the_list = await make_list(client, double_opt_in=True)
        data = build_csv(["Email"], [["d@exemple.fr"]])
        job = await run_import(client, sessions, settings, data, list_id=the_list["id"], consent={"proof": PROOF})
        assert job["subscribed"] == 1
        assert await rows(sessions, "SELECT status FROM list_membership WHERE list_id = :l", l=the_list["id"]) == [
            ("pending",)]
        payloads = await rows(sessions, "SELECT payload FROM outbox_message "
                                        "WHERE topic = 'membership.confirmation_requested'")
        assert payloads[0][0]["confirm_url"].startswith(settings.public_base_url + "/v1/public/confirm/")

    async def test_list_needs_consent_and_must_exist(self, client: httpx.AsyncClient) -> None:
        data = build_csv(["Email"], [["x@exemple.fr"]])
        the_list = await make_list(client)
        assert_problem(await upload(client, data, list_id=the_list["id"]), 422, "consent")
        assert_problem(await upload(client, data, list_id=str(uuid.uuid4()), consent={"proof": PROOF}), 422,
                       "list_id")
        assert_problem(await upload(client, data, consent={"proof": PROOF}), 422, "consent")
        assert_problem(await upload(client, data, list_id=the_list["id"], consent={"proof": {}}), 422,
                       "consent.proof")


class TestUploadValidation:
    async def test_bad_requests_name_the_field(self, client: httpx.AsyncClient) -> None:
        data = build_csv(["Email", "Nom"], [["x@exemple.fr", "X"]])
        assert_problem(await client.post("/v1/imports", json={}, headers=ADMIN), 422, "file")
        assert_problem(await upload(client, b""), 422, "file")
        assert_problem(await upload(client, data, mode="merge"), 422, "mode")
        assert_problem(await upload(client, data, colour="blue"), 422, "colour")
        assert_problem(await upload(client, data, mapping="{not json"), 422, "mapping")
        assert_problem(await upload(client, data, mapping={"Missing": "email"}), 422, "mapping.Missing")
        assert_problem(await upload(client, data, mapping={"Email": "shoe_size"}), 422, "mapping.Email")
        assert_problem(await upload(client, data, mapping={"Nom": "last_name"}), 422, "file")
        assert_problem(await upload(client, build_csv(["Nom", "Ville"], [["X", "Y"]])), 422, "file")

    async def test_explicit_mapping_is_used_as_given(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        data = build_csv(["Adresse électronique", "Col2", "Nom"], [["m@exemple.fr", "Dupont", "ignored"]])
        job = await run_import(client, sessions, settings, data,
                               mapping={"Adresse électronique": "email", "Col2": "last_name", "Nom": None})
        assert job["columns"] == {"Adresse électronique": "email", "Col2": "last_name", "Nom": None}
        assert (await contacts_by_email(sessions))["m@exemple.fr"]["last_name"] == "Dupont"

    async def test_scopes(self, client: httpx.AsyncClient) -> None:
        data = build_csv(["Email"], [["x@exemple.fr"]])
        assert_problem(await client.post("/v1/imports", files={"file": ("a.csv", data)}), 401)
        assert_problem(await upload(client, data, headers=bearer(Role.VIEWER)), 403)
        assert_problem(await upload(client, data, headers=bearer(Role.EDITOR)), 403)
        assert (await upload(client, data, headers=MASKED)).status_code == 202


class TestIdempotencyKey:
    """Multipart uploads: "the same body" is the same file bytes and fields, whatever the boundary."""

    async def test_a_repeat_replays_the_first_202_and_queues_one_job(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        headers = {**ADMIN, "Idempotency-Key": "upload-1"}
        data = plain_file(20)
        first = await upload(client, data, headers=headers, tags=["salon", "vip"], mode="upsert")
        assert first.status_code == 202, first.text
        again = await upload(client, data, headers=headers, mode="upsert", tags=["salon", "vip"])  # other order
        assert again.status_code == 202, again.text
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert again.headers["location"] == first.headers["location"] == f"/v1/imports/{first.json()['id']}"
        assert await count(sessions, "SELECT count(*) FROM import_job") == 1
        assert await count(sessions, "SELECT count(*) FROM import_chunk") == 1

    async def test_another_file_or_other_fields_with_the_key_are_422(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        headers = {**ADMIN, "Idempotency-Key": "upload-2"}
        data = plain_file(20)
        assert (await upload(client, data, headers=headers, tags=["a", "b"])).status_code == 202
        changes: list[tuple[bytes, dict[str, Any]]] = [
            (plain_file(21), {"tags": ["a", "b"]}),                         # another file
            (data, {"tags": ["b", "a"]}),                                   # tags in another order
            (data, {"tags": ["a", "b"], "dry_run": True}),                  # another field
            (data, {"tags": ["a", "b"], "filename": "other.csv"}),          # another file name
        ]
        for content, fields in changes:
            assert_problem(await upload(client, content, headers=headers, **fields), 422, "Idempotency-Key")
        assert await count(sessions, "SELECT count(*) FROM import_job") == 1

    async def test_without_a_key_each_upload_queues_a_job_and_a_failed_one_frees_the_key(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        data = plain_file(5)
        assert (await upload(client, data)).status_code == 202
        assert (await upload(client, data)).status_code == 202
        assert await count(sessions, "SELECT count(*) FROM import_job") == 2
        headers = {**ADMIN, "Idempotency-Key": "upload-3"}
        assert_problem(await upload(client, b"", headers=headers), 422, "file")  # stores nothing
        assert (await upload(client, data, headers=headers)).status_code == 202
        assert_problem(await upload(client, data, headers={**ADMIN, "Idempotency-Key": ""}), 422, "Idempotency-Key")


async def test_plain_file_helper_is_valid(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    job = await run_import(client, sessions, settings, plain_file(50))
    assert (job["created"], job["rejected"]) == (50, 0)
    assert FRENCH_HEADER[0] == "Nom"


async def test_binary_garbage_and_control_characters_are_422(client: httpx.AsyncClient) -> None:
    assert_problem(await upload(client, bytes(range(256)) * 10), 422, "file")
    assert_problem(await upload(client, b"Email\x00;Nom\r\nx@exemple.fr;X\r\n"), 422, "file")
    response = await upload(client, b"Email;Nom\r\nx@exemple.fr;X\r\n", filename="a\x00b.csv")
    assert response.status_code == 202, response.text


async def test_imports_have_their_own_body_cap(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    big = plain_file(20000)
    assert len(big) > settings.max_body_bytes  # the general limit (1 MB in tests) does not apply to imports
    assert (await upload(client, big)).status_code == 202
    capped = create_app(settings.model_copy(update={"import_max_bytes": 4096}))
    capped.dependency_overrides[get_sessionmaker] = lambda: sessions
    capped.dependency_overrides[get_read_sessionmaker] = lambda: sessions
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=capped), base_url="http://test") as http:
        assert_problem(await upload(http, plain_file(200)), 413)


async def test_a_job_that_keeps_killing_its_runner_fails(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    response = await upload(client, build_csv(["Email"], [["x@exemple.fr"]]))
    async with sessions.begin() as session:
        await session.execute(text("UPDATE import_job SET status = 'running', attempts = :n, "
                                   "lease_until = now() - interval '1 second' WHERE id = :id"),
                              {"n": settings.import_max_attempts, "id": response.json()["id"]})
    assert await run_next(sessions, settings) is True
    job = (await client.get(f"/v1/imports/{response.json()['id']}", headers=ADMIN)).json()
    assert (job["status"], job["created"]) == ("failed", 0)
    assert job["error"].startswith("gave up after")
    assert await run_next(sessions, settings) is False
    # over: the file (every person in it) is not kept past the job
    assert await count(sessions, "SELECT count(*) FROM import_chunk WHERE import_id = :id",
                       id=uuid.UUID(job["id"])) == 0


@pytest.mark.parametrize(("mode", "outcome"), [("upsert", (1, 1, 0)), ("create_only", (1, 0, 1))])
async def test_a_contact_created_by_another_writer_meanwhile_is_updated_as_the_api_upsert_would(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings,
    monkeypatch: pytest.MonkeyPatch, mode: str, outcome: tuple[int, int, int],
) -> None:
    """The other writer's contact appears between the batch's read of the holders and its insert: the row is matched
    to it again and updates it (create_only: skips it), never refused with "import the row again"."""
    await make_contact(client, email="raced@exemple.fr", first_name="Other writer")
    holders = batch._holders_sql

    def first_read_sees_nobody(*, lock: bool, of: str | None = None) -> str:
        return holders(lock=lock, of=of) + (" LIMIT 0" if of is None else "")

    monkeypatch.setattr(batch, "_holders_sql", first_read_sees_nobody)
    data = build_csv(["Email", "Société"], [["raced@exemple.fr", "Import"], ["free@exemple.fr", "Import"]])
    job = await run_import(client, sessions, settings, data, mode=mode)
    assert (job["created"], job["updated"], job["skipped"], job["rejected"]) == (*outcome, 0)
    raced = (await contacts_by_email(sessions))["raced@exemple.fr"]
    assert (raced["first_name"], raced["company"]) == ("Other writer", "Import" if mode == "upsert" else None)


async def test_report_values_are_cleared_some_days_after_the_import(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """Storage limitation: a reject report keeps the refused cells (real people's data) for
    IMPORT_REPORT_VALUES_DAYS after the job ends, then only each line's row, column and reason."""
    old = await run_import(client, sessions, settings, build_csv(["Email", "Nom"], [["a@@exemple.fr", "Old"]]))
    recent = await run_import(client, sessions, settings, build_csv(["Email", "Nom"], [["b@@exemple.fr", "New"]]))
    async with sessions.begin() as session:
        await session.execute(text("UPDATE import_job SET finished_at = now() - make_interval(days => :d) "
                                   "WHERE id = :id"), {"d": settings.import_report_values_days + 1, "id": old["id"]})
    expiry = store.ReportValueExpiry(batch=1)

    assert await expiry(sessions, settings) is True       # a full batch: more may wait
    assert await expiry(sessions, settings) is False      # done; the next sweep is an interval away
    assert await expiry(sessions, settings) is False

    assert [(r["row"], r["column"], r["value"]) for r in await report(client, old["id"])] == [("2", "Email", "")]
    assert "not a valid email address" in (await report(client, old["id"]))[0]["reason"]
    assert [r["value"] for r in await report(client, recent["id"])] == ["b@@exemple.fr"]


class TestUnreadableInput:
    """Security audit: bad bytes in a file are rejected rows with a reason, never a failed job or a 500."""

    async def test_a_nul_a_huge_quoted_cell_and_an_overlong_line_are_rejected_rows(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        data = (b"Email,Nom\r\n"
                b"q1@example.com,A\r\n"
                b"q5@example.com,a\x00b\r\n"                                      # NUL in a cell
                b'q6@example.com,"' + b"x" * (130 * 1024) + b'"\r\n'              # quoted cell over 128 KiB
                b"q7@example.com," + b"y" * (2**20 + 10) + b"\r\n"               # a record over 1 MiB
                b"q8@example.com,B\r\n")
        small = settings.model_copy(update={"import_batch_rows": 2})  # rows written before and after the bad ones
        job = await run_import(client, sessions, small, data)
        assert job["status"] == "done", job
        assert (job["total_rows"], job["created"], job["rejected"]) == (5, 2, 3)
        assert set(await contacts_by_email(sessions)) == {"q1@example.com", "q8@example.com"}
        lines = await report(client, job["id"])
        assert [(r["row"], r["column"], r["value"]) for r in lines] == [
            ("3", "Nom", "a\\0b"), ("4", "", ""), ("5", "", "")]
        assert "control characters" in lines[0]["reason"]
        assert lines[1]["reason"] == "unreadable row: a quoted cell is longer than 131072 characters"
        assert lines[2]["reason"] == "unreadable row: longer than 1048576 characters"

    async def test_a_single_overlong_line_without_newline_is_one_rejected_row(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        data = b"Email,Nom\r\nq1@example.com,A\r\n" + b"z" * (3 * 2**20)
        job = await run_import(client, sessions, settings, data)
        assert (job["status"], job["total_rows"], job["created"], job["rejected"]) == ("done", 2, 1, 1)
        assert [(r["row"], r["reason"]) for r in await report(client, job["id"])] == [
            ("3", "unreadable row: longer than 1048576 characters")]

    async def test_report_cells_from_the_file_cannot_run_as_formulas(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        data = build_csv(["Email", "+Tel", "Nom"], [["f1@exemple.fr", "=2+3", "A"], ["@SUM(1)", "", "B"],
                                                     ["f3@exemple.fr", "-1", "C"]])
        job = await run_import(client, sessions, settings, data,
                               mapping={"Email": "email", "+Tel": "phone", "Nom": "last_name"})
        assert job["rejected"] == 3, job
        lines = await report(client, job["id"])
        assert [(r["row"], r["column"], r["field"], r["value"]) for r in lines] == [
            ("2", "'+Tel", "phone", "'=2+3"), ("3", "Email", "email", "'@SUM(1)"), ("4", "'+Tel", "phone", "'-1")]
        for line in await report(client, job["id"], headers=MASKED):
            assert not any(cell[:1] in "=+-@\t\r" and cell for cell in line.values()), line


class TestWhoRunsTheImport:
    """With an external database nothing runs the queue unless `carnet worker` does: the 202 says so."""

    async def test_with_no_worker_heard_from_the_202_warns_that_the_import_stays_queued(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with sessions.begin() as session:
            await session.execute(text("DELETE FROM worker_heartbeat"))  # rolled back with the test
        response = await upload(client, plain_file(3))
        assert response.status_code == 202
        accepted = response.json()
        assert accepted["status"] == "queued"
        assert accepted["workers"] == {"live": 0, "last_seen_at": None}
        assert "carnet worker" in accepted["warning"] and "stays queued" in accepted["warning"]
        ready = (await client.get("/readyz")).json()
        assert ready["workers"] == {"live": 0, "last_seen_at": None}

    async def test_a_live_worker_is_counted_and_no_warning_given(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with sessions.begin() as session:
            await session.execute(text("DELETE FROM worker_heartbeat"))
            await session.execute(text("INSERT INTO worker_heartbeat VALUES ('gone:1:a', now() - interval '1 hour'),"
                                       " ('alive:2:b', now())"))
        accepted = (await upload(client, plain_file(3))).json()
        assert accepted["workers"]["live"] == 1 and accepted["workers"]["last_seen_at"] is not None
        assert "warning" not in accepted
        assert (await client.get("/readyz")).json()["workers"]["live"] == 1

    async def test_a_worker_that_died_is_named_by_its_last_heartbeat(
        self, client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with sessions.begin() as session:
            await session.execute(text("DELETE FROM worker_heartbeat"))
            await session.execute(text("INSERT INTO worker_heartbeat VALUES ('gone:1:a', now() - interval '1 minute')"))
        accepted = (await upload(client, plain_file(3))).json()
        assert accepted["workers"]["live"] == 0
        assert accepted["warning"].startswith(f"no worker has been heard from since {accepted['workers']['last_seen_at']}")


async def test_json_fields_nested_past_the_parser_are_a_422_naming_the_field(client: httpx.AsyncClient) -> None:
    """`mapping` and `consent` are JSON text of at most 64 kB: 60,000 `[` fit, and json.loads raised RecursionError,
    which only ValueError was caught for: a 500. Now the 422 `json_invalid` naming the field, as for bad JSON."""
    for field in ("mapping", "consent"):
        for value in ("[" * 60_000, '{"a":' * 10_000 + "1" + "}" * 10_000):
            answer = await upload(client, plain_file(2), **{field: value})
            problem = assert_problem(answer, 422, field)
            assert problem["errors"][0]["code"] == "json_invalid", problem


async def test_a_mapped_column_with_a_name_over_255_characters_is_a_422_naming_its_position(
    client: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """Each report line stores its column's name: a 60 KB name would cost 60 KB a bad row. Refused at upload, for a
    guessed column, a column the mapping names and an attribute column; an ignored one may be as long as it likes."""
    await make_attribute(client, "taille", "text")
    long_email = "E" + "-" * 60_000 + "mail"  # folds to `e mail`: guessed as the email column
    long_size = "Taille" + "." * 300           # folds to `taille`
    row = ["x@exemple.fr", "M", "X"]
    for header, fields in (
        ([long_email, "Taille", "Nom"], {}),
        (["Email", long_size, "Nom"], {}),
        (["Email", "Taille", long_email], {"mapping": {"Email": "email", "E mail": "last_name"}}),
    ):
        position = next(i for i, name in enumerate(header, start=1) if len(name) > 255)
        body = assert_problem(await upload(client, build_csv(header, [row]), **fields), 422, "file")
        assert f"column {position}" in body["errors"][0]["message"]
        assert body["errors"][0]["code"] == "column_name_too_long"
    assert await count(sessions, "SELECT count(*) FROM import_job") == 0
    # 255 characters is fine, and so is a longer name of a column nobody maps
    ok = build_csv(["E-mail" + " " * 249, "Taille", "Nom" + "." * 5000], [row])
    job = await run_import(client, sessions, settings, ok, mapping={"E-mail": "email", "Taille": "attributes.taille"})
    assert (job["status"], job["created"]) == ("done", 1)
