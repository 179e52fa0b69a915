"""Concurrency against a live server: 50 real HTTP clients racing on one contact (issue 8).

A real `carnet serve` (migrate, then uvicorn) runs in its own process on a free port against this test run's
database, so requests overlap across two processes and many PostgreSQL connections, the way a deployment
sees them; nothing here runs in the test's transaction. Each simulated client has its own token (rate
limits are per token) and its own connection.

- 50 read-modify-write clients with If-Match: none of the 50 effects is lost, and the version counts them.
- 50 identical creates with one Idempotency-Key: one contact, 50 identical responses.
- 50 identical creates without a key: one contact, 49 conflicts (409) naming it; the same for 50 upserts.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import metadata
from app.security import Role
from tests.auth import TEST_SECRET, bearer
from tests.factories import unique_email

pytestmark = pytest.mark.committing

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 50
MAX_ATTEMPTS = 400          # per client; with jittered retries a client needs a few dozen at worst
READY_TIMEOUT_SECONDS = 60
ADMIN = bearer()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def live_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m app serve` on a free port, against this run's (already migrated) database."""
    workdir = tmp_path_factory.mktemp("live")
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "JWT_SECRET": TEST_SECRET,
        "DATA_DIR": str(workdir),
        "LOG_LEVEL": "WARNING",
        # The machine is shared: let a waiting request queue for a pooled connection instead of
        # getting the pool-exhaustion 503, which is correct behaviour but not what this test is about.
        "DATABASE_POOL_TIMEOUT": "30",
    }
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"carnet serve exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"carnet serve not ready after {READY_TIMEOUT_SECONDS}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest_asyncio.fixture
async def http(live_server: str, engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    """One connection per simulated client; every table emptied afterwards (the writes were committed)."""
    limits = httpx.Limits(max_connections=CLIENTS + 5, max_keepalive_connections=CLIENTS + 5)
    async with httpx.AsyncClient(base_url=live_server, limits=limits, timeout=60) as client:
        yield client
    tables = ", ".join(f'"{name}"' for name in sorted(metadata.tables))
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} CASCADE"))


def _client_tokens() -> list[dict[str, str]]:
    return [bearer(Role.EDITOR, subject=f"client-{i}@shop.example") for i in range(CLIENTS)]


