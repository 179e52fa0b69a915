"""EdDSA (Ed25519, RFC 8037) deployments: kid rotation, forged tokens refused, issuance by API and CLI.

Tokens are forged by the small helpers below (cryptography's primitives, by hand), never by
app.security.tokens: the code under test only ever verifies them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from fastapi import FastAPI
from pydantic import SecretStr

from app.main import create_app
from app.security import ROLE_SCOPES, Role
from app.settings import ConfigurationError, Settings
from tests.auth import TEST_SECRET

ROOT = Path(__file__).resolve().parents[1]
ISSUER, AUDIENCE = "https://carnet.test", "carnet-api"
KEYS = {kid: ed25519.Ed25519PrivateKey.generate() for kid in ("k1", "k2", "rogue")}
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _segment(value: Any) -> str:
    return _b64(value if isinstance(value, bytes) else json.dumps(value).encode())


def _claims(claims: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    now = int(time.time())
    body = {"sub": "mallory", "role": "admin", "scopes": sorted(ROLE_SCOPES[Role.ADMIN]), "iat": now, "nbf": now,
            "exp": now + 600, "jti": uuid.uuid4().hex, "iss": ISSUER, "aud": AUDIENCE, **(claims or {})}
    for name in drop:
        body.pop(name)
    return body


def eddsa(claims: dict[str, Any] | None = None, *, kid: str | None = "k1", key: str = "k1",
          header: dict[str, Any] | None = None, drop: tuple[str, ...] = (), payload: bytes | None = None) -> str:
    """An Ed25519-signed JWS compact token: by default valid for the test deployment (signing kid k1)."""
    head = header if header is not None else {"alg": "EdDSA", "typ": "JWT", **({"kid": kid} if kid else {})}
    body = payload if payload is not None else _claims(claims, drop)
    signing_input = f"{_segment(head)}.{_segment(body)}"
    return f"{signing_input}.{_b64(KEYS[key].sign(signing_input.encode()))}"


def hs256(secret: bytes, header: dict[str, Any], claims: dict[str, Any] | None = None,
          drop: tuple[str, ...] = ()) -> str:
    signing_input = f"{_segment(header)}.{_segment(_claims(claims, drop))}"
    return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def rs256(header: dict[str, Any]) -> str:
    signing_input = f"{_segment(header)}.{_segment(_claims())}"
    signature = RSA_KEY.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def _public_pem(kid: str) -> bytes:
    return KEYS[kid].public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify_by_hand(token: str, kid: str) -> dict[str, Any]:
    """What a third party holding the public key does: check the signature, read the payload."""
    head, payload, signature = token.split(".")
    KEYS[kid].public_key().verify(base64.urlsafe_b64decode(signature + "=="), f"{head}.{payload}".encode())
    return {"header": json.loads(base64.urlsafe_b64decode(head + "==")),
            "claims": json.loads(base64.urlsafe_b64decode(payload + "=="))}


def _with_last_char(token: str, char: str) -> str:
    return token[:-1] + char


def _non_canonical_signature() -> str:
    """Same signature bytes, other text: the unused low bits of the last base64url character set."""
    token = eddsa()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    variant = _with_last_char(token, alphabet[alphabet.index(token[-1]) ^ 1])
    assert base64.urlsafe_b64decode(variant.rsplit(".", 1)[1] + "==") == \
        base64.urlsafe_b64decode(token.rsplit(".", 1)[1] + "==")
    return variant


def _tampered_payload() -> str:
    head, _, signature = eddsa({"role": "viewer", "scopes": ["contacts:read"]}).split(".")
    return f"{head}.{eddsa().split('.')[1]}.{signature}"


def _tampered_signature() -> str:
    head, payload, signature = eddsa().split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[10] ^= 0x01
    return f"{head}.{payload}.{_b64(bytes(raw))}"


NOW = int(time.time())
FORGED = {
    # signature
    "tampered_payload": _tampered_payload(),
    "tampered_signature": _tampered_signature(),
    "signature_non_canonical_base64": _non_canonical_signature(),
    "signature_padded": eddsa() + "==",
    "signature_truncated": eddsa()[:-2],
    "signature_empty": eddsa().rsplit(".", 1)[0] + ".",
    "another_ed25519_key_claiming_kid_k1": eddsa(key="rogue", kid="k1"),
    "key_k2_claiming_kid_k1": eddsa(key="k2", kid="k1"),
    "payload_not_json_validly_signed": eddsa(payload=b"hello"),
    "payload_is_a_list_validly_signed": eddsa(payload=b"[1, 2]"),
    # algorithm confusion: the key is the deployment's, whatever the token says
    "hs256_signed_with_the_ed25519_public_pem": hs256(_public_pem("k1"), {"alg": "HS256", "typ": "JWT", "kid": "k1"}),
    "hs256_public_pem_no_kid": hs256(_public_pem("k1"), {"alg": "HS256", "typ": "JWT"}),
    "eddsa_header_hmac_over_public_pem": hs256(_public_pem("k1"), {"alg": "EdDSA", "typ": "JWT", "kid": "k1"}),
    "hs256_with_the_jwt_secret": hs256(b"eddsa-suite-secret-" + b"s" * 40, {"alg": "HS256", "typ": "JWT"}),
    "rs256_token": rs256({"alg": "RS256", "typ": "JWT", "kid": "k1"}),
    "alg_none": eddsa(header={"alg": "none", "typ": "JWT", "kid": "k1"}).rsplit(".", 1)[0] + ".",
    "alg_None": eddsa(header={"alg": "None", "kid": "k1"}).rsplit(".", 1)[0] + ".",
    "alg_NONE": eddsa(header={"alg": "NONE", "kid": "k1"}),
    "alg_lowercase_eddsa": eddsa(header={"alg": "eddsa", "typ": "JWT", "kid": "k1"}),
    "alg_Ed25519": eddsa(header={"alg": "Ed25519", "typ": "JWT", "kid": "k1"}),
    "alg_missing": eddsa(header={"typ": "JWT", "kid": "k1"}),
    # keys
    "unknown_kid": eddsa(key="rogue", kid="rogue"),
    "missing_kid": eddsa(kid=None),
    "kid_not_a_string": eddsa(header={"alg": "EdDSA", "kid": ["k1"]}),
    "jwk_header_with_own_key": eddsa(key="rogue", header={
        "alg": "EdDSA", "kid": "k1", "jwk": {"kty": "OKP", "crv": "Ed25519",
                                              "x": _b64(KEYS["rogue"].public_key().public_bytes_raw())}}),
    "jku_header": eddsa(header={"alg": "EdDSA", "kid": "k1", "jku": "https://evil.example/keys"}),
    "crit_header": eddsa(header={"alg": "EdDSA", "kid": "k1", "crit": ["exp"]}),
    "typ_unknown": eddsa(header={"alg": "EdDSA", "kid": "k1", "typ": "JWE"}),
    # time claims
    "expired": eddsa({"exp": NOW - 120}),
    "expired_just_beyond_leeway": eddsa({"exp": NOW - 45}),
    "not_yet_valid": eddsa({"nbf": NOW + 3600}),
    "future_iat": eddsa({"iat": NOW + 3600}),
    "exp_as_string": eddsa({"exp": str(NOW + 600)}),
    "nbf_as_string": eddsa({"nbf": str(NOW)}),
    "iat_as_bool": eddsa({"iat": True}),
    "exp_infinity": eddsa({"exp": float("inf")}),
    "iat_nan": eddsa({"iat": float("nan")}),
    "exp_beyond_year_9999": eddsa({"exp": 10**20}),
    # required claims
    "missing_exp": eddsa(drop=("exp",)),
    "missing_iat": eddsa(drop=("iat",)),
    "missing_sub": eddsa(drop=("sub",)),
    "missing_jti": eddsa(drop=("jti",)),
    "missing_role": eddsa(drop=("role",)),
    "missing_scopes": eddsa(drop=("scopes",)),
    "empty_sub": eddsa({"sub": ""}),
    "sub_not_a_string": eddsa({"sub": 42}),
    "unknown_role": eddsa({"role": "root"}),
    "scopes_beyond_role": eddsa({"role": "viewer", "scopes": ["contacts:read", "contacts:write"]}),
    # issuer and audience (configured in this deployment)
    "wrong_iss": eddsa({"iss": "https://evil.example"}),
    "missing_iss": eddsa(drop=("iss",)),
    "wrong_aud": eddsa({"aud": "another-api"}),
    "aud_list_without_us": eddsa({"aud": ["another-api", "third-api"]}),
    "missing_aud": eddsa(drop=("aud",)),
    "aud_not_a_string": eddsa({"aud": 7}),
    # shape
    "jwe_five_parts": "eyJhbGciOiJkaXIiLCJlbmMiOiJBMTI4R0NNIn0..aGVsbG8.d29ybGQ.dGFn",
    "two_parts": ".".join(eddsa().split(".")[:2]),
    "four_parts": eddsa() + ".extra",
    "oversized": eddsa({"pad": "x" * 5000}),
    "garbage": "not-a-token",
    "garbage_dots": "a.b.c",
    "header_not_json": _b64(b"hello") + "." + eddsa().split(".", 1)[1],
    "unicode": "tökén.ünïcode.sïg",
    "empty": "",
}


def _settings(base: Settings, tmp: Path, *, signing: str = "k1", public: tuple[str, ...] = ("k1", "k2"),
              **update: Any) -> Settings:
    return base.model_copy(update={
        "jwt_secret": SecretStr("eddsa-suite-secret-" + "s" * 40),
        "jwt_algorithm": "EdDSA", "jwt_private_key_file": tmp / f"{signing}.key.pem", "jwt_signing_kid": signing,
        "jwt_public_key_files": {kid: tmp / f"{kid}.pub.pem" for kid in public}, **update,
    })


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ed25519")
    for kid, key in KEYS.items():
        (tmp / f"{kid}.key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (tmp / f"{kid}.pub.pem").write_bytes(_public_pem(kid))
    (tmp / "rsa.key.pem").write_bytes(RSA_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp / "rsa.pub.pem").write_bytes(RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp / "k1.encrypted.key.pem").write_bytes(KEYS["k1"].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    return tmp


@pytest.fixture(scope="module")
def eddsa_app(settings: Settings, key_dir: Path) -> FastAPI:
    return create_app(_settings(settings, key_dir, jwt_issuer=ISSUER, jwt_audience=AUDIENCE))


def _attach(target: FastAPI, source: FastAPI) -> httpx.AsyncClient:
    """A client on `target` using the test transaction of `source` (the `client` fixture's app)."""
    target.dependency_overrides = source.dependency_overrides
    target.state.sessionmaker = source.state.sessionmaker
    target.state.replica_sessionmaker = source.state.replica_sessionmaker
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=target), base_url="http://test")


