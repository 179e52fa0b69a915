"""Settings from the environment and `.env`; one object, handed explicitly to `create_app`."""

from __future__ import annotations

import secrets
from functools import cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import phonenumbers
import platformdirs
from cryptography.fernet import Fernet
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ConfigurationError", "Settings", "get_settings", "token_signer_options"]


def _checkout() -> Path | None:
    """The source checkout app/ runs from (bin/setup-venv's editable install, the tests); None for an installed
    wheel, whose app/ sits in site-packages."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "alembic").is_dir() else None


CHECKOUT = _checkout()
# The embedded database and its secret: the checkout's .carnet (wherever a command runs from), else the user's data
# directory (~/.local/share/carnet on Linux). DATA_DIR moves it.
DEFAULT_DATA_DIR = CHECKOUT / ".carnet" if CHECKOUT else platformdirs.user_data_path("carnet")


_POSTGRESQL_SCHEMES = ("postgres", "postgresql", "postgresql+asyncpg", "postgresql+psycopg2", "postgresql+psycopg")


class ConfigurationError(RuntimeError):
    """The deployment is misconfigured; the message says what to set."""


class Settings(BaseSettings):
    # The checkout's .env (if any), then one in the working directory (which wins where both set a variable).
    model_config = SettingsConfigDict(env_file=(*([CHECKOUT / ".env"] if CHECKOUT else []), ".env"),
                                      env_file_encoding="utf-8", extra="ignore")

    # Database: None means the embedded PostgreSQL in data_dir (ARCHITECTURE.md "Embedded default").
    database_url: str | None = None
    database_pool_size: int = Field(default=20, ge=1, le=1000)
    database_pool_timeout: float = Field(default=5.0, gt=0, le=3600)
    # A streaming replica (or a pooler over several) for exports and segment reads; unset: the primary.
    database_replica_url: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR

    # Tokens: HS256 with this secret. None only in embedded mode, where one is made once and kept.
    jwt_secret: SecretStr | None = None
    suppression_key: SecretStr | None = None  # unset: derived from the JWT secret (set it before rotating that)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_default_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60, le=366 * 24 * 3600)  # as POST /v1/tokens
    # RS256 or EdDSA (Ed25519) instead of HS256: sign with one PEM private key, verify by `kid` among
    # public keys (rotation). EdDSA needs Ed25519 PEMs (`openssl genpkey -algorithm ed25519`).
    jwt_algorithm: Literal["HS256", "RS256", "EdDSA"] = "HS256"
    jwt_private_key_file: Path | None = None
    jwt_signing_kid: str | None = None
    jwt_public_key_files: dict[str, Path] = Field(default_factory=dict)  # env: JSON {"kid": "/path.pem"}
    rate_limit_per_second: float = Field(default=100.0, gt=0)   # per token, per API process
    rate_limit_burst: int = Field(default=200, ge=1)

    # Statement timeouts by kind of work (app.timeouts) and the caps on costly reads (app.security.costly)
    statement_timeout_interactive_seconds: float = Field(default=10.0, gt=0, le=86_400)  # every API statement
    statement_timeout_costly_seconds: float = Field(default=30.0, gt=0, le=86_400)  # counts, previews, duplicates
    statement_timeout_export_seconds: float = Field(default=3600.0, gt=0, le=86_400)  # a whole COPY export
    statement_timeout_worker_seconds: float = Field(default=600.0, gt=0, le=86_400)  # worker, CLI, bulk writes
    costly_reads_per_token: int = Field(default=2, ge=1, le=1000)    # in flight, per API process: then 429
    # running at once (< DATABASE_POOL_SIZE); None: half this machine's cores, at least 1 (the embedded database's)
    costly_reads_per_process: int | None = Field(default=None, ge=1, le=1000)
    # waiting for one of those (each up to DATABASE_POOL_TIMEOUT), then 503 at once; None: twice the per-process cap
    costly_reads_queue: int | None = Field(default=None, ge=0, le=10_000)
    costly_read_gate: bool = True  # costly reads take their slot (or their 429/503) ahead of FastAPI (app.costly_gate)

    # Contacts
    default_phone_region: str = Field(default="FR", min_length=2, max_length=2)
    fast_read_path: bool = True  # GET /v1/contacts/{id} by app.fastpath, ahead of FastAPI's router (same answers)
    fast_upsert_path: bool = True  # POST /v1/contacts/upsert by app.fastpath, likewise
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)

    # Names fixed by API.md; used by later features.
    retention_prospect_days: int = Field(default=1095, ge=1, le=36500)  # CNIL: three years for prospects
    loyal_min_orders: int = Field(default=3, ge=1, le=10_000)
    loyal_window_days: int = Field(default=365, ge=1, le=36500)
    lapsed_after_days: int = Field(default=365, ge=1, le=36500)
    # Behaviour events: whole monthly partitions older than this many months (before the current one) are dropped
    # by the worker (app.services.event_partitions); orders and the contact stats they give are not affected.
    event_retention_months: int = Field(default=25, ge=1, le=1200)
    lifecycle_refresh_seconds: int = Field(default=3600, ge=0)  # 0: only `carnet lifecycle refresh` (cron)

    # Sync (destinations and the outbox worker)
    # Fernet keys, comma-separated: the first encrypts, all decrypt (rotation). Unset: derived from the JWT secret.
    secrets_keys: SecretStr | None = None
    public_base_url: str = "http://127.0.0.1:8000"      # how vendors reach /v1/inbound (shown as inbound_url)
    sync_allow_private_networks: bool = False           # SSRF guard off: loopback fakes in tests, LAN receivers
    sync_call_deadline_seconds: float = Field(default=30.0, gt=0, le=3600)  # whole vendor call, trickling servers too
    delivery_batch_size: int = Field(default=1500, ge=1, le=5000)  # 10 Brevo list calls, 3 Mailchimp batches
    delivery_lease_seconds: float = Field(default=120.0, gt=0, le=86_400)
    delivery_backoff_base_seconds: float = Field(default=1.0, gt=0, le=86_400)
    # A vendor back from an outage is retried within the cap: 30 s keeps "delivered within 60 s of recovery".
    delivery_backoff_cap_seconds: float = Field(default=30.0, gt=0, le=86_400)
    delivery_max_attempts: int = Field(default=8640, ge=1, le=1_000_000)   # three days at the cap, then dead letter
    worker_idle_seconds: float = Field(default=1.0, gt=0, le=3600)  # poll interval when there is nothing to do
    # Delivered outbox messages and deliveries are purged this long after delivery (docs/sync.md "Retention");
    # nothing undelivered is ever purged. Fractions allowed (the soak bench keeps seconds).
    outbox_keep_delivered_hours: float = Field(default=72.0, ge=0, le=87_600)
    outbox_purge_seconds: float = Field(default=300.0, gt=0, le=86_400)  # how often the purge sweeps
    # How often a synced segment's members are compared with its last snapshot (entries and exits go out then).
    segment_refresh_seconds: float = Field(default=300.0, gt=0, le=86_400)
    run_worker_in_api: bool | None = None                  # None: yes in embedded mode, no with DATABASE_URL

    # CSV imports (app.services.imports)
    import_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)  # upload cap of POST /v1/imports (413 above)
    import_lease_seconds: float = Field(default=120.0, gt=0, le=86_400)  # a killed worker's job is taken over after
    import_batch_rows: int = Field(default=10_000, ge=1, le=200_000)    # rows per checkpointed transaction
    import_workers: int = Field(default=1, ge=0, le=32)         # validating processes; 0: in the runner itself
    import_inline_bytes: int = Field(default=1024 * 1024, ge=0)  # smaller files are validated in the runner
    import_writers: int = Field(default=2, ge=1, le=8)          # batches written at once, a connection each
    import_max_attempts: int = Field(default=5, ge=1, le=100)   # claims of one job before it is marked failed
    import_report_values_days: int = Field(default=30, ge=1, le=3650)  # refused cells kept in reports, then cleared

    # Public pages: newsletter signup from the shop's pages and the preference center (docs/api.md "Public signup")
    public_name: str | None = Field(default=None, max_length=100)   # the shop's name on public pages
    public_color: str = Field(default="#1d4e89", pattern=r"^#[0-9a-fA-F]{6}$")  # their accent (a list may set its own)
    # `self_service`: a confirmed erasure request from the preference center erases at once; `request`: it files a
    # request an admin answers (GET /v1/erasure-requests).
    preferences_erasure: Literal["self_service", "request"] = "self_service"
    signup_ip_per_minute: float = Field(default=10.0, gt=0)       # signups per client address (per API process)
    signup_ip_burst: int = Field(default=20, ge=1)
    signup_list_per_minute: float = Field(default=300.0, gt=0)    # signups per list (per API process)
    signup_list_burst: int = Field(default=600, ge=1)
    # Every signup answer takes at least this long: a new, a known and a suppressed address look alike in time too.
    signup_answer_seconds: float = Field(default=0.3, ge=0, le=5)
    # Proxies whose X-Forwarded-For uvicorn trusts for the client address (uvicorn's --forwarded-allow-ips);
    # unset: the connecting address, which behind a proxy is the proxy's (per-IP signup limits then count it).
    forwarded_allow_ips: str | None = None
    # The access journal (docs/gdpr.md "Access journal"): read entries are buffered per process and chained
    # every JOURNAL_FLUSH_SECONDS (the most a crash can lose); a full buffer (database away) → 503 on reveals.
    journal_enabled: bool = True     # false: no journal at all (benchmarks only: accesses go unrecorded)
    journal_flush_seconds: float = Field(default=0.25, gt=0, le=60)
    journal_buffer_max: int = Field(default=50_000, ge=100, le=10_000_000)
    journal_retention_days: int = Field(default=365, ge=1, le=36500)

    log_json: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # Each value is checked here, so a bad one stops `carnet` at start with the variable's name (app.cli), rather
    # than as a traceback from deep inside the app after migrations ran. Messages never repeat the value: a URL or a
    # key may be a secret.
    @field_validator("database_url", "database_replica_url")
    @classmethod
    def _postgresql_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in _POSTGRESQL_SCHEMES:
            raise ValueError("not a PostgreSQL URL: postgresql://user:password@host:5432/database (unset "
                             "DATABASE_URL for the embedded database)")
        return value

    @field_validator("public_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("an http(s) address people and emailing tools reach, e.g. https://crm.shop.example")
        return value

    @field_validator("default_phone_region")
    @classmethod
    def _phone_region(cls, value: str) -> str:
        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError("an ISO 3166-1 alpha-2 country code with a phone plan, e.g. FR, BE, CH")
        return value.upper()

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("secrets_keys")
    @classmethod
    def _fernet_keys(cls, value: SecretStr | None) -> SecretStr | None:
        keys = [key.strip() for key in value.get_secret_value().split(",") if key.strip()] if value else []
        for position, key in enumerate(keys, start=1):
            try:
                Fernet(key)
            except ValueError:
                raise ValueError(f"key {position} is not a Fernet key (32 url-safe base64-encoded bytes; make one "
                                 "as docs/operations.md says)") from None
        return value

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def background_pool_size(self) -> int:
        """Connections of the worker's pool (`carnet worker`, or the API's embedded worker): an import's writers
        and its file reader (`carnet import` opens just those), plus the other jobs running beside it (deliveries,
        segment syncs, upkeep)."""
        return self.import_writers + 3

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

    def resolved_suppression_key(self) -> str:
        """SUPPRESSION_KEY, else the JWT secret (set it before ever rotating that: docs/operations.md)."""
        return self.suppression_key.get_secret_value() if self.suppression_key else self.resolved_jwt_secret()


def _dev_secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(value)
    return value


def token_signer_options(settings: Settings) -> dict[str, object]:
    """Keyword arguments for app.security.tokens.TokenSigner, key files read."""
    options: dict[str, object] = {
        "secret": settings.resolved_jwt_secret(), "issuer": settings.jwt_issuer, "audience": settings.jwt_audience,
        "algorithm": settings.jwt_algorithm,
    }
    if settings.jwt_algorithm in ("RS256", "EdDSA"):
        try:
            options["private_key"] = settings.jwt_private_key_file.read_text() if settings.jwt_private_key_file else None
            options["public_keys"] = {kid: path.read_text() for kid, path in settings.jwt_public_key_files.items()}
        except OSError as exc:
            raise ConfigurationError(f"cannot read a JWT key file: {exc.strerror} ({exc.filename})") from None
        options["signing_kid"] = settings.jwt_signing_kid
    return options


@cache
def get_settings() -> Settings:
    return Settings()
