"""Running Alembic from Carnet: upgrade on boot (saying what it applied), the head revision for /readyz."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from alembic import command

__all__ = ["Applied", "alembic_config", "database_revision", "head_revision", "schema_state", "script_location",
           "upgrade"]


@dataclass(frozen=True, slots=True)
class Applied:
    """One migration this process ran."""

    revision: str
    doc: str


def script_location() -> Path:
    """Where the migrations are: inside the package in an installed wheel (pyproject.toml maps the top-level
    `alembic/` there), the top-level `alembic/` where they are written in a checkout (editable install, tests)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migration_scripts", here.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(f"Carnet's migrations are missing from {here} (a broken installation: reinstall Carnet)")


def alembic_config(database_url: str | None = None) -> Config:
    """Alembic's configuration, built here rather than read from an alembic.ini (a wheel has none)."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("path_separator", "os")
    # New revisions as 2026-12-06_0020_slug.py ('%%': configparser interpolation).
    config.set_main_option("file_template", "%%(year)d-%%(month).2d-%%(day).2d_%%(rev)s_%%(slug)s")
    if database_url is not None:
        config.attributes["database_url"] = database_url  # not via set_main_option: '%' in URLs breaks configparser
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


async def database_revision(database_url: str) -> str | None:
    """The revision the database's schema is at; None for a database Carnet never migrated."""
    import asyncpg

    from app.db import plain_dsn

    connection = await asyncpg.connect(plain_dsn(database_url), timeout=10)
    try:
        return await connection.fetchval("SELECT version_num FROM alembic_version")  # type: ignore[no-any-return]
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await connection.close()


def schema_state(current: str | None) -> str:
    """`current` (at this code's head), `behind` (run `carnet migrate`) or `ahead`.

    `ahead`: the database carries a revision this code does not know, i.e. a newer release migrated it
    during a rolling upgrade. Migrations only expand within a release line (docs/operations.md), so the
    old processes keep serving until they are replaced.
    """
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    if current == head:
        return "current"
    known = {r.revision for r in script.walk_revisions()}
    return "behind" if current is None or current in known else "ahead"


def upgrade(
    database_url: str, revision: str = "head", *, on_applied: Callable[[Applied], None] | None = None
) -> list[Applied]:
    """Bring the schema to `revision`; returns the migrations this process ran (none when there was nothing to
    do, or when another process booting at the same time ran them). `on_applied` hears of each as it runs.

    Blocking (Alembic's env runs its own event loop): call from sync code or a worker thread."""
    config = alembic_config(database_url)
    applied: list[Applied] = []

    def record(step: Applied) -> None:
        applied.append(step)
        if on_applied is not None:
            on_applied(step)

    config.attributes["on_applied"] = record  # called by alembic/env.py after each migration
    command.upgrade(config, revision)
    return applied
