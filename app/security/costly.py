"""Costly reads (counts, previews, segment members, `?segment=`, duplicates, exports): a few at a time.

One such read may scan every contact. Unbounded, twenty of them held every pooled connection and both cores, and
everyone else got 503 (issue 15, class 3). Two bounds, both counted in this API process:

- per token, COSTLY_READS_PER_TOKEN in flight (waiting ones included): one more is refused at once with 429
  `costly-reads-per-token` and Retry-After; the token's other requests go on;
- per process, COSTLY_READS_PER_PROCESS running (default: half the machine's cores): at most that many of the
  database's cores and of the DATABASE_POOL_SIZE pooled connections serve costly reads, the others stay free for
  everything else. One more waits its turn (first come, first served) for up to DATABASE_POOL_TIMEOUT, then gets
  503 `costly-reads-busy` with Retry-After; when COSTLY_READS_QUEUE reads already wait, it gets that 503 at once.

Retry-After of both refusals is drawn from 1-3 s per answer: a crowd refused together must not come back together
(each burst of refusals stalled the event loop, docs/security.md "Class 3"). app.costly_gate takes the slot before
FastAPI routes the request, so a refusal costs little more than checking the token.

Each costly read runs under STATEMENT_TIMEOUT_COSTLY_SECONDS (app.timeouts), so a slot is never held long. With N
API processes each counts its own: a token holds at most N x COSTLY_READS_PER_TOKEN costly reads, the database
serves at most N x COSTLY_READS_PER_PROCESS (docs/security.md, "Class 3").
"""

# No `from __future__ import annotations`: FastAPI reads `costly`'s closure annotations, which name a local.

import asyncio
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Self

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import RateLimited, ServiceUnavailable
from app.security.principal import Principal, require
from app.security.scopes import Scope
from app.settings import ConfigurationError, Settings
from app.timeouts import StatementTimeout, session_within

__all__ = [
    "COSTLY_PROBLEMS",
    "RETRY_AFTER_SECONDS",
    "CostlyReads",
    "CostlyReadsBusy",
    "TooManyCostlyReads",
    "costly",
    "costly_read",
    "costly_scopes",
]

# Whole seconds, as HTTP's Retry-After requires; drawn per answer so that refused clients spread their retries.
RETRY_AFTER_SECONDS = (1, 3)


def retry_after() -> int:
    return random.randint(*RETRY_AFTER_SECONDS)  # noqa: S311 (spreading load, not a secret)


class TooManyCostlyReads(RateLimited):
    slug, title = "costly-reads-per-token", "This token already has its share of costly reads in flight"

    def __init__(self, per_token: int, /) -> None:
        super().__init__(retry_after())
        self.detail = (f"at most {per_token} counts, previews, segment member pages, duplicate pages or exports at "
                       "once per token: retry when one has finished")


class CostlyReadsBusy(ServiceUnavailable):
    slug, title = "costly-reads-busy", "Every slot for costly reads is taken; retry shortly"

    def __init__(self, detail: str, /) -> None:
        super().__init__(detail, retry_after=retry_after())


# What a costly route may answer besides its own problems (for `responses=problems(...)`).
COSTLY_PROBLEMS = (TooManyCostlyReads, CostlyReadsBusy, StatementTimeout)


