"""The bootstrap admin token: one per database, even when several processes boot against it at once."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cli import cli_actor
from app.db import make_sessionmaker
from app.security.tokens import IssuedToken, TokenSigner
from app.services import tokens as tokens_service
from tests.auth import TEST_SECRET

pytestmark = pytest.mark.committing


async def test_concurrent_boots_of_a_new_database_issue_exactly_one_admin_token(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("DELETE FROM access_token"))  # a database that never had an admin token
    makers = make_sessionmaker(engine)
    signer = TokenSigner(TEST_SECRET)

    async def boot() -> IssuedToken | None:
        async with makers.begin() as session:
            return await tokens_service.bootstrap_admin(session, signer, ttl_seconds=3600,
                                                        actor=cli_actor("carnet serve"))

    try:
        issued = [t for t in await asyncio.gather(*(boot() for _ in range(5))) if t is not None]
        async with engine.connect() as connection:
            stored = (await connection.execute(text("SELECT jti, role, issued_by FROM access_token"))).all()
        assert len(issued) == 1
        assert [tuple(row) for row in stored] == [(issued[0].token_id, "admin", "carnet serve")]

        # Revoked or expired, an admin token still counts: a server's log shows one admin token in its life.
        async with makers.begin() as session:
            await tokens_service.revoke(session, issued[0].token_id, actor=cli_actor("test"))
        assert await boot() is None
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("DELETE FROM access_token"))

