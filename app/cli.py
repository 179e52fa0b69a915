"""The `carnet` command: serve, worker, migrate, token, lifecycle, retention, openapi."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import BACKGROUND_POOL_TIMEOUT, driver_connection, make_engine, make_sessionmaker
from app.embedded import EmbeddedPostgres
from app.errors import AppError
from app.migrations import Applied
from app.security import Principal, Role, Scope
from app.security.tokens import IssuedToken, TokenSigner
from app.services import tokens as tokens_service
from app.settings import ConfigurationError, Settings, get_settings, token_signer_options

T = TypeVar("T")

__all__ = ["main"]

cli = typer.Typer(help="Carnet: the customer file as an API.", no_args_is_help=True, add_completion=False)
token_cli = typer.Typer(help="Access tokens.", no_args_is_help=True)
cli.add_typer(token_cli, name="token")

def cli_actor(name: str) -> Principal:
    """Who a command acts as, in tokens' `issued_by` and the access journal: the command, not a token."""
    return Principal(name, Role.ADMIN, frozenset(), name)


def operator() -> Principal:
    """The person at the terminal, for every command that acts for them (import, export, tokens, journal):
    `cli:<login>`, token id `cli`."""
    import getpass

    try:
        login = getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry): still a command
        login = "unknown"
    return Principal(f"cli:{login}", Role.ADMIN, frozenset(), "cli")


_TTL = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _settings(*, needs_secret: bool = True) -> Settings:
    """The settings, every value checked before the command does anything (a database, a port, a migration): a bad
    one is a line naming its variable, exit 2 (the value itself is never repeated: it may be a secret).
    `needs_secret=False` (`carnet openapi`): a JWT_SECRET given is checked, none is required or generated."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from app.security.costly import CostlyReads

    try:
        settings = get_settings()
        if needs_secret or settings.jwt_secret is not None:
            settings.resolved_jwt_secret()
        CostlyReads.from_settings(settings)  # what create_app checks across settings, said before the app is built
    except ValidationError as exc:  # a variable out of range: say which, in one line each, not a traceback
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper()
            typer.echo(f"carnet: {name}: {error['msg'].removeprefix('Value error, ')}", err=True)
        raise typer.Exit(2) from None
    except SettingsError as exc:  # pydantic-settings could not decode a JSON value (JWT_PUBLIC_KEY_FILES)
        field = re.search(r'field "(\w+)"', str(exc))
        typer.echo(f"carnet: {field[1].upper() if field else 'a setting'}: not valid JSON", err=True)
        raise typer.Exit(2) from None
    except ConfigurationError as exc:
        typer.echo(f"carnet: {exc}", err=True)
        raise typer.Exit(2) from None
    return settings


def _ttl_seconds(value: str) -> int:
    match = _TTL.fullmatch(value.strip())
    if not match or int(match[1]) == 0:
        raise typer.BadParameter("a duration such as 3600, 90m, 12h or 30d")
    return int(match[1]) * _UNITS[match[2]]


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port; the address is printed)")] = 8000,
) -> None:
    """Migrate the database, then serve the API (starting the embedded PostgreSQL when DATABASE_URL is unset)."""
    from app.main import create_app
    from app.migrations import upgrade
    from app.serving import PortUnavailable, bind, serve_on, served_base_url

    settings = _settings()
    try:
        sock = bind(host, port)  # first: a busy port is said at once, not after the database has started
    except PortUnavailable as exc:
        typer.echo(f"carnet: {exc}", err=True)
        raise typer.Exit(1) from None
    base = served_base_url(sock, host)
    if "public_base_url" not in settings.model_fields_set:  # links sent to people point at this server
        settings = settings.model_copy(update={"public_base_url": base})
        if host in ("0.0.0.0", "::"):  # noqa: S104 (a comparison, not a bind)
            _say(f"PUBLIC_BASE_URL is unset: links sent to people point at {base}; set it to the address they "
                 "reach Carnet at")
    embedded = EmbeddedPostgres(settings.data_dir) if settings.embedded else None
    if embedded:
        _say(f"starting the embedded PostgreSQL in {embedded.pgdata}")
    url = embedded.start() if embedded else settings.database_url
    assert url is not None
    try:
        with _reaching(url):
            _say_schema(upgrade(url, on_applied=lambda step: _say(f"applied migration {step.revision}: {step.doc}")))
        _print_bootstrap_token(settings, url, base)
        app = create_app(settings, database_url=url)
        # The lifespan stops the embedded server: uvicorn re-raises SIGTERM/SIGINT after its shutdown,
        # so code after serve_on() (this function's finally) does not run on a signal.
        app.state.embedded = embedded
        links = "" if settings.public_base_url == base else f"; links in emails point at {settings.public_base_url}"
        serve_on(app, sock, forwarded_allow_ips=settings.forwarded_allow_ips,
                 on_ready=lambda: _say(f"serving {base} (docs: {base}/docs{links}); Ctrl-C stops it"))
    finally:
        sock.close()
        if embedded:
            embedded.stop()


@cli.command()
def migrate() -> None:
    """Bring the database schema to the newest migration, naming each migration it applies."""
    from app.migrations import upgrade

    with _database(_settings(), migrate=False) as url:
        _say_schema(upgrade(url, on_applied=lambda step: typer.echo(f"applied {step.revision}: {step.doc}")),
                    out=True)


def _say(message: str) -> None:
    """Progress for the person at the terminal (stderr, plain text: the JSON log lines are for machines)."""
    typer.echo(f"carnet: {message}", err=True)


def _say_schema(applied: list[Applied], *, out: bool = False) -> None:
    """The schema's state after an upgrade: on stdout for `carnet migrate`, as progress for `carnet serve`."""
    from app.migrations import head_revision

    head = head_revision()
    line = (f"schema at {head}, the newest: applied {len(applied)} migration(s)" if applied
            else f"schema already at {head}, the newest: nothing to apply")
    if out:
        typer.echo(line)
    else:
        _say(line)


