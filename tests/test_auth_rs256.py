"""RS256 deployments: kid rotation, and the algorithm-confusion attack (CVE-2024-33663) refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from app.main import create_app
from app.security import ROLE_SCOPES, Role
from app.security.tokens import TokenSigner
from app.settings import ConfigurationError, Settings, token_signer_options


def _keypair(tmp: Path, kid: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp / f"{kid}.key.pem"
    public = tmp / f"{kid}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("keys")
    return {kid: _keypair(tmp, kid) for kid in ("k1", "k2", "rogue")}


def _settings(base: Settings, keys: dict[str, tuple[Path, Path]], signing: str) -> Settings:
    return base.model_copy(update={
        "jwt_algorithm": "RS256", "jwt_private_key_file": keys[signing][0], "jwt_signing_kid": signing,
        "jwt_public_key_files": {"k1": keys["k1"][1], "k2": keys["k2"][1]},
    })


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _hs256_with(secret: bytes, header: dict[str, str]) -> str:
    now = int(time.time())
    claims = {"sub": "mallory", "role": "admin", "scopes": sorted(ROLE_SCOPES[Role.ADMIN]), "iat": now,
              "exp": now + 600, "jti": uuid.uuid4().hex}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


async def _status(app: FastAPI, client_app: FastAPI, token: str) -> int:
    app.dependency_overrides = client_app.dependency_overrides
    app.state.sessionmaker = client_app.state.sessionmaker
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        return (await http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).status_code


async def test_rotation_old_and_new_keys_verify(settings: Settings, keys: dict, app: FastAPI,
                                                client: httpx.AsyncClient) -> None:
    old = TokenSigner(**token_signer_options(_settings(settings, keys, "k1")))  # type: ignore[arg-type]
    new_app = create_app(_settings(settings, keys, "k2"))
    old_token = old.issue(subject="a", role=Role.VIEWER, scopes=None, ttl_seconds=600).token
    new_token = new_app.state.token_signer.issue(subject="b", role=Role.VIEWER, scopes=None, ttl_seconds=600).token
    assert await _status(new_app, app, old_token) == 200
    assert await _status(new_app, app, new_token) == 200


async def test_forged_tokens_are_refused(settings: Settings, keys: dict, app: FastAPI,
                                         client: httpx.AsyncClient) -> None:
    rs_app = create_app(_settings(settings, keys, "k1"))
    public_pem = keys["k1"][1].read_bytes()
    base = token_signer_options(_settings(settings, keys, "k1"))
    rogue_key = keys["rogue"][0].read_text()
    impostor = TokenSigner(**base | {"private_key": rogue_key, "signing_kid": "k1"})  # type: ignore[arg-type]
    stranger = TokenSigner(**base | {"private_key": rogue_key, "signing_kid": "rogue",  # type: ignore[arg-type]
                                     "public_keys": {"rogue": keys["rogue"][1].read_text()}})
    forged = {
        "hs256_signed_with_rs_public_key": _hs256_with(public_pem, {"alg": "HS256", "typ": "JWT", "kid": "k1"}),
        "hs256_with_the_hmac_secret": _hs256_with(settings.resolved_jwt_secret().encode(), {"alg": "HS256"}),
        "untrusted_key_claiming_a_known_kid": impostor.issue(subject="m", role=Role.ADMIN, scopes=None,
                                                             ttl_seconds=600).token,
        "unknown_kid": stranger.issue(subject="m", role=Role.ADMIN, scopes=None, ttl_seconds=600).token,
        "kid_missing": _hs256_with(public_pem, {"alg": "RS256"}),
    }
    for name, token in forged.items():
        assert await _status(rs_app, app, token) == 401, name


def test_inconsistent_key_setup_refuses_to_boot(settings: Settings, keys: dict) -> None:
    broken = _settings(settings, keys, "k1").model_copy(update={"jwt_signing_kid": "k9"})
    with pytest.raises(ConfigurationError, match="kid"):
        create_app(broken)
    private_as_public = _settings(settings, keys, "k1").model_copy(
        update={"jwt_public_key_files": {"k1": keys["k1"][0]}})
    with pytest.raises(ConfigurationError, match="public keys only"):
        create_app(private_as_public)
