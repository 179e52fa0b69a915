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
    """It needs no database and no secret: none is asked for (DATABASE_URL without JWT_SECRET), none is generated."""
    data = tmp_path / "data"
    for extra in ({}, {"DATABASE_URL": f"postgresql://carnet@127.0.0.1:{_closed_port()}/carnet"}):
        out = tmp_path / "openapi.json"
        result = _carnet("openapi", "--output", str(out), env=_env(DATA_DIR=str(data), **extra), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "/v1/contacts" in json.loads(out.read_text())["paths"]
        assert not data.exists()
        out.unlink()


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


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when this returns: nothing listens there


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """A refusal a person reads: one `carnet: ...` line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("carnet: "), result.stderr[-3000:]
    return lines[0]


def test_an_unreachable_database_is_one_line_naming_it_and_never_its_password(tmp_path: Path) -> None:
    port = _closed_port()
    env = _env(DATABASE_URL=f"postgresql://carnet:pw-never-shown@127.0.0.1:{port}/carnet",
               JWT_SECRET="cli-secret-" + "z" * 40)
    for args in (["migrate"], ["token", "list"], ["worker", "--once"], ["serve", "--port", "0"]):
        result = _carnet(*args, env=env, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stderr[-3000:])
        line = _one_line(result)
        assert f"127.0.0.1:{port}/carnet" in line and "DATABASE_URL" in line, line
        assert "pw-never-shown" not in result.stderr + result.stdout


def test_a_database_that_does_not_exist_is_one_line(tmp_path: Path, database_url: str) -> None:
    from sqlalchemy.engine import make_url

    missing = make_url(database_url).set(database="carnet_no_such_database").render_as_string(hide_password=False)
    result = _carnet("token", "list", env=_env(DATABASE_URL=missing, JWT_SECRET="cli-secret-" + "z" * 40),
                     cwd=tmp_path)
    assert result.returncode == 1
    assert 'database "carnet_no_such_database" does not exist' in _one_line(result)


def test_a_schema_behind_this_code_is_refused_with_what_to_run(tmp_path: Path, fresh_database: str) -> None:
    """Commands other than `migrate` and `serve` (which migrates) refuse a database behind: the worker would
    otherwise crash on a missing table mid-run, a command half-way."""
    from app.migrations import head_revision, upgrade

    env = _env(DATABASE_URL=fresh_database, JWT_SECRET="cli-secret-" + "z" * 40)
    for args in (["worker", "--once"], ["token", "list"], ["retention", "--dry-run"]):
        result = _carnet(*args, env=env, cwd=tmp_path)  # empty: no schema at all
        assert result.returncode == 1, result.stderr[-3000:]
        assert "`carnet migrate`" in _one_line(result) and "no Carnet schema" in result.stderr
    upgrade(fresh_database, "0013")
    result = _carnet("worker", "--once", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert f"schema is at 0013 and this Carnet needs {head_revision()}" in _one_line(result)
    assert _carnet("migrate", env=env, cwd=tmp_path).returncode == 0
    assert _carnet("worker", "--once", env=env, cwd=tmp_path).returncode == 0


INVALID_SETTINGS = [
    ("DATABASE_URL", "mysql://carnet@db/carnet"), ("DATABASE_REPLICA_URL", "not a url"),
    ("DATABASE_POOL_SIZE", "0"), ("DATABASE_POOL_TIMEOUT", "-1"), ("JWT_DEFAULT_TTL_SECONDS", "0"),
    ("JWT_PUBLIC_KEY_FILES", "not json"), ("LOG_LEVEL", "LOUD"), ("DEFAULT_PHONE_REGION", "ZZ"),
    ("LOYAL_MIN_ORDERS", "0"), ("LOYAL_WINDOW_DAYS", "-3"), ("LAPSED_AFTER_DAYS", "0"),
    ("PUBLIC_BASE_URL", "crm.shop.example"), ("SECRETS_KEYS", "not-a-fernet-key"),
    ("COSTLY_READS_PER_PROCESS", "50"), ("SIGNUP_IP_PER_MINUTE", "0"), ("JWT_SECRET", "short"),
]


SERVE_CHECKED = {"DATABASE_POOL_SIZE", "LOG_LEVEL", "COSTLY_READS_PER_PROCESS", "JWT_PUBLIC_KEY_FILES"}


def test_each_invalid_setting_is_refused_at_start_in_one_line_naming_it(tmp_path: Path) -> None:
    """Before any database is reached (nothing listens at DATABASE_URL's port) and before anything is written."""
    base = {"DATABASE_URL": f"postgresql://carnet@127.0.0.1:{_closed_port()}/carnet",
            "JWT_SECRET": "cli-secret-" + "z" * 40}
    for name, value in INVALID_SETTINGS:
        # `serve` checks them before it binds, migrates or builds the app (where some failed, as tracebacks)
        for args in (["token", "list"], *([["serve", "--port", "0"]] if name in SERVE_CHECKED else [])):
            result = _carnet(*args, env=_env(**{**base, name: value}), cwd=tmp_path)
            assert result.returncode == 2, (name, args, result.stderr[-3000:])
            assert _one_line(result).startswith(f"carnet: {name}"), (name, result.stderr)
            if name in ("JWT_SECRET", "SECRETS_KEYS", "DATABASE_URL"):
                assert value not in result.stderr  # secrets, and URLs that may carry one, are never echoed


def test_openapi_refuses_an_invalid_setting_in_one_line_as_every_command_does(tmp_path: Path) -> None:
    """`carnet openapi` printed a traceback (exit 1) for a setting out of range or not JSON, or wrote the document
    over a too short JWT_SECRET; every other command says which variable, in one line, exit 2."""
    out = tmp_path / "openapi.json"
    # One of each way a value is refused (range, JSON, a rule across settings, a secret, a URL): the check is
    # `_settings()`, which the test above walks through every setting (a process each costs seconds).
    sample = {"DATABASE_POOL_SIZE", "JWT_PUBLIC_KEY_FILES", "COSTLY_READS_PER_PROCESS", "JWT_SECRET", "DATABASE_URL"}
    for name, value in [(n, v) for n, v in INVALID_SETTINGS if n in sample]:
        result = _carnet("openapi", "--output", str(out), env=_env(**{name: value}), cwd=tmp_path)
        assert result.returncode == 2, (name, result.stderr[-3000:])
        assert _one_line(result).startswith(f"carnet: {name}"), (name, result.stderr)
        assert not out.exists(), name
        if name in ("JWT_SECRET", "SECRETS_KEYS", "DATABASE_URL"):
            assert value not in result.stderr


def test_every_setting_is_documented_with_its_default(tmp_path: Path) -> None:
    """docs/operations.md "Settings" lists every variable Carnet reads, one table row each."""
    from app.settings import Settings

    doc = (ROOT / "docs" / "operations.md").read_text()
    section = doc.split("## Settings", 1)[1].split("\n## ", 1)[0]
    names = {name.strip().strip("`") for line in section.splitlines() if line.startswith("| `")
             for name in line.split("|")[1].split(",")}
    assert names == {name.upper() for name in Settings.model_fields}