@token_cli.command("create")
def token_create(
    role: Annotated[Role, typer.Option(help="admin, manager, editor, viewer or integration")],
    subject: Annotated[str, typer.Option(help="Who the token is for, e.g. owner@shop.example")],
    ttl: Annotated[str, typer.Option(help="Lifetime: 3600, 90m, 12h, 30d")] = "30d",
    scope: Annotated[list[Scope] | None, typer.Option(help="Narrow to these scopes (repeatable)")] = None,
) -> None:
    """Mint a token (recorded for audit and revocation); it is printed alone on the last line."""
    settings = _settings()
    ttl_seconds = _ttl_seconds(ttl)

    async def create(session: AsyncSession) -> IssuedToken:
        return await tokens_service.issue(
            session, _signer(settings), subject=subject, role=role, scopes=frozenset(scope) if scope else None,
            ttl_seconds=ttl_seconds, actor=operator(),
        )

    issued = _in_transaction(settings, create)
    typer.echo(f"# {role.value} token for {subject}, id {issued.token_id}, expires {issued.expires_at.isoformat()}",
               err=True)
    typer.echo(issued.token)


@token_cli.command("list")
def token_list(include_expired: Annotated[bool, typer.Option(help="Show expired tokens too")] = False) -> None:
    """Issued tokens, newest first (ids and claims; tokens themselves are never stored)."""
    settings = _settings()

    async def rows(session: AsyncSession) -> list[dict[str, Any]]:
        return await tokens_service.list_page(session, limit=1000, include_expired=include_expired)

    for row in _in_transaction(settings, rows):
        state = (f"revoked {row['revoked_at']:%Y-%m-%d}" if row["revoked_at"]
                 else f"expires {row['expires_at']:%Y-%m-%d}")
        typer.echo(f"{row['jti']}  {row['role']:<11} {row['subject']}  {state}")


@token_cli.command("revoke")
def token_revoke(jti: Annotated[str, typer.Argument(help="The token id (jti)")]) -> None:
    """Revoke a token; every API process refuses it from its next request."""
    settings = _settings()

    async def revoke(session: AsyncSession) -> dict[str, Any]:
        return await tokens_service.revoke(session, jti, actor=operator())

    _in_transaction(settings, revoke)
    typer.echo(f"revoked {jti}")


