"""Authentication and scopes: real tokens, forged tokens built by hand (never by the library under test)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.db import plain_dsn
from app.main import create_app
from app.security import ROLE_SCOPES, Role, Scope
from app.security.revocation import RevocationList
from app.security.tokens import InvalidToken, TokenSigner
from app.settings import Settings
from tests.auth import TEST_SECRET, bearer

OPEN_PREFIXES = ("/v1/public/", "/v1/inbound/")
NO_SCOPE_NEEDED = {"GET /v1/me"}  # any valid token may ask who it is


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forge(claims: dict[str, Any] | None = None, *, header: dict[str, Any] | None = None,
          secret: str = TEST_SECRET, drop: tuple[str, ...] = ()) -> str:
    now = int(time.time())
    body = {"sub": "mallory", "role": "admin", "scopes": sorted(ROLE_SCOPES[Role.ADMIN]), "iat": now,
            "exp": now + 600, "jti": uuid.uuid4().hex, **(claims or {})}
    for name in drop:
        body.pop(name)
    head = header or {"alg": "HS256", "typ": "JWT"}
    signing_input = f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(body).encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _tampered_payload() -> str:
    head, _, sig = forge({"role": "viewer", "scopes": ["contacts:read"]}).split(".")
    _, payload, _ = forge().split(".")
    return f"{head}.{payload}.{sig}"


def _tampered_signature() -> str:
    token = forge()
    return token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")


FORGED = {
    "forged_helper_valid_control": None,  # placeholder removed below; keeps ids readable
    "tampered_payload": _tampered_payload(),
    "tampered_signature": _tampered_signature(),
    "wrong_secret": forge(secret="another-secret-" + "y" * 40),
    "alg_none": forge(header={"alg": "none", "typ": "JWT"}).rsplit(".", 1)[0] + ".",
    "alg_None": forge(header={"alg": "None"}).rsplit(".", 1)[0] + ".",
    "alg_NONE": forge(header={"alg": "NONE"}),
    "alg_HS512": forge(header={"alg": "HS512"}),
    "alg_RS256": forge(header={"alg": "RS256"}),
    "alg_ES256": forge(header={"alg": "ES256"}),
    "alg_missing": forge(header={"typ": "JWT"}),
    "typ_unknown": forge(header={"alg": "HS256", "typ": "JWE"}),
    "crit_header": forge(header={"alg": "HS256", "crit": ["exp"]}),
    "jku_header": forge(header={"alg": "HS256", "jku": "https://evil.example/keys"}),
    "expired": forge({"exp": int(time.time()) - 120}),
    "not_yet_valid": forge({"nbf": int(time.time()) + 3600}),
    "future_iat": forge({"iat": int(time.time()) + 3600}),
    "missing_exp": forge(drop=("exp",)),
    "missing_iat": forge(drop=("iat",)),
    "missing_sub": forge(drop=("sub",)),
    "missing_jti": forge(drop=("jti",)),
    "missing_role": forge(drop=("role",)),
    "missing_scopes": forge(drop=("scopes",)),
    "empty_sub": forge({"sub": ""}),
    "unknown_role": forge({"role": "root"}),
    "unknown_scope": forge({"scopes": ["contacts:read", "everything:all"]}),
    "scopes_beyond_role": forge({"role": "viewer", "scopes": ["contacts:read", "contacts:write"]}),
    "scopes_not_a_list": forge({"scopes": "contacts:read"}),
    "exp_as_string": forge({"exp": "9999999999"}),
    "iat_as_bool": forge({"iat": True}),
    "jwe_five_parts": "eyJhbGciOiJkaXIiLCJlbmMiOiJBMTI4R0NNIn0..aGVsbG8.d29ybGQ.dGFn",
    "two_parts": ".".join(forge().split(".")[:2]),
    "four_parts": forge() + ".extra",
    "oversized": forge({"pad": "x" * 5000}),
    "garbage": "not-a-token",
    "garbage_dots": "a.b.c",
    "header_not_json": _b64(b"hello") + "." + forge().split(".", 1)[1],
    "header_is_list": _b64(b"[1,2]") + "." + forge().split(".", 1)[1],
    # under MAX_TOKEN_BYTES, nested past the JSON parser's limit: RecursionError, once a 500 before any signature
    "header_nested_too_deep": _b64(b"[" * 1500) + "." + forge().split(".", 1)[1],
    "empty_signature": forge().rsplit(".", 1)[0] + ".",
    "unicode": "tökén.ünïcode.sïg",
    "signed_with_empty_secret": forge(secret=""),
}
del FORGED["forged_helper_valid_control"]


class TestForgedTokens:
    def test_there_are_at_least_40(self) -> None:
        assert len(FORGED) >= 40

    async def test_the_helper_makes_valid_tokens(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/contacts", headers={"Authorization": f"Bearer {forge()}"})
        assert response.status_code == 200, response.text

    @pytest.mark.parametrize("name", sorted(FORGED))
    async def test_is_refused_with_401(self, client: httpx.AsyncClient, name: str) -> None:
        value = f"Bearer {FORGED[name]}".encode()  # bytes: some forged tokens are not ASCII
        response = await client.get("/v1/contacts", headers={"Authorization": value})
        assert response.status_code == 401, (name, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["content-type"] == "application/problem+json"


class TestAuthentication:
    async def test_anonymous_is_401(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/contacts")
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")

    async def test_other_scheme_is_401(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/contacts", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert response.status_code == 401

    async def test_missing_scope_is_403_naming_it(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/contacts", json={"email": "a@example.com"}, headers=bearer(Role.VIEWER))
        assert response.status_code == 403
        assert response.json()["missing_scopes"] == ["contacts:write"]
        listing = await client.get("/v1/contacts", params={"email": "a@example.com"}, headers=bearer())
        assert listing.json()["data"] == []

    async def test_narrowed_token_loses_the_dropped_scopes(self, client: httpx.AsyncClient) -> None:
        narrow = bearer(Role.ADMIN, scopes={Scope.CONTACTS_READ})
        assert (await client.get("/v1/contacts", headers=narrow)).status_code == 200
        assert (await client.post("/v1/tags", json={"name": "x"}, headers=narrow)).status_code == 403


class TestTokens:
    async def test_issue_use_and_revoke(self, client: httpx.AsyncClient) -> None:
        issued = await client.post("/v1/tokens", json={"subject": "intern@shop.example", "role": "viewer"},
                                   headers=bearer(subject="owner@shop.example"))
        assert issued.status_code == 201, issued.text
        token = {"Authorization": f"Bearer {issued.json()['token']}"}
        me = (await client.get("/v1/me", headers=token)).json()
        assert (me["subject"], me["role"]) == ("intern@shop.example", "viewer")
        assert "pii:read" not in me["scopes"] and "contacts:read" in me["scopes"]
        listed = (await client.get("/v1/tokens", headers=bearer())).json()
        row = next(t for t in listed if t["jti"] == issued.json()["jti"])
        assert row["issued_by"] == "owner@shop.example" and "token" not in row
        revoked = await client.delete(f"/v1/tokens/{issued.json()['jti']}", headers=bearer(subject="owner@shop.example"))
        assert revoked.json()["revoked_by"] == "owner@shop.example"
        after = await client.get("/v1/me", headers=token)
        assert after.status_code == 401 and after.json()["detail"] == "token revoked"

    async def test_narrowing_works_and_widening_is_422(self, client: httpx.AsyncClient) -> None:
        narrow = await client.post("/v1/tokens", json={"subject": "s", "role": "editor", "scopes": ["contacts:read"]},
                                   headers=bearer())
        assert narrow.status_code == 201
        wide = await client.post("/v1/tokens", json={"subject": "s", "role": "viewer", "scopes": ["tokens:admin"]},
                                 headers=bearer())
        assert wide.status_code == 422 and wide.json()["errors"][0]["field"] == "scopes"

    async def test_a_narrowed_token_mints_no_scope_it_lacks(self, client: httpx.AsyncClient) -> None:
        """A token narrowed to tokens:admin (an automation that rotates tokens, kept away from the data) could mint a
        full admin token, pii:read and journal:read included: every scope it was denied, by another route. It may
        mint only scopes it holds (403 naming the others); an admin token holding every scope is unchanged."""
        rotator = bearer(Role.ADMIN, scopes={Scope.TOKENS_ADMIN, Scope.CONTACTS_READ}, subject="rotator@shop.example")
        for body in ({"subject": "s", "role": "admin"}, {"subject": "s", "role": "viewer"},
                     {"subject": "s", "role": "editor", "scopes": ["contacts:read", "pii:read"]}):
            denied = await client.post("/v1/tokens", json=body, headers=rotator)
            assert denied.status_code == 403, (body, denied.text)
            assert "pii:read" in denied.json()["missing_scopes"] or "consents:read" in denied.json()["missing_scopes"]
        allowed = await client.post("/v1/tokens", json={"subject": "s", "role": "viewer", "scopes": ["contacts:read"]},
                                    headers=rotator)
        assert allowed.status_code == 201, allowed.text
        full = await client.post("/v1/tokens", json={"subject": "s", "role": "admin"}, headers=bearer())
        assert full.status_code == 201, full.text

    async def test_only_admins_manage_tokens(self, client: httpx.AsyncClient) -> None:
        for role in (Role.MANAGER, Role.EDITOR, Role.VIEWER, Role.INTEGRATION):
            response = await client.post("/v1/tokens", json={"subject": "s", "role": "admin"}, headers=bearer(role))
            assert response.status_code == 403, role

    async def test_unknown_token_id_is_404(self, client: httpx.AsyncClient) -> None:
        assert (await client.delete("/v1/tokens/nope", headers=bearer())).status_code == 404

    async def test_the_list_is_a_bare_array_cut_at_limit(self, client: httpx.AsyncClient) -> None:
        # A documented deviation from the {data, next_cursor} pages (docs/decisions.md): pinned here.
        for _ in range(3):
            assert (await client.post("/v1/tokens", json={"subject": "s", "role": "viewer"},
                                      headers=bearer())).status_code == 201
        listed = await client.get("/v1/tokens", params={"limit": 2}, headers=bearer())
        assert listed.status_code == 200 and isinstance(listed.json(), list) and len(listed.json()) == 2
        issued = [t["issued_at"] for t in listed.json()]
        assert issued == sorted(issued, reverse=True)  # newest first
        too_many = await client.get("/v1/tokens", params={"limit": 1001}, headers=bearer())
        assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "limit"


class TestRevocationAcrossProcesses:
    @pytest.mark.committing
    async def test_a_listening_process_learns_of_a_revocation(
        self, committing_client: httpx.AsyncClient, database_url: str
    ) -> None:
        other_process = RevocationList()  # what another API process holds
        other_process.start(plain_dsn(database_url))
        try:
            for _ in range(50):
                if other_process.is_revoked("x") is not None:
                    break
                await asyncio.sleep(0.1)
            issued = (await committing_client.post("/v1/tokens", json={"subject": "s", "role": "viewer"},
                                                   headers=bearer())).json()
            assert other_process.is_revoked(issued["jti"]) is False
            await committing_client.delete(f"/v1/tokens/{issued['jti']}", headers=bearer())
            for _ in range(50):
                if other_process.is_revoked(issued["jti"]):
                    break
                await asyncio.sleep(0.05)
            assert other_process.is_revoked(issued["jti"]) is True
        finally:
            await other_process.stop()


class TestRateLimit:
    async def test_a_token_over_its_rate_gets_429_with_retry_after(self, settings: Settings,
                                                                   client: httpx.AsyncClient, app: FastAPI) -> None:
        limited = create_app(settings.model_copy(update={"rate_limit_per_second": 0.5, "rate_limit_burst": 3}))
        limited.dependency_overrides = app.dependency_overrides
        limited.state.sessionmaker = app.state.sessionmaker
        headers = bearer()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=limited), base_url="http://test") as http:
            statuses = [(await http.get("/v1/me", headers=headers)).status_code for _ in range(4)]
            last = await http.get("/v1/me", headers=headers)
        assert statuses == [200, 200, 200, 429]
        assert last.status_code == 429 and int(last.headers["retry-after"]) >= 1
        assert last.headers["content-type"] == "application/problem+json"


class TestScopesAreDeclared:
    def test_every_v1_operation_declares_scopes(self, app: FastAPI) -> None:
        """Read from the OpenAPI document (never app.routes): no operation is open by accident."""
        missing = []
        for path, operations in app.openapi()["paths"].items():
            if not path.startswith("/v1/") or path.startswith(OPEN_PREFIXES):
                continue
            for method, operation in operations.items():
                scopes = [s for requirement in operation.get("security", []) for s in requirement.get("HTTPBearer", [])]
                if not scopes and f"{method.upper()} {path}" not in NO_SCOPE_NEEDED:
                    missing.append(f"{method.upper()} {path}")
        assert missing == []


class TestVerifiedTokenCache:
    def test_a_cached_token_still_expires(self) -> None:
        signer = TokenSigner(TEST_SECRET)
        token = forge({"exp": int(time.time()) + 1})
        assert signer.verify(token).subject == "mallory"
        time.sleep(0.1)
        assert signer.verify(token).subject == "mallory"  # from the cache
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(time, "time", lambda: time.monotonic() + 10**10)
            with pytest.raises(InvalidToken, match="expired"):
                signer.verify(token)
        assert token not in signer._verified
