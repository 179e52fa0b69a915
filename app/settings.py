"""Settings from the environment and `.env`; one object, handed explicitly to `create_app`."""

from __future__ import annotations

import secrets
from functools import cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ConfigurationError", "Settings", "get_settings"]


class ConfigurationError(RuntimeError):
    """The deployment is misconfigured; the message says what to set."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Database: None means the embedded PostgreSQL in data_dir (ARCHITECTURE.md "Embedded default").
    database_url: str | None = None
    database_pool_size: int = 10
    database_pool_timeout: float = 5.0
    data_dir: Path = Path(".carnet")

    # Tokens: HS256 with this secret. None only in embedded mode, where one is made once and kept.
    jwt_secret: SecretStr | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_default_ttl_seconds: int = 30 * 24 * 3600
    rate_limit_per_second: float = Field(default=100.0, gt=0)   # per token, per API process
    rate_limit_burst: int = Field(default=200, ge=1)

    # Contacts
    default_phone_region: str = "FR"
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)

    # Names fixed by API.md; used by later features.
    retention_prospect_days: int = 1095
    loyal_min_orders: int = 3
    loyal_window_days: int = 365
    lapsed_after_days: int = 365

    log_json: bool = True
    log_level: str = "INFO"

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    def resolved_jwt_secret(self) -> str:
        """The signing secret; made once and kept in data_dir in embedded mode, required otherwise."""
        if self.jwt_secret is not None:
            value = self.jwt_secret.get_secret_value()
            if len(value) < 32:
                raise ConfigurationError("JWT_SECRET must be at least 32 characters long.")
            return value
        if not self.embedded:
            raise ConfigurationError(
                "DATABASE_URL is set but JWT_SECRET is not: set JWT_SECRET (32+ random characters) "
                "so that tokens survive restarts and every process signs with the same key."
            )
        return _dev_secret(self.data_dir / "jwt_secret")


def _dev_secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(value)
    return value


@cache
def get_settings() -> Settings:
    return Settings()
