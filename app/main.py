"""The application factory: settings in, a FastAPI app out; resources built in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.costly_gate import CostlyReadGate, costly_routes
from app.db import (
    BACKGROUND_POOL_TIMEOUT,
    make_engine,
    make_read_sessionmaker,
    make_sessionmaker,
    plain_dsn,
    server_settings,
)
from app.embedded import EmbeddedPostgres
from app.errors import InvalidInput, UnsupportedMediaType, problems
from app.fastpath import ContactReadFastPath, ContactUpsertFastPath, contact_read_route, contact_upsert_route
from app.jobs import run_periodically
from app.journal import Journal, JournalReads
from app.logging import configure_logging, get_logger
from app.methods import MethodGate
from app.middleware import BodySizeLimit, RequestContext
from app.migrations import head_revision
from app.problems import install_problem_handlers
from app.routers import health_router, inbound_router, public_router, v1_router
from app.routers.deps import Problem
from app.routers.docs import install as install_docs
from app.routers.duplicates import router as duplicates_router
from app.routers.exports import router as exports_router
from app.schemas.destinations import config_components as destination_config_components
from app.schemas.types import configure_phone_region
from app.security.costly import CostlyReads
from app.security.ratelimit import SignupLimits, TokenBuckets
from app.security.revocation import RevocationList
from app.security.secrets import SecretBox
from app.security.tokens import TokenSigner
from app.services import segment_schema
from app.services import suppressions as suppressions_service
from app.services.orders import LifecyclePolicy
from app.services.pagination import CursorCodec
from app.settings import ConfigurationError, Settings, get_settings, token_signer_options
from app.timeouts import StatementTimeouts, make_costly_engine
from app.worker import create_worker, run_in_background

__all__ = ["create_app"]

log = get_logger("carnet.app")


def create_app(settings: Settings | None = None, *, database_url: str | None = None) -> FastAPI:
    """Build the app. `database_url` overrides the settings (the CLI passes the embedded server's)."""
    settings = settings or get_settings()
    configure_logging(json=settings.log_json, level=settings.log_level)
    configure_phone_region(settings.default_phone_region)
    try:
        signer = TokenSigner(**token_signer_options(settings))  # type: ignore[arg-type]
    except ValueError as exc:  # refuses to boot on an inconsistent key setup
        raise ConfigurationError(str(exc)) from None
    # Keys the suppression list's hashes (GDPR erasure). Its own setting, because rotating JWT_SECRET must
    # not silently un-suppress every erased person; it falls back to the JWT secret when unset.
    suppressions_service.configure(settings.resolved_suppression_key())

    app = FastAPI(
        title="Carnet",
        version=version("carnet"),
        summary="The customer file of an e-commerce business, as an API.",
        lifespan=_lifespan,
        docs_url=None,  # served by app.routers.docs from installed files, not from a CDN
        redoc_url=None,
        # FastAPI's own OpenTelemetry off: Carnet's metrics are Prometheus (`GET /metrics`), and FastAPI's logs
        # record validation failures with their messages, i.e. the personal data sent. On, it asked the global
        # OpenTelemetry providers (each an environment lookup) on every request: ~4% of an upsert's server CPU.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings
    app.state.database_url = database_url or settings.database_url
    app.state.token_signer = signer
    app.state.revocations = RevocationList()
    app.state.rate_limiter = TokenBuckets(rate=settings.rate_limit_per_second, burst=settings.rate_limit_burst)
    app.state.signup_limits = SignupLimits(
        ip_per_minute=settings.signup_ip_per_minute, ip_burst=settings.signup_ip_burst,
        list_per_minute=settings.signup_list_per_minute, list_burst=settings.signup_list_burst)
    app.state.timeouts = StatementTimeouts.from_settings(settings)
    app.state.costly_reads = CostlyReads.from_settings(settings)
    app.state.costly_sessionmaker = None  # the costly reads' own pool, from the lifespan (app.timeouts)
    app.state.cursor_codec = CursorCodec(signer.secret)
    app.state.schema_head = head_revision()
    app.state.lifecycle_policy = lifecycle_policy(settings)
    app.state.journal = Journal(flush_seconds=settings.journal_flush_seconds,
                                max_buffer=settings.journal_buffer_max) if settings.journal_enabled else None
    app.state.secret_box = SecretBox.from_setting(
        settings.secrets_keys.get_secret_value() if settings.secrets_keys else None, fallback_master=signer.secret)

    install_problem_handlers(app)
    app.include_router(health_router)
    install_docs(app)
    app.include_router(duplicates_router)  # before v1_router: /v1/contacts/duplicates is not a contact id
    app.include_router(exports_router)
    app.include_router(v1_router)
    app.include_router(public_router)
    app.include_router(inbound_router)
    # Innermost of ours: inside BodySizeLimit and RequestContext (docs/performance.md); the costly-read gate inside
    # the fast paths, which never meet a costly route, so contact reads do not pay for its matching.
    if settings.costly_read_gate:
        app.add_middleware(CostlyReadGate, routes=costly_routes(app))
    if settings.fast_read_path:
        app.add_middleware(ContactReadFastPath, read=contact_read_route(app))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       uploads={"/v1/imports": settings.import_max_bytes})
    # Outside the body limit and the fast paths: a method a path does not serve is a 405 before anything reads it.
    app.add_middleware(MethodGate, routes=app.routes)
    if settings.fast_upsert_path:  # outside those two, taking only what both let through (app/fastpath.py)
        app.add_middleware(ContactUpsertFastPath, upsert=contact_upsert_route(app), max_bytes=settings.max_body_bytes)
    if app.state.journal is not None:  # inside RequestContext (the request id), around everything that answers
        app.add_middleware(JournalReads, journal=app.state.journal)
    # Outermost: every response, errors included, carries X-Request-ID; metrics and logs name the route's template.
    app.add_middleware(RequestContext, routes=app.routes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    embedded: EmbeddedPostgres | None = getattr(app.state, "embedded", None)  # started by `carnet serve`
    url = app.state.database_url
    if url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        url = embedded.start()
    timeouts: StatementTimeouts = app.state.timeouts
    engine = make_engine(url, pool_size=settings.database_pool_size, pool_timeout=settings.database_pool_timeout,
                         statement_timeout=timeouts.interactive)
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.read_sessionmaker = make_read_sessionmaker(engine)
    replica = make_engine(settings.database_replica_url, pool_size=settings.database_pool_size,
                          pool_timeout=settings.database_pool_timeout,
                          statement_timeout=timeouts.interactive) if settings.database_replica_url else None
    app.state.replica_sessionmaker = make_read_sessionmaker(replica) if replica else app.state.read_sessionmaker
    slots: CostlyReads = app.state.costly_reads
    costly = make_costly_engine(settings.database_replica_url or url, timeouts, pool_size=slots.per_process,
                                pool_timeout=settings.database_pool_timeout)
    app.state.costly_sessionmaker = make_sessionmaker(costly)
    # Background work in this process (lifecycle refresh, the embedded worker) runs under the worker's timeout, on
    # its own small pool (as `carnet worker` does), so it never takes the API's connections either.
    jobs_engine = make_engine(url, pool_size=settings.background_pool_size, pool_timeout=BACKGROUND_POOL_TIMEOUT,
                              statement_timeout=timeouts.worker)
    app.state.jobs_sessionmaker = jobs = make_sessionmaker(jobs_engine)
    revocations: RevocationList = app.state.revocations
    revocations.start(plain_dsn(url), server_settings=server_settings(statement_timeout=timeouts.interactive))
    lifecycle = None
    if settings.lifecycle_refresh_seconds:
        lifecycle = asyncio.create_task(run_periodically(
            jobs, lifecycle_policy(settings), every_seconds=settings.lifecycle_refresh_seconds))
    journal: Journal | None = app.state.journal  # on the API's pool: a short transaction every tick
    journaling = asyncio.create_task(journal.run(app.state.sessionmaker)) if journal is not None else None
    log.info("app.started", embedded=embedded is not None)
    in_process_worker = settings.run_worker_in_api if settings.run_worker_in_api is not None else settings.embedded
    background = contextlib.AsyncExitStack()
    if in_process_worker:
        await background.enter_async_context(run_in_background(
            create_worker(jobs, settings, box=app.state.secret_box)))
    # What exists now lives as long as the process: frozen, it is out of every collection's scan. Unfrozen, each
    # full collection walked it all, ~100 ms stalls about once a second under load (p99; docs/performance.md).
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        await background.aclose()
        if journaling is not None:  # after the in-process worker: its last acts are chained too
            journaling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await journaling
        if lifecycle is not None:
            lifecycle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lifecycle
        await revocations.stop()
        app.state.costly_sessionmaker = None
        await costly.dispose()
        await engine.dispose()
        await jobs_engine.dispose()
        if replica is not None:
            await replica.dispose()
        if embedded is not None:
            embedded.stop()


def lifecycle_policy(settings: Settings) -> LifecyclePolicy:
    return LifecyclePolicy(settings.loyal_min_orders, settings.loyal_window_days, settings.lapsed_after_days)


def _document_validation_problems(schema: dict[str, Any]) -> None:
    """FastAPI documents its own 422 shape where a route did not; the app always answers a problem+json."""
    default = "#/components/schemas/HTTPValidationError"
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            content = operation.get("responses", {}).get("422", {}).get("content", {})
            if content.get("application/json", {}).get("schema", {}).get("$ref") == default:
                operation["responses"]["422"] = problems(InvalidInput)[422]
    components = schema["components"]["schemas"]
    if default not in json.dumps(schema["paths"]):
        components.pop("HTTPValidationError", None)
        if "#/components/schemas/ValidationError" not in json.dumps(schema):
            components.pop("ValidationError", None)


def _document_media_type_problems(schema: dict[str, Any]) -> None:
    """A JSON body sent without `Content-Type: application/json` is a 415 (app.problems), on every such route."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                operation["responses"].setdefault("415", problems(UnsupportedMediaType)[415])


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = Problem.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        defs = schema["components"]["schemas"]["Problem"].pop("$defs", {})
        schema["components"]["schemas"].update(defs)
        # The segment filter grammar: recursive, so a component of its own (the Filter type refers to it); and each
        # destination kind's config (DestinationCreate refers to them). Written by hand: one named like a model would
        # replace that model's schema wherever the document refers to it (the /count answer was once `{op, value}`).
        for components in (segment_schema.filter_components(), destination_config_components()):
            taken = sorted(components.keys() & schema["components"]["schemas"].keys())
            if taken:
                raise RuntimeError(f"OpenAPI components named twice: {', '.join(taken)}")
            schema["components"]["schemas"].update(components)
        _document_validation_problems(schema)
        _document_media_type_problems(schema)
        app.openapi_schema = schema
    return app.openapi_schema