@pytest_asyncio.fixture(loop_scope="session")
async def http(eddsa_app: FastAPI, app: FastAPI, client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    async with _attach(eddsa_app, app) as http:
        yield http


async def _me(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.get("/v1/me", headers={"Authorization": f"Bearer {token}".encode()})


class TestValidTokens:
    async def test_a_token_signed_by_the_helper_is_accepted(self, http: httpx.AsyncClient) -> None:
        response = await _me(http, eddsa({"sub": "alice@shop.example"}))
        assert response.status_code == 200, response.text
        assert response.json()["subject"] == "alice@shop.example"
        contacts = await http.get("/v1/contacts", headers={"Authorization": f"Bearer {eddsa()}"})
        assert contacts.status_code == 200, contacts.text

    async def test_audience_in_a_list_and_clock_skew_within_the_leeway(self, http: httpx.AsyncClient) -> None:
        now = int(time.time())
        assert (await _me(http, eddsa({"aud": ["other", AUDIENCE]}))).status_code == 200
        skewed = eddsa({"iat": now + 10, "nbf": now + 10, "exp": now - 10 + 600})
        assert (await _me(http, skewed)).status_code == 200
        assert (await _me(http, eddsa({"exp": now - 5}))).status_code == 200  # expired 5 s ago: within 30 s


class TestForgedTokens:
    def test_there_are_at_least_40(self) -> None:
        assert len(FORGED) >= 40

    @pytest.mark.parametrize("name", sorted(FORGED))
    async def test_is_refused_with_401(self, http: httpx.AsyncClient, name: str) -> None:
        response = await _me(http, FORGED[name])
        assert response.status_code == 401, (name, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["content-type"] == "application/problem+json"


class TestTheSameClaimRulesForHs256:
    """`_check_registered_claims` runs for every algorithm, after python-jose's checks for HS256/RS256."""

    @pytest.mark.parametrize("claims", [{"exp": 10**20}, {"exp": float("inf")}, {"nbf": float("nan")}])
    async def test_out_of_range_times_are_401_not_500(self, client: httpx.AsyncClient,
                                                      claims: dict[str, Any]) -> None:
        token = hs256(TEST_SECRET.encode(), {"alg": "HS256", "typ": "JWT"}, claims)
        assert (await _me(client, token)).status_code == 401

    async def test_a_configured_audience_must_be_present(self, settings: Settings, app: FastAPI,
                                                         client: httpx.AsyncClient) -> None:
        hs_app = create_app(settings.model_copy(update={"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}))
        async with _attach(hs_app, app) as http:
            head = {"alg": "HS256", "typ": "JWT"}
            assert (await _me(http, hs256(TEST_SECRET.encode(), head))).status_code == 200
            missing = await _me(http, hs256(TEST_SECRET.encode(), head, drop=("aud",)))
            assert missing.status_code == 401 and missing.json()["detail"] == "wrong audience"


class TestRotation:
    async def test_old_kid_accepted_while_published_refused_once_removed(
        self, settings: Settings, key_dir: Path, app: FastAPI, client: httpx.AsyncClient,
    ) -> None:
        old_token, new_token = eddsa(kid="k1", key="k1"), eddsa(kid="k2", key="k2")
        rotating = create_app(_settings(settings, key_dir, signing="k2", public=("k1", "k2"),
                                        jwt_issuer=ISSUER, jwt_audience=AUDIENCE))
        async with _attach(rotating, app) as http:
            assert (await _me(http, old_token)).status_code == 200
            assert (await _me(http, new_token)).status_code == 200
        retired = create_app(_settings(settings, key_dir, signing="k2", public=("k2",),
                                       jwt_issuer=ISSUER, jwt_audience=AUDIENCE))
        async with _attach(retired, app) as http:
            refused = await _me(http, old_token)
            assert refused.status_code == 401 and refused.json()["detail"] == "unknown key id"
            assert (await _me(http, new_token)).status_code == 200


class TestIssuance:
    async def test_post_v1_tokens_issues_an_eddsa_token(self, http: httpx.AsyncClient) -> None:
        issued = await http.post("/v1/tokens", json={"subject": "intern@shop.example", "role": "viewer"},
                                 headers={"Authorization": f"Bearer {eddsa()}"})
        assert issued.status_code == 201, issued.text
        token = issued.json()["token"]
        seen = _verify_by_hand(token, "k1")
        assert seen["header"]["alg"] == "EdDSA" and seen["header"]["kid"] == "k1"
        assert (seen["claims"]["iss"], seen["claims"]["aud"]) == (ISSUER, AUDIENCE)
        me = await _me(http, token)
        assert me.status_code == 200 and me.json()["subject"] == "intern@shop.example"

    async def test_carnet_token_create_issues_an_eddsa_token(self, tmp_path: Path, key_dir: Path,
                                                              database_url: str, http: httpx.AsyncClient) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "DATABASE_URL"))}
        env |= {"PYTHONPATH": str(ROOT), "DATABASE_URL": database_url, "JWT_SECRET": "c" * 40,
                "JWT_ALGORITHM": "EdDSA", "JWT_PRIVATE_KEY_FILE": str(key_dir / "k1.key.pem"),
                "JWT_SIGNING_KID": "k1", "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE,
                "JWT_PUBLIC_KEY_FILES": json.dumps({"k1": str(key_dir / "k1.pub.pem")})}
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "app", "token", "create", "--role", "editor", "--subject",
                             "cli@shop.example"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
            check=False)
        assert result.returncode == 0, result.stderr
        token = result.stdout.strip().splitlines()[-1]
        seen = _verify_by_hand(token, "k1")
        assert seen["header"]["alg"] == "EdDSA" and seen["claims"]["sub"] == "cli@shop.example"
        # Committed by the CLI in its own transaction; the API process accepts it (not revoked).
        assert (await _me(http, token)).status_code == 200


class TestConfiguration:
    @pytest.mark.parametrize(("case", "message"), [
        ("no_private_key", "private key"),
        ("signing_kid_not_published", "kid"),
        ("rsa_private_key", "Ed25519"),
        ("rsa_public_key", "Ed25519"),
        ("private_key_as_public", "public keys only"),
        ("encrypted_private_key", "Ed25519"),
        ("private_key_not_the_kids", "does not match"),
        ("not_a_pem", "Ed25519"),
    ])
    def test_an_inconsistent_setup_refuses_to_boot(self, settings: Settings, key_dir: Path, case: str,
                                                   message: str) -> None:
        (key_dir / "garbage.pem").write_text("not a key\n")
        update: dict[str, Any] = {
            "no_private_key": {"jwt_private_key_file": None},
            "signing_kid_not_published": {"jwt_signing_kid": "k9"},
            "rsa_private_key": {"jwt_private_key_file": key_dir / "rsa.key.pem"},
            "rsa_public_key": {"jwt_public_key_files": {"k1": key_dir / "k1.pub.pem", "old": key_dir / "rsa.pub.pem"}},
            "private_key_as_public": {"jwt_public_key_files": {"k1": key_dir / "k1.key.pem"}},
            "encrypted_private_key": {"jwt_private_key_file": key_dir / "k1.encrypted.key.pem"},
            "private_key_not_the_kids": {"jwt_private_key_file": key_dir / "k2.key.pem"},
            "not_a_pem": {"jwt_public_key_files": {"k1": key_dir / "k1.pub.pem", "k2": key_dir / "garbage.pem"}},
        }[case]
        with pytest.raises(ConfigurationError, match=message):
            create_app(_settings(settings, key_dir, **update))

    def test_a_missing_key_file_is_a_configuration_error(self, settings: Settings, key_dir: Path) -> None:
        with pytest.raises(ConfigurationError, match="cannot read"):
            create_app(_settings(settings, key_dir, jwt_public_key_files={"k1": key_dir / "absent.pem"}))
