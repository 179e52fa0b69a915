"""The `carnet` command: serve, migrate, token, openapi."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.security import Role, Scope
from app.security.tokens import issue_access_token
from app.settings import ConfigurationError, Settings, get_settings

__all__ = ["main"]

cli = typer.Typer(help="Carnet: the customer file as an API.", no_args_is_help=True, add_completion=False)
token_cli = typer.Typer(help="Access tokens.", no_args_is_help=True)
cli.add_typer(token_cli, name="token")

_TTL = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _settings() -> Settings:
    settings = get_settings()
    try:
        settings.resolved_jwt_secret()
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

    from app.embedded import EmbeddedPostgres
    from app.main import create_app
    from app.migrations import upgrade

    settings = _settings()
    embedded = EmbeddedPostgres(settings.data_dir) if settings.embedded else None
    url = embedded.start() if embedded else settings.database_url
    assert url is not None
    try:
        upgrade(url)
        _print_bootstrap_token(settings)
        app = create_app(settings, database_url=url)
        uvicorn.run(app, host=host, port=port, log_config=None, proxy_headers=False)
    finally:
        if embedded:
            embedded.stop()


@cli.command()
def migrate() -> None:
    """Bring the database schema to the newest migration."""
    from app.embedded import EmbeddedPostgres
    from app.migrations import upgrade

    settings = _settings()
    embedded = EmbeddedPostgres(settings.data_dir) if settings.embedded else None
    url = embedded.start() if embedded else settings.database_url
    assert url is not None
    try:
        upgrade(url)
        typer.echo("schema is at head")
    finally:
        if embedded:
            embedded.stop()


@token_cli.command("create")
def token_create(
    role: Annotated[Role, typer.Option(help="admin, manager, editor, viewer or integration")],
    subject: Annotated[str, typer.Option(help="Who the token is for, e.g. owner@shop.example")],
    ttl: Annotated[str, typer.Option(help="Lifetime: 3600, 90m, 12h, 30d")] = "30d",
    scope: Annotated[list[Scope] | None, typer.Option(help="Narrow to these scopes (repeatable)")] = None,
) -> None:
    """Mint a token; it is printed alone on the last line."""
    settings = _settings()
    try:
        issued = issue_access_token(
            settings.resolved_jwt_secret(), subject=subject, role=role,
            scopes=frozenset(scope) if scope else None, ttl_seconds=_ttl_seconds(ttl),
            issuer=settings.jwt_issuer, audience=settings.jwt_audience,
        )
    except ValueError as exc:
        typer.echo(f"carnet: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"# {role.value} token for {subject}, expires {issued.expires_at.isoformat()}", err=True)
    typer.echo(issued.token)


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


def _print_bootstrap_token(settings: Settings) -> None:
    """The first run prints an admin token, so a fresh install can be used at once."""
    marker = settings.data_dir / "bootstrap_token_issued"
    if marker.exists():
        return
    issued = issue_access_token(
        settings.resolved_jwt_secret(), subject="bootstrap-admin", role=Role.ADMIN,
        ttl_seconds=settings.jwt_default_ttl_seconds, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
    )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(issued.expires_at.isoformat() + "\n")
    print(
        "\nFirst run: an admin token (shown once; mint more with `carnet token create`):\n\n"
        f"  {issued.token}\n\n  curl -H 'Authorization: Bearer <token>' http://HOST:PORT/v1/contacts\n",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    cli()