lifecycle_cli = typer.Typer(help="Lifecycle stages.", no_args_is_help=True)
cli.add_typer(lifecycle_cli, name="lifecycle")


@lifecycle_cli.command("refresh")
def lifecycle_refresh() -> None:
    """Move customers whose last order aged past LAPSED_AFTER_DAYS to lapsed (idempotent; for cron)."""
    from app.jobs import JOB_ACTOR
    from app.main import lifecycle_policy
    from app.services.orders import refresh_aged_stages

    settings = _settings()

    async def refresh(session: AsyncSession) -> int:
        return await refresh_aged_stages(session, policy=lifecycle_policy(settings), actor=JOB_ACTOR)

    typer.echo(f"{_in_transaction(settings, refresh)} contact(s) now lapsed")


@cli.command()
def retention(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be erased; change nothing")] = False,
) -> None:
    """Erase prospects with no activity for RETENTION_PROSPECT_DAYS (CNIL: three years); for cron."""
    from app.logging import configure_logging
    from app.security import Principal
    from app.services import gdpr as gdpr_service
    from app.services import suppressions as suppressions_service

    settings = _settings()
    configure_logging(json=settings.log_json, level=settings.log_level)  # log lines to stderr, ids alone on stdout
    suppressions_service.configure(_signer(settings).secret)  # the same key as the API's
    actor = Principal("carnet-retention", Role.ADMIN, frozenset(), "cli")

    def echo(ids: Sequence[uuid.UUID]) -> None:
        for contact_id in ids:
            typer.echo(str(contact_id))

    async def run(sessions: async_sessionmaker[AsyncSession]) -> gdpr_service.RetentionReport:
        return await gdpr_service.run_retention(  # a real run commits every 1,000 people: printed as each commits
            sessions, days=settings.retention_prospect_days, dry_run=dry_run, actor=actor, committed=echo
        )

    report = _on_database(settings, run)
    if dry_run:
        echo(report.contact_ids)
    verb = "would be erased (dry run)" if dry_run else "erased"
    typer.echo(f"{len(report.contact_ids)} prospect(s) with no activity since {report.cutoff:%Y-%m-%d} {verb}",
               err=True)


secrets_cli = typer.Typer(help="Secrets at rest (destination API keys and signing secrets).", no_args_is_help=True)
cli.add_typer(secrets_cli, name="secrets")


@secrets_cli.command("rotate")
def secrets_rotate() -> None:
    """Re-encrypt every stored destination secret with the first key of SECRETS_KEYS (then drop the old key)."""
    from app.security.secrets import SecretBox
    from app.services import destinations as destinations_service

    settings = _settings()
    box = SecretBox.from_setting(settings.secrets_keys.get_secret_value() if settings.secrets_keys else None,
                                 fallback_master=_signer(settings).secret)

    async def rotate(session: AsyncSession) -> int:
        return await destinations_service.rotate_secrets(session, box=box)

    typer.echo(f"re-encrypted the secrets of {_in_transaction(settings, rotate)} destination(s)")


@cli.command()
def worker(
    once: Annotated[bool, typer.Option(help="Run due jobs, deliver what is due, then exit (cron, tests)")] = False,
) -> None:
    """Deliver the outbox to destinations and run background jobs, until SIGTERM/SIGINT.

    Run as many as you like against one database (they share the work with SKIP LOCKED and leases).
    In embedded mode `carnet serve` runs the worker itself.
    """
    settings = _settings()
    if settings.embedded:
        typer.echo("carnet: `carnet worker` needs DATABASE_URL; in embedded mode `carnet serve` runs the worker.",
                   err=True)
        raise typer.Exit(2)
    from app.logging import configure_logging

    configure_logging(json=settings.log_json, level=settings.log_level)  # the API's format: JSON lines, no PII
    with _reaching(settings.database_url):
        _require_schema(settings.database_url)
        asyncio.run(_run_worker(settings, once=once))


