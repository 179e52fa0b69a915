"""Running Alembic from Carnet: upgrade on boot, the head revision for /readyz."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from alembic import command

__all__ = ["alembic_config", "head_revision", "schema_state", "upgrade"]

_ROOT = Path(__file__).resolve().parents[1]


def alembic_config(database_url: str) -> Config:
    config = Config(str(_ROOT / "alembic.ini"))
    config.attributes["database_url"] = database_url  # not via set_main_option: '%' in URLs breaks configparser
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(Config(str(_ROOT / "alembic.ini"))).get_current_head()
    assert head is not None, "no migrations found"
    return head


def schema_state(current: str | None) -> str:
    """`current` (at this code's head), `behind` (run `carnet migrate`) or `ahead`.

    `ahead`: the database carries a revision this code does not know, i.e. a newer release migrated it
    during a rolling upgrade. Migrations only expand within a release line (docs/operations.md), so the
    old processes keep serving until they are replaced.
    """
    script = ScriptDirectory.from_config(Config(str(_ROOT / "alembic.ini")))
    head = script.get_current_head()
    if current == head:
        return "current"
    known = {r.revision for r in script.walk_revisions()}
    return "behind" if current is None or current in known else "ahead"


def upgrade(database_url: str, revision: str = "head") -> None:
    """Blocking (Alembic's env runs its own event loop): call from sync code or a worker thread."""
    command.upgrade(alembic_config(database_url), revision)
