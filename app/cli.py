"""The `carnet` command: serve, worker, migrate, token, lifecycle, retention, openapi."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import make_engine, make_sessionmaker
from app.embedded import EmbeddedPostgres
from app.errors import AppError
from app.security import Role, Scope
from app.security.tokens import IssuedToken, TokenSigner
from app.services import tokens as tokens_service
from app.settings import ConfigurationError, Settings, get_settings, token_signer_options

T = TypeVar("T")

__all__ = ["main"]

cli = typer.Typer(help="Carnet: the customer file as an API.", no_args_is_help=True, add_completion=False)
token_cli = typer.Typer(help="Access tokens.", no_args_is_help=True)
cli.add_typer(token_cli, name="token")

_TTL = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _settings() -> Settings:
    from pydantic import ValidationError

    try:
        settings = get_settings()
        settings.resolved_jwt_secret()
    except ValidationError as exc:  # a variable out of range: say which, in one line each, not a traceback
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper()
            typer.echo(f"carnet: {name}: {error['msg']}", err=True)
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
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
) -> None:
    """Migrate the database, then serve the API (starting the embedded PostgreSQL when DATABASE_URL is unset)."""
    import uvicorn

    from app.main import create_app
    from app.migrations import upgrade

    settings = _settings()
    embedded = EmbeddedPostgres(settings.data_dir) if settings.embedded else None
    url = embedded.start() if embedded else settings.database_url
    assert url is not None
    try:
        upgrade(url)
        _print_bootstrap_token(settings, url)
        app = create_app(settings, database_url=url)
        # The lifespan stops the embedded server: uvicorn re-raises SIGTERM/SIGINT after its shutdown,
        # so code after run() (this function's finally) does not run on a signal.
        app.state.embedded = embedded
        uvicorn.run(app, host=host, port=port, log_config=None, proxy_headers=False)
    finally:
        if embedded:
            embedded.stop()


@cli.command()
def migrate() -> None:
    """Bring the database schema to the newest migration."""
    from app.migrations import upgrade

    with _database(_settings()) as url:
        upgrade(url)
        typer.echo("schema is at head")


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
            ttl_seconds=ttl_seconds, issued_by="cli",
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
        state = f"revoked {row['revoked_at']:%Y-%m-%d}" if row["revoked_at"] else f"expires {row['expires_at']:%Y-%m-%d}"
        typer.echo(f"{row['jti']}  {row['role']:<11} {row['subject']}  {state}")


@token_cli.command("revoke")
def token_revoke(jti: Annotated[str, typer.Argument(help="The token id (jti)")]) -> None:
    """Revoke a token; every API process refuses it from its next request."""
    settings = _settings()

    async def revoke(session: AsyncSession) -> dict[str, Any]:
        return await tokens_service.revoke(session, jti, revoked_by="cli")

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

    async def run(session: AsyncSession) -> gdpr_service.RetentionReport:
        return await gdpr_service.run_retention(
            session, days=settings.retention_prospect_days, dry_run=dry_run, actor=actor
        )

    report = _in_transaction(settings, run)
    for contact_id in report.contact_ids:
        typer.echo(str(contact_id))
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
    asyncio.run(_run_worker(settings, once=once))


async def _run_worker(settings: Settings, *, once: bool) -> None:
    from app.security.secrets import SecretBox
    from app.worker import create_worker

    assert settings.database_url is not None
    engine = make_engine(settings.database_url, pool_size=4,
                         statement_timeout=settings.statement_timeout_worker_seconds)
    box = SecretBox.from_setting(settings.secrets_keys.get_secret_value() if settings.secrets_keys else None,
                                 fallback_master=_signer(settings).secret)
    the_worker = create_worker(make_sessionmaker(engine), settings, box=box)
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
    list_status: Annotated[str, typer.Option(help="With --list: subscribed|pending|unsubscribed|any")] = "subscribed",
    delimiter: Annotated[str, typer.Option(help="CSV: ',' or ';' (French Excel)")] = ",",
    bom: Annotated[bool, typer.Option("--bom", help="CSV: start with a UTF-8 BOM (Excel)")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout)")] = None,
) -> None:
    """Export contacts as CSV or JSON Lines (as GET /v1/exports/contacts, unmasked), with a progress bar."""
    import uuid

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from app.services import exports as exports_service

    try:
        options = exports_service.ExportOptions(
            format=exports_service.ExportFormat(format), segment_id=uuid.UUID(segment) if segment else None,
            list_id=uuid.UUID(list_id) if list_id else None, list_status=exports_service.ListStatus(list_status),
            delimiter=exports_service.Delimiter(delimiter), bom=bom)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = _settings()
    sink = output.open("wb") if output else sys.stdout.buffer
    progress = Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TextColumn("contacts"),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=False)

    async def run(session: AsyncSession) -> int:
        query = await exports_service.prepare(session, options, masked=False)
        connection = (await (await session.connection()).get_raw_connection()).driver_connection
        total = int(await connection.fetchval(query.count_sql, *query.count_args))
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
        count = _in_transaction(settings, run, statement_timeout=settings.statement_timeout_export_seconds)
    finally:
        if output:
            sink.close()
    typer.echo(f"{count} contact(s) exported" + (f" to {output}" if output else ""), err=True)


@cli.command()
def openapi(
    output: Annotated[Path, typer.Option(help="Where to write the document")] = Path("openapi/openapi.json"),
) -> None:
    """Write the OpenAPI document of this version of the API."""
    from app.main import create_app

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
def _database(settings: Settings, *, url: str | None = None) -> Iterator[str]:
    """The database of one command: the embedded server is started for it when needed, and stopped after;
    a refusal by the service layer is a clean `carnet: ...` and exit 1."""
    embedded = EmbeddedPostgres(settings.data_dir) if settings.embedded and url is None else None
    target = url or (embedded.start() if embedded else settings.database_url)
    assert target is not None
    try:
        if embedded:  # this checkout's own database: brought to head by any command, as `serve` does
            from app.migrations import upgrade

            upgrade(target)
        yield target
    except AppError as exc:
        typer.echo(f"carnet: {exc.detail}", err=True)
        raise typer.Exit(1) from None
    finally:
        if embedded:
            embedded.stop()


def _in_transaction(
    settings: Settings, work: Callable[[AsyncSession], Awaitable[T]], *, url: str | None = None,
    statement_timeout: float | None = None,
) -> T:
    """Run one unit of work against the database (the embedded one is started when needed), each statement under
    `statement_timeout` seconds (default: the worker's, STATEMENT_TIMEOUT_WORKER_SECONDS)."""

    async def run(target: str) -> T:
        engine = make_engine(target, pool_size=1,
                             statement_timeout=statement_timeout or settings.statement_timeout_worker_seconds)
        try:
            async with make_sessionmaker(engine).begin() as session:
                return await work(session)
        finally:
            await engine.dispose()

    with _database(settings, url=url) as target:
        return asyncio.run(run(target))


def _print_bootstrap_token(settings: Settings, url: str) -> None:
    """The first run prints an admin token, so a fresh install can be used at once."""
    marker = settings.data_dir / "bootstrap_token_issued"
    if marker.exists():
        return

    async def create(session: AsyncSession) -> IssuedToken:
        return await tokens_service.issue(
            session, _signer(settings), subject="bootstrap-admin", role=Role.ADMIN, scopes=None,
            ttl_seconds=settings.jwt_default_ttl_seconds, issued_by="carnet serve",
        )

    issued = _in_transaction(settings, create, url=url)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(issued.expires_at.isoformat() + "\n")
    print(
        "\nFirst run: an admin token (shown once; mint more with `carnet token create`):\n\n"
        f"  {issued.token}\n\n  curl -H 'Authorization: Bearer <token>' http://HOST:PORT/v1/contacts\n",
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
    import getpass

    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from app.logging import configure_logging
    from app.schemas.imports import ImportOptions
    from app.security import Principal
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
    actor = Principal(f"cli:{getpass.getuser()}", Role.ADMIN, frozenset(), "cli")
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
    elapsed = (job["finished_at"] - job["started_at"]).total_seconds() if job["finished_at"] else 0
    typer.echo(
        f"import {job['id']}: {job['status']}{' (dry run)' if dry_run else ''} — {job['processed_rows']} rows: "
        f"{job['created']} created, {job['updated']} updated, {job['unchanged']} unchanged, {job['skipped']} skipped, "
        f"{job['rejected']} rejected, {job['subscribed']} subscribed; "
        f"{job['processed_rows'] / max(elapsed, 1e-9):.0f} rows/s"
    )
    if job["error"]:
        typer.echo(f"carnet: {job['error']}", err=True)
    if job["rejected"] or job["skipped"]:
        typer.echo(f"reasons per row: GET /v1/imports/{job['id']}/rejects")
    if job["status"] != "done":
        raise typer.Exit(1)


def main() -> None:
    cli()