async def _run_worker(settings: Settings, *, once: bool) -> None:
    from app.security.secrets import SecretBox
    from app.worker import create_worker

    assert settings.database_url is not None
    engine = make_engine(settings.database_url, pool_size=settings.background_pool_size,
                         pool_timeout=BACKGROUND_POOL_TIMEOUT,
                         statement_timeout=settings.statement_timeout_worker_seconds)
    box = SecretBox.from_setting(settings.secrets_keys.get_secret_value() if settings.secrets_keys else None,
                                 fallback_master=_signer(settings).secret)
    the_worker = create_worker(make_sessionmaker(engine), settings, box=box)
    # As the API does (app/main.py): what exists now lives as long as the process and is kept out of every
    # collection's scan. Unfrozen, full collections stopped the worker's loop for 100-340 ms every few seconds
    # during a drain (docs/performance.md, "Orders to the vendors").
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # finish the batch in hand, then stop
    try:
        if once:
            await the_worker.catch_up()
        else:
            await the_worker.run(stop)
    finally:
        await the_worker.aclose()
        await engine.dispose()


@cli.command("export")
def export_contacts(
    format: Annotated[str, typer.Option("--format", help="csv or jsonl")] = "csv",
    segment: Annotated[str | None, typer.Option(help="Only contacts matching this segment (id)")] = None,
    list_id: Annotated[str | None, typer.Option("--list", help="Only members of this list (id)")] = None,
    list_status: Annotated[str | None, typer.Option(
        help="subscribed|pending|unsubscribed|any: members of --list in this status (default subscribed), or without "
             "--list contacts on at least one list in this status")] = None,
    delimiter: Annotated[str, typer.Option(help="CSV: ',' or ';' (French Excel)")] = ",",
    bom: Annotated[bool, typer.Option("--bom", help="CSV: start with a UTF-8 BOM (Excel)")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout)")] = None,
) -> None:
    """Export contacts as CSV or JSON Lines (as GET /v1/exports/contacts, unmasked), with a progress bar."""
    import uuid

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from app.services import exports as exports_service
    from app.services import journal as journal_service

    try:
        options = exports_service.ExportOptions(
            format=exports_service.ExportFormat(format), segment_id=uuid.UUID(segment) if segment else None,
            list_id=uuid.UUID(list_id) if list_id else None,
            list_status=exports_service.ListStatus(list_status) if list_status else None,
            delimiter=exports_service.Delimiter(delimiter), bom=bom)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = _settings()
    sink = output.open("wb") if output else sys.stdout.buffer
    progress = Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TextColumn("contacts"),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=False)

    async def run(sessions: async_sessionmaker[AsyncSession]) -> int:
        # The entry is committed before the first row leaves: an export cut short (`| head`, a full disk, a
        # timeout) gave rows out all the same, and its own transaction then rolls back (docs/gdpr.md).
        async with sessions.begin() as session:
            query = await exports_service.prepare(session, options, masked=False)
            connection = await driver_connection(session)
            total = int(await connection.fetchval(query.count_sql, *query.count_args))
            await journal_service.record(session, journal_service.act(
                operator(), "exports.contacts", kind="export", count=total, detail={
                    "format": options.format.value, "segment_id": segment, "list_id": list_id,
                    "list_status": options.effective_list_status, "output": str(output) if output else "stdout"}))
        async with sessions.begin() as session:
            connection = await driver_connection(session)
            lines = -1 if options.format is exports_service.ExportFormat.CSV else 0  # the header line
            with progress:
                task = progress.add_task("export", total=total)
                async for chunk in exports_service.stream(connection, query):
                    sink.write(chunk)
                    lines += chunk.count(b"\n")  # rows (a cell holding a line break counts twice: capped below)
                    progress.update(task, completed=min(max(lines, 0), total))
                progress.update(task, completed=total)
        return total

    try:
        count = _on_database(settings, run, statement_timeout=settings.statement_timeout_export_seconds)
    finally:
        if output:
            sink.close()
    typer.echo(f"{count} contact(s) exported" + (f" to {output}" if output else ""), err=True)