class CostlyReads:
    """The slots of one API process: `per_token` in flight per token id, `per_process` running at once, `queue`
    waiting for one of those."""

    def __init__(self, *, per_token: int, per_process: int, queue: int, wait_seconds: float) -> None:
        self.per_token, self.per_process, self.queue, self.wait_seconds = per_token, per_process, queue, wait_seconds
        self._in_flight: dict[str, int] = {}   # token id -> its costly reads waiting or running (no entry at 0)
        self._running = asyncio.Semaphore(per_process)
        self._waiting = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        per_process = settings.costly_reads_per_process or default_per_process()
        if per_process >= settings.database_pool_size:
            raise ConfigurationError(
                f"COSTLY_READS_PER_PROCESS ({per_process}) must stay below DATABASE_POOL_SIZE "
                f"({settings.database_pool_size}): costly reads would otherwise be able to take every connection.")
        queue = settings.costly_reads_queue if settings.costly_reads_queue is not None else 2 * per_process
        return cls(per_token=settings.costly_reads_per_token, per_process=per_process, queue=queue,
                   wait_seconds=settings.database_pool_timeout)

    @asynccontextmanager
    async def slot(self, token_id: str) -> AsyncIterator[None]:
        """Hold one slot for the block: TooManyCostlyReads (429) or CostlyReadsBusy (503) when there is none."""
        await self.acquire(token_id)
        try:
            yield
        finally:
            self.release(token_id)

    def check(self, token_id: str) -> None:
        """Raise what `acquire` would refuse at once: TooManyCostlyReads (429), or CostlyReadsBusy (503) when the
        queue is full (no use waiting: refused now, not with the rest of the queue later)."""
        if self._in_flight.get(token_id, 0) >= self.per_token:
            raise TooManyCostlyReads(self.per_token)
        if self.queue_full:
            raise CostlyReadsBusy(f"{self.per_process} costly reads are running in this process and {self.queue} "
                                  "wait their turn")

    async def acquire(self, token_id: str) -> None:
        """Take a slot, waiting in the queue if need be; every acquire that returns needs one `release`."""
        self.check(token_id)
        self._in_flight[token_id] = self._in_flight.get(token_id, 0) + 1
        self._waiting += 1
        try:
            async with asyncio.timeout(self.wait_seconds):
                await self._running.acquire()
        except BaseException as exc:  # waited too long, or cancelled while waiting (the client went away)
            self._forget(token_id)
            if isinstance(exc, TimeoutError):
                raise CostlyReadsBusy(f"{self.per_process} costly reads are running in this process; "
                                      "this one waited its turn too long") from None
            raise
        finally:
            self._waiting -= 1

    @property
    def queue_full(self) -> bool:
        return self._running.locked() and self._waiting >= self.queue

    def release(self, token_id: str) -> None:
        self._running.release()
        self._forget(token_id)

    def _forget(self, token_id: str) -> None:
        left = self._in_flight[token_id] - 1
        if left:
            self._in_flight[token_id] = left
        else:
            del self._in_flight[token_id]  # bounded memory: only tokens with reads in flight have an entry


def costly(*needed: Scope, streaming: bool = False) -> Any:
    """Dependency marker for a costly read: `require(*needed)` (401/403 first), then a slot of `CostlyReads`, held
    until the route returns; with `streaming`, until the last byte of the answer is sent. When app.costly_gate took
    the slot before routing (the usual case), it holds it until the answer is sent, and this only checks that."""
    guard = require(*needed)

    async def hold(request: Request, caller: Annotated[Principal, guard]) -> AsyncIterator[Principal]:
        if getattr(request.state, SLOT_HELD_BY, None) == caller.token_id:
            yield caller
            return
        reads: CostlyReads = request.app.state.costly_reads
        async with reads.slot(caller.token_id):
            yield caller

    setattr(hold, _SCOPES, frozenset(needed))  # for app.costly_gate: which routes are costly, and their scopes
    return Depends(hold, scope="request" if streaming else "function")


SLOT_HELD_BY = "costly_slot_held_by"  # request.state: the token id whose slot app.costly_gate holds for the request
_SCOPES = "costly_scopes"


def costly_scopes(dependency: Any) -> frozenset[Scope] | None:
    """The scopes of a `costly(...)` dependency's callable; None for any other callable."""
    return getattr(dependency, _SCOPES, None)


@asynccontextmanager
async def costly_read(request: Request, caller: Principal, session: AsyncSession, *, kind: str) -> AsyncIterator[None]:
    """A slot and the costly statement timeout, taken inside a route that is costly only with some parameters."""
    reads: CostlyReads = request.app.state.costly_reads
    async with reads.slot(caller.token_id), session_within(session, request.app.state.timeouts.costly, kind=kind):
        yield


def default_per_process() -> int:
    """Half this machine's cores, at least 1. A costly read keeps one core of the database busy (app.timeouts.ONE_CORE);
    by default PostgreSQL runs on the API's machine (embedded, or beside it), and the other half stays for everyone
    else. Measured on 2 cores (docs/security.md): with 1, contact reads' p99 under a flood was 1.7-2.5x its quiet
    value in most runs; with 2, 8.4x."""
    return max(1, (os.cpu_count() or 2) // 2)
