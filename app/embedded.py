"""The embedded PostgreSQL (pgserver) used when DATABASE_URL is unset."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

__all__ = ["EmbeddedPostgres"]


class EmbeddedPostgres:
    """A private PostgreSQL in `<data_dir>/pgdata`, started on first use, stopped with the last user."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pgdata").resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or join) the server and return an asyncpg SQLAlchemy URL for it."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pgserver/platformdirs warn about XDG_RUNTIME_DIR
            import pgserver

            logging.getLogger("pgserver").setLevel(logging.WARNING)  # its exit hook logs to closed streams

            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        return f"postgresql+asyncpg://postgres@/postgres?host={self.pgdata}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