journal_cli = typer.Typer(help="The access journal (docs/gdpr.md).", no_args_is_help=True)
cli.add_typer(journal_cli, name="journal")


@journal_cli.command("verify")
def journal_verify() -> None:
    """Check the hash chain from its first kept entry; exit 1 at the first broken link."""
    from app.services import journal as journal_service

    settings = _settings()

    async def run(session: AsyncSession) -> tuple[int, Any, Any]:
        connection = await driver_connection(session)
        await journal_service.append(connection, [])  # acts still pending join the chain first
        checked, broken = await journal_service.verify(connection)
        head = await connection.fetchrow("SELECT seq, hash FROM journal_entry ORDER BY seq DESC LIMIT 1")
        return checked, broken, head

    checked, broken, head = _in_transaction(settings, run)
    if broken is not None:
        typer.echo(f"journal: BROKEN at entry {broken.seq}: {broken.reason} ({checked} entries before it hold)",
                   err=True)
        raise typer.Exit(1)
    where = f"; head {head['seq']} {head['hash'].hex()}" if head else ""
    typer.echo(f"journal: {checked} entries verified{where}")


@journal_cli.command("export")
def journal_export(
    since: Annotated[str | None, typer.Option(help="ISO date or time (UTC): entries at or after")] = None,
    until: Annotated[str | None, typer.Option(help="ISO date or time (UTC): entries before")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout)")] = None,
) -> None:
    """Entries as JSON Lines, oldest first, with their hashes (verifiable elsewhere)."""
    from datetime import UTC, datetime

    from app.schemas.journal import present_entry
    from app.services import journal as journal_service

    def instant(value: str | None) -> datetime | None:
        if value is None:
            return None
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise typer.BadParameter(f"not an ISO date or time: {value}") from None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    start, end = instant(since), instant(until)
    settings = _settings()
    sink = output.open("w", encoding="utf-8") if output else sys.stdout

    async def run(sessions: async_sessionmaker[AsyncSession]) -> int:
        async with sessions.begin() as session:  # reading the journal is journaled, as over the API; chained first
            await journal_service.record(session, journal_service.act(operator(), "journal.exported", detail={
                "since": since, "until": until, "output": str(output) if output else "stdout"}))
            await journal_service.append(await driver_connection(session), [])
        async with sessions.begin() as session:
            return await _journal_lines(await driver_connection(session))

    async def _journal_lines(connection: Any) -> int:
        written, after = 0, 0
        while True:
            rows = await connection.fetch(
                "SELECT * FROM journal_entry WHERE seq > $1 AND ($2::timestamptz IS NULL OR at >= $2) "
                "AND ($3::timestamptz IS NULL OR at < $3) ORDER BY seq LIMIT 5000", after, start, end)
            for row in rows:
                sink.write(json.dumps(present_entry(row), default=str, ensure_ascii=False) + "\n")
            written += len(rows)
            if len(rows) < 5000:
                return written
            after = rows[-1]["seq"]

    try:
        count = _on_database(settings, run)
    finally:
        if output:
            sink.close()
    typer.echo(f"{count} journal entr{'y' if count == 1 else 'ies'} exported", err=True)


@cli.command()
def openapi(
    output: Annotated[Path, typer.Option(help="Where to write the document")] = Path("openapi/openapi.json"),
) -> None:
    """Write the OpenAPI document of this version of the API."""
    from app.main import create_app

    _settings(needs_secret=False)  # a bad variable is one line here too, not a traceback from building the app
    document = create_app(Settings(jwt_secret="x" * 32, database_url="postgresql://unused/")).openapi()  # type: ignore[arg-type]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    typer.echo(f"wrote {output}")