async def _send(http: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request, waiting out a 429 as a well-behaved client does (rate limits are per token)."""
    while True:
        response = await http.request(method, url, **kwargs)
        if response.status_code != 429:
            return response
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))


async def _contacts_with_email(http: httpx.AsyncClient, email: str) -> list[dict[str, Any]]:
    response = await http.get("/v1/contacts", params={"email": email}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["data"]  # type: ignore[no-any-return]


class TestIfMatch:
    async def test_fifty_read_modify_write_clients_lose_no_update(self, http: httpx.AsyncClient) -> None:
        counter = f"hits_{uuid.uuid4().hex[:8]}"
        made = await http.post("/v1/attributes", json={"name": counter, "type": "number"}, headers=ADMIN)
        assert made.status_code == 201, made.text
        created = await http.post("/v1/contacts", json={"email": unique_email(), "attributes": {counter: 0}},
                                  headers=ADMIN)
        assert created.status_code == 201, created.text
        contact_id, start_version = created.json()["id"], created.json()["version"]
        url = f"/v1/contacts/{contact_id}"
        conflicts = [0] * CLIENTS

        async def client(i: int, headers: dict[str, str]) -> None:
            """Read, add my tag to the list and 1 to the counter, write back under If-Match; retry on 412."""
            for _ in range(MAX_ATTEMPTS):
                current = await _send(http, "GET", url, headers=headers)
                assert current.status_code == 200, current.text
                body = current.json()
                assert current.headers["etag"] == f'"v{body["version"]}"'
                patch = {"tags": [*body["tags"], f"client-{i}"],
                         "attributes": {counter: body["attributes"][counter] + 1}}
                written = await _send(http, "PATCH", url, json=patch,
                                      headers={**headers, "If-Match": current.headers["etag"]})
                if written.status_code == 200:
                    assert written.json()["version"] > body["version"]
                    return
                assert written.status_code == 412, written.text
                assert written.headers["content-type"] == "application/problem+json"
                assert written.json()["current_version"] > body["version"]
                conflicts[i] += 1
                await asyncio.sleep(random.uniform(0, 0.005 * min(conflicts[i], 20)))  # noqa: S311 (jitter)
            pytest.fail(f"client {i} never got its write in after {MAX_ATTEMPTS} attempts")

        started = time.monotonic()
        await asyncio.gather(*(client(i, headers) for i, headers in enumerate(_client_tokens())))
        print(f"{CLIENTS} clients, {sum(conflicts)} stale writes (412) retried, {time.monotonic() - started:.1f} s")

        final = await http.get(url, headers=ADMIN)
        body = final.json()
        assert sorted(body["tags"]) == sorted(f"client-{i}" for i in range(CLIENTS))   # every effect present
        assert body["attributes"][counter] == CLIENTS                                   # no increment lost
        assert body["version"] == start_version + CLIENTS                                # one version per write
        assert final.headers["etag"] == f'"v{start_version + CLIENTS}"'
        assert sum(conflicts) > 0, "the clients never raced: this test proves nothing"

    async def test_a_stale_etag_is_refused_and_changes_nothing(self, http: httpx.AsyncClient) -> None:
        created = await http.post("/v1/contacts", json={"email": unique_email()}, headers=ADMIN)
        contact_id = created.json()["id"]
        first = await http.patch(f"/v1/contacts/{contact_id}", json={"job_title": "Buyer"},
                                 headers={**ADMIN, "If-Match": created.headers["etag"]})
        assert first.status_code == 200
        stale = await http.patch(f"/v1/contacts/{contact_id}", json={"job_title": "Owner"},
                                 headers={**ADMIN, "If-Match": created.headers["etag"]})
        assert stale.status_code == 412
        assert stale.json()["current_version"] == first.json()["version"]
        assert (await http.get(f"/v1/contacts/{contact_id}", headers=ADMIN)).json()["job_title"] == "Buyer"


class TestIdenticalCreates:
    async def test_fifty_creates_with_one_idempotency_key_make_one_contact_and_one_answer(
        self, http: httpx.AsyncClient
    ) -> None:
        email = unique_email()
        headers = {**ADMIN, "Idempotency-Key": f"signup-{uuid.uuid4()}"}
        body = {"email": email, "first_name": "Claire", "tags": ["vip"]}
        responses = await asyncio.gather(
            *(_send(http, "POST", "/v1/contacts", json=body, headers=headers) for _ in range(CLIENTS))
        )
        assert [r.status_code for r in responses] == [201] * CLIENTS, {r.status_code: r.text for r in responses}
        first = responses[0]
        for response in responses:
            assert response.json() == first.json()
            assert response.headers["etag"] == first.headers["etag"]
            assert response.headers["location"] == first.headers["location"] == f"/v1/contacts/{first.json()['id']}"
        assert [c["id"] for c in await _contacts_with_email(http, email)] == [first.json()["id"]]

    async def test_fifty_creates_without_a_key_make_one_contact_and_49_conflicts(
        self, http: httpx.AsyncClient
    ) -> None:
        email = unique_email()
        responses = await asyncio.gather(
            *(_send(http, "POST", "/v1/contacts", json={"email": email}, headers=headers)
              for headers in _client_tokens())
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] + [409] * (CLIENTS - 1), statuses
        winner = next(r for r in responses if r.status_code == 201).json()["id"]
        conflicts = [r for r in responses if r.status_code == 409]
        assert {r.headers["content-type"] for r in conflicts} == {"application/problem+json"}
        assert {r.json()["type"].rsplit("/", 1)[-1] for r in conflicts} == {"duplicate-contact"}
        assert {r.json()["existing_id"] for r in conflicts} == {winner}
        assert [c["id"] for c in await _contacts_with_email(http, email)] == [winner]

    async def test_fifty_identical_upserts_make_one_contact(self, http: httpx.AsyncClient) -> None:
        email = unique_email()
        body = {"external_id": f"shop-{uuid.uuid4().hex[:8]}", "email": email, "first_name": "Claire"}
        responses = await asyncio.gather(
            *(_send(http, "POST", "/v1/contacts/upsert", json=body, headers=headers) for headers in _client_tokens())
        )
        assert sorted(r.status_code for r in responses) == [200] * (CLIENTS - 1) + [201]
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        assert [c["id"] for c in await _contacts_with_email(http, email)] == list(ids)
