"""Health, metrics, error shapes, settings and the OpenAPI snapshot."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.db import get_sessionmaker, make_engine, make_sessionmaker
from app.main import create_app
from app.settings import ConfigurationError, Settings
from tests.factories import ADMIN, unique_email

ROOT = Path(__file__).resolve().parents[1]


class TestProbes:
    async def test_healthz(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/healthz")).json() == {"status": "ok"}

    async def test_readyz_reports_the_schema_head(self, client: httpx.AsyncClient, app: FastAPI) -> None:
        response = await client.get("/readyz")
        assert response.status_code == 200
        assert response.json()["schema"] == app.state.schema_head

    async def test_metrics_are_prometheus_text(self, client: httpx.AsyncClient) -> None:
        await client.get("/healthz")
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert "carnet_http_request_duration_seconds_bucket" in response.text


    async def test_metrics_labels_stay_bounded_whatever_method_clients_send(self, client: httpx.AsyncClient) -> None:
        """The method label is the client's: any method Carnet does not serve counts as `other`, so a client making
        up methods cannot grow the series (memory, and every scrape) without end."""
        for n in range(20):
            await client.request(f"XMETHOD{n}", "/v1/contacts", headers=ADMIN)
        text = (await client.get("/metrics")).text
        assert "XMETHOD" not in text
        assert 'method="other",route="unmatched",status="405"' in text

    async def test_metrics_route_label_is_the_template_the_client_called_and_stays_bounded(
        self, client: httpx.AsyncClient
    ) -> None:
        """A route of a router included under `/v1` was labelled without it (`/lists`, `/contacts/{contact_id}`),
        while `/v1/contacts/duplicates` kept it: a dashboard could not tell `/v1/...` from the same path elsewhere."""
        contact = (await client.post("/v1/contacts", json={"email": unique_email()}, headers=ADMIN)).json()
        odd = f"x{uuid.uuid4().hex}"
        for path in (f"/v1/contacts/{contact['id']}", "/v1/lists", f"/v1/lists/{odd}", "/v1/contacts/duplicates",
                     "/healthz", f"/v1/{odd}", f"/v1/contacts/{contact['id']}/{odd}", f"/docs/assets/{odd}.js"):
            await client.get(path, headers=ADMIN)
        preview = {"filter": {"field": "kind", "op": "eq", "value": "customer"}}  # through the costly-read gate
        assert (await client.post("/v1/segments/preview", json=preview, headers=ADMIN)).status_code == 200
        text = (await client.get("/metrics")).text
        routes = {line.split('route="', 1)[1].split('"', 1)[0] for line in text.splitlines()
                  if line.startswith("carnet_http_request_duration_seconds_count")}
        assert {"/v1/contacts", "/v1/contacts/{contact_id}", "/v1/lists", "/v1/lists/{list_id}",
                "/v1/segments/preview", "/v1/contacts/duplicates", "/healthz", "unmatched"} <= routes
        assert {"/contacts", "/contacts/{contact_id}", "/lists"}.isdisjoint(routes)
        assert odd not in text and contact["id"] not in text  # nothing the client typed but a template

    async def test_readyz_refuses_a_schema_behind_or_absent_naming_carnet_migrate(
        self, settings: Settings, fresh_database: str
    ) -> None:
        from app.migrations import upgrade

        app = create_app(settings)
        engine = make_engine(fresh_database, pool_timeout=5)
        app.state.sessionmaker = make_sessionmaker(engine)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
                empty = await http.get("/readyz")
                await asyncio.to_thread(upgrade, fresh_database, "0013")
                behind = await http.get("/readyz")
        finally:
            await engine.dispose()
        assert (empty.status_code, behind.status_code) == (503, 503)
        assert "nothing (no migration ran)" in empty.json()["detail"] and "carnet migrate" in empty.json()["detail"]
        assert behind.json()["detail"] == f"schema at 0013, code expects {app.state.schema_head}: run `carnet migrate`"


class TestErrorShapes:
    async def test_unknown_route_is_a_404_problem(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/nowhere", headers=ADMIN)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"

    async def test_wrong_method_is_a_405_problem(self, client: httpx.AsyncClient) -> None:
        response = await client.put("/v1/contacts", headers=ADMIN)
        assert response.status_code == 405
        assert response.json()["status"] == 405

    async def test_every_response_carries_a_request_id(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/contacts", headers={**ADMIN, "X-Request-ID": "abc-123"})
        assert response.headers["x-request-id"] == "abc-123"


class TestRaces:
    @pytest.mark.committing
    async def test_concurrent_creates_of_one_email_make_one_contact(self, committing_client: httpx.AsyncClient) -> None:
        email = unique_email()
        responses = await asyncio.gather(
            *(committing_client.post("/v1/contacts", json={"email": email}, headers=ADMIN) for _ in range(10))
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] + [409] * 9
        winner = next(r for r in responses if r.status_code == 201).json()["id"]
        assert {r.json()["existing_id"] for r in responses if r.status_code == 409} == {winner}

    @pytest.mark.committing
    async def test_concurrent_upserts_of_one_key_make_one_contact(self, committing_client: httpx.AsyncClient) -> None:
        body = {"external_id": "race-1", "email": unique_email()}
        responses = await asyncio.gather(
            *(committing_client.post("/v1/contacts/upsert", json=body, headers=ADMIN) for _ in range(10))
        )
        assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
        assert len({r.json()["id"] for r in responses}) == 1

    @pytest.mark.committing
    async def test_concurrent_idempotent_creates_replay_one_response(
        self, committing_client: httpx.AsyncClient
    ) -> None:
        headers = {**ADMIN, "Idempotency-Key": "race-key"}
        body = {"email": unique_email()}
        responses = await asyncio.gather(
            *(committing_client.post("/v1/contacts", json=body, headers=headers) for _ in range(10))
        )
        assert {r.status_code for r in responses} == {201}
        assert len({r.json()["id"] for r in responses}) == 1


class TestSettings:
    def test_database_url_without_jwt_secret_refuses_to_boot(self) -> None:
        settings = Settings(database_url="postgresql://db/carnet", jwt_secret=None, _env_file=None)  # type: ignore[call-arg]
        with pytest.raises(ConfigurationError, match="JWT_SECRET"):
            create_app(settings)

    def test_embedded_mode_keeps_one_generated_secret(self, tmp_path: Path) -> None:
        settings = Settings(database_url=None, jwt_secret=None, data_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
        first = settings.resolved_jwt_secret()
        assert len(first) >= 32 and settings.resolved_jwt_secret() == first
        assert (tmp_path / "jwt_secret").stat().st_mode & 0o077 == 0


class TestOpenAPISnapshot:
    def test_every_422_is_documented_as_a_problem(self, app: FastAPI) -> None:
        # Found by schemathesis: public routes documented FastAPI's own 422 shape, never answered.
        for path, operations in app.openapi()["paths"].items():
            for method, operation in operations.items():
                if "422" in operation["responses"]:
                    content = list(operation["responses"]["422"]["content"])
                    assert content == ["application/problem+json"], (method, path)
        assert "HTTPValidationError" not in app.openapi()["components"]["schemas"]

    def test_committed_document_matches_the_app(self, app: FastAPI) -> None:
        committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
        assert committed == json.loads(json.dumps(app.openapi())), "run `carnet openapi` and commit the result"


class TestFailures:
    async def test_unexpected_error_is_a_fixed_500_and_logs_no_personal_data(
        self, settings: Settings, caplog: pytest.LogCaptureFixture
    ) -> None:
        app = create_app(settings)

        async def explode() -> None:
            raise RuntimeError("duplicate key (email)=(claire@example.com)")

        app.add_api_route("/boom", explode)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            response = await http.get("/boom")
        assert response.status_code == 500
        assert response.json()["detail"] == "An unexpected error occurred; it has been logged with this request's id."
        assert "claire@example.com" not in caplog.text
        assert "request.crashed" in caplog.text

    async def test_unreachable_database_is_a_503_problem(self, settings: Settings) -> None:
        app = create_app(settings)
        engine = make_engine("postgresql://postgres@127.0.0.1:9/none", pool_timeout=1)
        app.state.sessionmaker = make_sessionmaker(engine)
        app.dependency_overrides[get_sessionmaker] = lambda: app.state.sessionmaker
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            response = await http.get(f"/v1/contacts/{uuid.uuid4()}", headers=ADMIN)
        await engine.dispose()
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "2"

    async def test_logs_carry_no_personal_data(
        self, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)  # successes log at debug
        email = "very.private@example.com"
        await client.post("/v1/contacts", json={"email": email, "phone": "0612345678"}, headers=ADMIN)
        await client.get("/v1/contacts", params={"email": email, "q": "0612345678"}, headers=ADMIN)
        assert caplog.text and email not in caplog.text and "612345678" not in caplog.text

    async def test_fastapi_telemetry_never_sees_a_request(
        self, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """FastAPI's own OpenTelemetry is off: its logs would carry a rejected body's values (personal data), and
        asking the global providers on each request cost ~4% of an upsert's CPU (docs/performance.md)."""
        from opentelemetry import _logs, metrics, trace

        asked: list[str] = []
        for module, name in ((trace, "get_tracer_provider"), (metrics, "get_meter_provider"),
                             (_logs, "get_logger_provider")):
            monkeypatch.setattr(module, name, lambda name=name: asked.append(name))
        await client.post("/v1/contacts", json={"email": "not an email"}, headers=ADMIN)
        await client.post("/v1/contacts/upsert", json={"email": unique_email()}, headers=ADMIN)
        assert (await client.get("/healthz")).status_code == 200
        assert asked == []


class TestProductionReadPath:
    @pytest.mark.committing
    async def test_reads_through_autocommit_sessions_see_committed_writes(
        self, committing_client: httpx.AsyncClient
    ) -> None:
        created = (await committing_client.post("/v1/contacts", json={"email": unique_email(), "first_name": "Lou"},
                                                headers=ADMIN)).json()
        listed = await committing_client.get("/v1/contacts", params={"email": created["email"]}, headers=ADMIN)
        assert [c["id"] for c in listed.json()["data"]] == [created["id"]]
        history = await committing_client.get(f"/v1/contacts/{created['id']}/history", headers=ADMIN)
        assert [h["field"] for h in history.json()["data"]] == ["created"]