def _signer(settings: Settings) -> TokenSigner:
    try:
        return TokenSigner(**token_signer_options(settings))  # type: ignore[arg-type]
    except (ValueError, ConfigurationError) as exc:
        typer.echo(f"carnet: {exc}", err=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _database(settings: Settings, *, url: str | None = None, migrate: bool = True) -> Iterator[str]:
    """The database of one command: the embedded server is started for it when needed (and migrated, unless the
    command is `migrate` itself), and stopped after; a refusal by the service layer is a clean `carnet: ...`, exit 1."""
    embedded = EmbeddedPostgres(settings.data_dir) if settings.embedded and url is None else None
    target = url or (embedded.start() if embedded else settings.database_url)
    assert target is not None
    try:
        with _reaching(target):
            if embedded and migrate:  # this checkout's own database: brought to head by any command, as `serve` does
                from app.migrations import upgrade

                upgrade(target)
            elif migrate and url is None:  # DATABASE_URL's: `carnet migrate` is the operator's step
                _require_schema(target)
            yield target
    except AppError as exc:
        typer.echo(f"carnet: {exc.detail}", err=True)
        raise typer.Exit(1) from None
    finally:
        if embedded:
            embedded.stop()


@contextlib.contextmanager
def _reaching(url: str) -> Iterator[None]:
    """A database that cannot be reached, or refuses the login, is one line naming it (never its password), exit 1,
    rather than a page of traceback."""
    from app.db import connection_failure, describe_url

    try:
        yield
    except Exception as exc:
        reason = connection_failure(exc)
        if reason is None:
            raise
        typer.echo(f"carnet: cannot use the database at {describe_url(url)}: {reason} (is PostgreSQL running, and "
                   "is DATABASE_URL right?)", err=True)
        raise typer.Exit(1) from None


def _require_schema(url: str) -> None:
    """Refuse, in one line, a database whose schema is behind this code: run against it, a command or the worker
    would fail part-way on a missing table or column (a newer schema, during a rolling upgrade, is fine)."""
    from app.migrations import database_revision, head_revision, schema_state

    current = asyncio.run(database_revision(url))
    if schema_state(current) != "behind":
        return
    found = "has no Carnet schema" if current is None else f"schema is at {current}"
    typer.echo(f"carnet: the database {found} and this Carnet needs {head_revision()}: run `carnet migrate` first",
               err=True)
    raise typer.Exit(1)


def _in_transaction(
    settings: Settings, work: Callable[[AsyncSession], Awaitable[T]], *, url: str | None = None,
    statement_timeout: float | None = None,
) -> T:
    """Run one unit of work against the database (the embedded one is started when needed), each statement under
    `statement_timeout` seconds (default: the worker's, STATEMENT_TIMEOUT_WORKER_SECONDS)."""

    async def one(sessions: async_sessionmaker[AsyncSession]) -> T:
        async with sessions.begin() as session:
            return await work(session)

    return _on_database(settings, one, url=url, statement_timeout=statement_timeout)


def _on_database(
    settings: Settings, work: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]], *, url: str | None = None,
    statement_timeout: float | None = None,
) -> T:
    """Like `_in_transaction`, for a command that needs more than one transaction."""

    async def run(target: str) -> T:
        engine = make_engine(target, pool_size=1,
                             statement_timeout=statement_timeout or settings.statement_timeout_worker_seconds)
        try:
            return await work(make_sessionmaker(engine))
        finally:
            await engine.dispose()

    with _database(settings, url=url) as target:
        return asyncio.run(run(target))


def _print_bootstrap_token(settings: Settings, url: str, base: str) -> None:
    """A database that never had an admin token gets one, printed, so a fresh install can be used at once."""

    async def create(session: AsyncSession) -> IssuedToken | None:
        return await tokens_service.bootstrap_admin(session, _signer(settings),
                                                    ttl_seconds=settings.jwt_default_ttl_seconds,
                                                    actor=cli_actor("carnet serve"))

    issued = _in_transaction(settings, create, url=url)
    if issued is None:
        _say("admin tokens: `carnet token create --role admin --subject you@shop.example` (this database already "
             "had one: its first was printed, or minted, before)")
        return
    print(
        "\nFirst run on this database: an admin token, shown once (mint more with `carnet token create`):\n\n"
        f"  {issued.token}\n\n  curl -H 'Authorization: Bearer <the token>' {base}/v1/contacts\n",
        file=sys.stderr,
        flush=True,
    )


