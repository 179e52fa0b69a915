"""The `carnet` command, run as a user runs it."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

from alembic.script import ScriptDirectory

from app.security.tokens import verify_access_token

ROOT = Path(__file__).resolve().parents[1]


def _carnet(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
        check=False,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "JWT_SECRET"}}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def test_token_create_list_revoke(tmp_path: Path, database_url: str) -> None:
    secret = "cli-secret-" + "z" * 40
    env = _env(DATABASE_URL=database_url, JWT_SECRET=secret)
    result = _carnet("token", "create", "--role", "viewer", "--subject", "intern@shop.example", "--ttl", "2h",
                     env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    claims = verify_access_token(token, secret)
    assert (claims.subject, claims.role.value) == ("intern@shop.example", "viewer")
    listed = _carnet("token", "list", env=env, cwd=tmp_path)
    assert claims.token_id in listed.stdout
    revoked = _carnet("token", "revoke", claims.token_id, env=env, cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in _carnet("token", "list", env=env, cwd=tmp_path).stdout
    assert _carnet("token", "revoke", "no-such-token", env=env, cwd=tmp_path).returncode == 1


def test_commands_are_journaled_under_who_ran_them_the_journal_export_too(tmp_path: Path, database_url: str) -> None:
    """A command's acts named `cli`, not the person at the terminal (`carnet import` did); and `carnet journal
    export`, a read of the whole journal, was not journaled, while reading it over the API is (docs/gdpr.md)."""
    env = _env(DATABASE_URL=database_url, JWT_SECRET="cli-secret-" + "z" * 40)
    made = _carnet("token", "create", "--role", "viewer", "--subject", "journaled@shop.example", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "journal.jsonl"
    exported = _carnet("journal", "export", "--output", str(out), env=env, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    me = f"cli:{getpass.getuser()}"
    [created] = [e for e in entries if e["action"] == "tokens.created"
                 and e["detail"]["for_subject"] == "journaled@shop.example"]
    assert (created["subject"], created["token_id"]) == (me, "cli")
    assert (entries[-1]["action"], entries[-1]["subject"], entries[-1]["kind"]) == ("journal.exported", me, "admin")


def test_migrate_names_each_migration_it_applies(tmp_path: Path, fresh_database: str) -> None:
    from app.migrations import alembic_config, head_revision

    env = _env(DATABASE_URL=fresh_database, JWT_SECRET="cli-secret-" + "z" * 40)
    first = _carnet("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    revisions = [r.revision for r in reversed(list(ScriptDirectory.from_config(alembic_config()).walk_revisions()))]
    lines = first.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [f"applied {r}" for r in revisions]
    assert lines[0].startswith("applied 0001: ") and len(lines[0]) > len("applied 0001: ")  # and what it does
    assert lines[-1] == f"schema at {head_revision()}, the newest: applied {len(revisions)} migration(s)"

    again = _carnet("migrate", env=env, cwd=tmp_path)
    assert again.stdout.splitlines() == [f"schema already at {head_revision()}, the newest: nothing to apply"]


def test_boot_without_secret_outside_embedded_mode_fails_clearly(tmp_path: Path) -> None:
    result = _carnet("token", "create", "--role", "admin", "--subject", "x",
                     env=_env(DATABASE_URL="postgresql://db/x"), cwd=tmp_path)
    assert result.returncode == 2
    assert "JWT_SECRET" in result.stderr


def test_openapi_writes_the_document(tmp_path: Path) -> None:
    out = tmp_path / "openapi.json"
    result = _carnet("openapi", "--output", str(out), env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "/v1/contacts" in json.loads(out.read_text())["paths"]


def test_secrets_rotate_reencrypts_under_the_new_first_key(tmp_path: Path, database_url: str) -> None:
    """Key rotation: add a new key first, rotate, drop the old key: secrets still open."""
    import asyncio

    import asyncpg
    from cryptography.fernet import Fernet

    from app.db import plain_dsn
    from app.security.secrets import SecretBox

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    name = f"rotate-{os.getpid()}"

    async def seed() -> None:
        conn = await asyncpg.connect(plain_dsn(database_url))
        try:
            await conn.execute(
                "INSERT INTO destination (id, kind, name, enabled, config, secrets, list_mappings, field_mappings,"
                " consecutive_failures, version, created_at, updated_at) VALUES (gen_random_uuid(), 'webhook', $1,"
                " false, '{}', $2, '[]', '{}', 0, 1, now(), now())", name, SecretBox([old]).seal({"secret": "s3"}))
        finally:
            await conn.close()

    async def stored() -> str:
        conn = await asyncpg.connect(plain_dsn(database_url))
        try:
            return await conn.fetchval("SELECT secrets FROM destination WHERE name = $1", name)  # type: ignore[no-any-return]
        finally:
            await conn.close()

    asyncio.run(seed())
    env = _env(DATABASE_URL=database_url, JWT_SECRET="cli-secret-" + "z" * 40, SECRETS_KEYS=f"{new},{old}")
    result = _carnet("secrets", "rotate", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert SecretBox([new]).open(asyncio.run(stored())) == {"secret": "s3"}
