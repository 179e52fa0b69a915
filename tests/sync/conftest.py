"""Fixtures of the end-to-end sync tests: live spec-checking fakes and the production worker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import make_sessionmaker
from app.settings import Settings
from app.worker import Worker, create_worker
from tests.fakes.brevo import FakeBrevo
from tests.fakes.mailchimp import FakeMailchimp
from tests.fakes.server import LiveServer
from tests.sync.keys import BREVO_KEY, MC_KEY


@pytest.fixture
def mailchimp() -> Iterator[tuple[FakeMailchimp, LiveServer]]:
    fake = FakeMailchimp(api_key=MC_KEY, lists={"mc-news", "mc-vip"})
    with LiveServer(fake) as live:
        yield fake, live
    assert fake.violations == []


@pytest.fixture
def brevo() -> Iterator[tuple[FakeBrevo, LiveServer]]:
    fake = FakeBrevo(api_key=BREVO_KEY, lists={7, 8, 9})
    with LiveServer(fake) as live:
        yield fake, live
    assert fake.violations == []


@pytest_asyncio.fixture(loop_scope="session")
async def worker(engine: AsyncEngine, settings: Settings, app: FastAPI) -> AsyncIterator[Worker]:
    local = settings.model_copy(update={"sync_allow_private_networks": True, "sync_call_deadline_seconds": 5.0})
    w = create_worker(make_sessionmaker(engine), local, box=app.state.secret_box)
    yield w
    await w.aclose()