@cli.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="The CSV file")],
    list_id: Annotated[str | None, typer.Option("--list", help="Subscribe every imported row to this list id")] = None,
    consent_source: Annotated[
        str | None, typer.Option(help="Where the file's consent was collected (needed with --list)")] = None,
    consent_wording: Annotated[
        str | None, typer.Option(help="The wording people agreed to (default: the source)")] = None,
    mode: Annotated[str, typer.Option(help="upsert | create_only | update_only")] = "upsert",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and report; write no contact")] = False,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag added to every row (repeatable)")] = None,
    blank_erases: Annotated[bool, typer.Option("--blank-erases", help="Empty cells clear stored values")] = False,
    mapping: Annotated[
        str | None, typer.Option(help='JSON {"column": "field"}; guessed from headers when absent')] = None,
) -> None:
    """Import a CSV file (Excel's UTF-8 or Windows-1252, `,` `;` or tab) with a progress bar; prints the summary."""
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from app.logging import configure_logging
    from app.schemas.imports import ImportOptions
    from app.services.imports.local import import_file

    settings = _settings()
    configure_logging(json=settings.log_json, level="WARNING")
    try:
        consent = None
        if list_id is not None:
            if not consent_source:
                raise typer.BadParameter("--list needs --consent-source (where people agreed to be emailed)")
            consent = {"source": consent_source, "proof": {"wording": consent_wording or consent_source}}
        options = ImportOptions.model_validate({
            "mode": mode, "dry_run": dry_run, "tags": tag or [], "blank_erases": blank_erases, "list_id": list_id,
            "consent": consent, "mapping": json.loads(mapping) if mapping else None,
        })
    except (ValidationError, ValueError) as exc:
        typer.echo(f"carnet: {exc}", err=True)
        raise typer.Exit(2) from None
    actor = operator()
    lines = 0
    with file.open("rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
    with _database(settings) as url, Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[summary]}"), TimeElapsedColumn()) as bar:
        task = bar.add_task(file.name, total=max(lines - 1, 1), summary="")

        def show(counts: Any) -> None:
            bar.update(task, completed=counts["processed_rows"],
                       summary=f"{counts['created']} new, {counts['updated']} updated, {counts['rejected']} rejected")

        job = asyncio.run(import_file(settings, url, file, options, actor=actor, progress=show))
        bar.update(task, total=job["processed_rows"] or 1, completed=job["processed_rows"])
        report = _write_rejects(url, job, file) if job["rejected"] or job["skipped"] else None
    elapsed = (job["finished_at"] - job["started_at"]).total_seconds() if job["finished_at"] else 0
    typer.echo(
        f"import {job['id']}: {job['status']}{' (dry run)' if dry_run else ''} — {job['processed_rows']} rows: "
        f"{job['created']} created, {job['updated']} updated, {job['unchanged']} unchanged, {job['skipped']} skipped, "
        f"{job['rejected']} rejected, {job['subscribed']} subscribed; "
        f"{job['processed_rows'] / max(elapsed, 1e-9):.0f} rows/s"
    )
    if job["error"]:
        typer.echo(f"carnet: {job['error']}", err=True)
    if report:
        typer.echo(report)
    if job["status"] != "done":
        raise typer.Exit(1)


def _write_rejects(url: str, job: Any, file: Path) -> str:
    """The rejected and skipped rows, with their reasons, beside the imported file: where to read them."""
    from app.services.imports.local import write_report

    target = file.with_name(f"{file.stem}.rejects.csv")
    try:
        asyncio.run(write_report(url, job["id"], target))
    except OSError as exc:
        return (f"rejected and skipped rows: could not write {target} ({exc.strerror}); read them with "
                f"GET /v1/imports/{job['id']}/rejects")
    return f"rejected and skipped rows, with the reason for each: {target}"


def main() -> None:
    try:
        cli()
    except ConfigurationError as exc:  # found while building the app (`carnet serve`): a line, not a traceback
        typer.echo(f"carnet: {exc}", err=True)
        sys.exit(2)
