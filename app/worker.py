"""The worker: delivers the outbox to destinations and runs background jobs (imports, synced segments).

Any number of workers share the work through PostgreSQL (SKIP LOCKED and leases, app.services.delivery);
`carnet worker` runs one, and `carnet serve` runs one inside the API process in embedded mode.
No vendor call happens inside a database transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from prometheus_client import Counter
from sqlalchemy.exc import DBAPIError, InterfaceError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.logging import get_logger, where
from app.security.secrets import SecretBox
from app.services import commerce as commerce_service
from app.services import delivery
from app.services import destinations as destinations_service
from app.services.links import LinkBuilder, LinkCodec
from app.services.workers import LIVE_SECONDS
from app.settings import Settings
from app.sync import ids as vendor_ids
from app.sync import net
from app.sync.base import DeliveryFailed, Gone, Outcome, RetryLater
from app.sync.commerce import Record

__all__ = ["AdapterFactory", "Worker", "create_worker", "run_in_background"]

log = get_logger("carnet.worker")

DELIVERIES = Counter("carnet_deliveries_total", "Deliveries by destination kind and outcome", ["kind", "outcome"])
OUTBOX_DISPATCHED = Counter("carnet_outbox_dispatched_total", "Outbox messages turned into deliveries")

@dataclass(slots=True)
class BatchResult:
    completion: delivery.Completion
    links: dict[uuid.UUID, str] = field(default_factory=dict)     # remote refs learnt
    tags: dict[uuid.UUID, tuple[str, ...]] = field(default_factory=dict)  # tags pushed (profile writes)
    forget: list[delivery.Ref] = field(default_factory=list)      # links / retired records erased at the vendor
    retired: dict[uuid.UUID, tuple[str, ...]] = field(default_factory=dict)  # records the vendor archived (kept)
    commerce: list[Record] = field(default_factory=list)          # commerce records the vendor took
    erased: list[uuid.UUID] = field(default_factory=list)         # people gone from the vendor (commerce forgotten)
    error: BaseException | None = None                            # the batch's first failure, for health


AdapterFactory = Callable[[destinations_service.Loaded, httpx.AsyncClient, Settings], Any]
JobRunner = Callable[[async_sessionmaker[AsyncSession], Settings], Awaitable[bool]]
_DB_AWAY = (OSError, DBAPIError, InterfaceError)
WEBHOOK_CONCURRENCY = 8
DISPATCH_ROUNDS = 100        # x delivery.DISPATCH_BATCH outbox messages per round, beside the deliveries
LANES = 6                    # batches of one destination in flight at once
LANE_STAGGER_SECONDS = 0.1
LANE_BATCHES = 20            # batches per lane before the next round
FEED_WAIT_SECONDS = 0.05     # a lane's pause after a short claim while the backlog is still being dispatched
ANALYZE_AFTER_DISPATCHED = 20_000  # a burst this big refreshes `delivery`'s planner statistics
HEARTBEAT_SECONDS = 2.0      # workers alive are counted from their heartbeats (vendor limits are split)


class Worker:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        *,
        box: SecretBox,
        adapters: AdapterFactory,
        jobs: Sequence[JobRunner] = (),
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.box = box
        self.adapters = adapters
        self.jobs = list(jobs)
        self.backoff = delivery.Backoff(settings.delivery_backoff_base_seconds, settings.delivery_backoff_cap_seconds,
                                        settings.delivery_max_attempts)
        # The signed links people get in emails (preferences_url in vendor fields and webhook payloads).
        self.links = LinkBuilder(LinkCodec(settings.resolved_jwt_secret()), settings.public_base_url)
        # Redirects never followed (SSRF: a receiver could bounce us to an internal address).
        self.http = http or httpx.AsyncClient(follow_redirects=False, timeout=httpx.Timeout(10.0, connect=5.0))

    async def aclose(self) -> None:
        await self.http.aclose()

    # ---- loops ------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Deliveries and jobs side by side until `stop` is set; database outages are waited out."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._deliveries(stop))
            for job in self.jobs:
                tasks.create_task(self._loop(lambda job=job: job(self.sessions, self.settings), stop))

    async def _deliveries(self, stop: asyncio.Event) -> None:
        async with self._heartbeats():
            await self._loop(self.deliver_once, stop)

    @contextlib.asynccontextmanager
    async def _heartbeats(self) -> AsyncIterator[None]:
        """While the worker runs, every HEARTBEAT_SECONDS: tell the others, and take 1/N of each vendor limit.

        Vendors limit an API key, not a process: two workers each keeping the whole rate would send twice
        too much. Nothing is sent before a second beat, one interval after the first: the workers already
        running have seen this one by then (and two starting together see each other). A clean stop signs
        off at once."""
        await self._beat()
        await asyncio.sleep(HEARTBEAT_SECONDS)
        await self._beat()
        beating = asyncio.create_task(self._beat_forever())
        try:
            yield
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            with contextlib.suppress(*_DB_AWAY):
                async with self.sessions.begin() as session:
                    await delivery.sign_off(session, self.worker_id)
            net.set_share(1)

    async def _beat(self) -> None:
        try:
            async with self.sessions.begin() as session:
                net.set_share(await delivery.heartbeat(session, self.worker_id, live_seconds=LIVE_SECONDS))
        except _DB_AWAY:
            log.warning("worker.heartbeat_failed")  # the last known share stays; deliveries will wait anyway

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            await self._beat()

    async def _loop(self, step: Callable[[], Awaitable[bool]], stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                busy = await step()
            except Exception as exc:  # the worker carries on; the database may be away, or a lane failed
                if isinstance(exc, _DB_AWAY) or (isinstance(exc, ExceptionGroup) and exc.subgroup(_DB_AWAY)):
                    log.warning("worker.database_unavailable", error=type(exc).__name__)
                else:
                    log.error("worker.step_failed", **where(exc))
                busy = False
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.worker_idle_seconds)

    async def drain(self) -> None:
        """Deliver until nothing is due (tests); callers bound it with a timeout."""
        while await self.deliver_once():
            pass

    async def catch_up(self) -> None:
        """Every due job (queued imports, due segment snapshots), then every due delivery: `carnet worker --once`."""
        for job in self.jobs:
            while await job(self.sessions, self.settings):
                pass
        async with self._heartbeats():
            await self.drain()

    # ---- one round --------------------------------------------------------------------------------------

    async def deliver_once(self) -> bool:
        """Dispatch and deliver side by side (a big backlog is dispatched while the first batches go out).

        True if anything moved."""
        async with self.sessions.begin() as session:
            await delivery.reap_expired_leases(session)
        # Enough of what is waiting for one full batch, so a backlog shows at the first claim (more lanes).
        first = await self._dispatch(rounds=-(-self.settings.delivery_batch_size // delivery.DISPATCH_BATCH))
        async with self.sessions() as session:
            destination_ids = await delivery.enabled_destination_ids(session)
        feeding = asyncio.Event()  # set while the dispatcher is still turning outbox messages into deliveries
        more, *results = await asyncio.gather(
            self._feed(feeding) if first and first % delivery.DISPATCH_BATCH == 0 else _nothing(),
            *(self._drain_destination(d, feeding=feeding) for d in destination_ids),
        )
        return first + more > 0 or any(results)

    async def _feed(self, feeding: asyncio.Event) -> int:
        feeding.set()
        try:
            dispatched = await self._dispatch(rounds=DISPATCH_ROUNDS)
        finally:
            feeding.clear()
        if dispatched >= ANALYZE_AFTER_DISPATCHED:
            async with self.sessions.begin() as session:
                await delivery.analyze(session)
        return dispatched

    async def _dispatch(self, *, rounds: int) -> int:
        dispatched = 0
        for _round in range(rounds):  # bounded: the next round's deliveries are not held back
            async with self.sessions.begin() as session:
                n = await delivery.dispatch(session)
            dispatched += n
            if n < delivery.DISPATCH_BATCH:
                break
        OUTBOX_DISPATCHED.inc(dispatched)
        return dispatched

    async def _drain_destination(self, destination_id: uuid.UUID, *, feeding: asyncio.Event) -> bool:
        """One lane; as soon as its first claim comes back full (a backlog), more lanes, started apart, keep the
        vendor busy: one claims and reads while another waits on the vendor (the adapters' rate limiters and
        connection caps are per API key, shared by every lane). Back to the round after LANE_BATCHES."""
        backlog = asyncio.Event()
        async with asyncio.TaskGroup() as lanes:  # one lane failing stops them all, and the error is raised
            lead = lanes.create_task(self._lane(destination_id, backlog=backlog, feeding=feeding))
            lanes.create_task(self._more_lanes(destination_id, backlog=backlog, feeding=feeding, lead=lead))
        return lead.result()

    async def _more_lanes(self, destination_id: uuid.UUID, *, backlog: asyncio.Event, feeding: asyncio.Event,
                          lead: asyncio.Task[bool]) -> None:
        noticed = asyncio.ensure_future(backlog.wait())
        try:
            await asyncio.wait({lead, noticed}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the lead lane failed and the group cancels this task: never leave it pending
            noticed.cancel()
        if backlog.is_set():
            await asyncio.gather(*(self._lane(destination_id, backlog=backlog, feeding=feeding,
                                              start_after=i * LANE_STAGGER_SECONDS) for i in range(1, LANES)))

    async def _lane(self, destination_id: uuid.UUID, *, backlog: asyncio.Event, feeding: asyncio.Event,
                    start_after: float = 0.0) -> bool:
        await asyncio.sleep(start_after)
        moved_any = False
        for _ in range(LANE_BATCHES):
            moved, claimed = await self._deliver_batch(destination_id, backlog=backlog)
            moved_any |= moved
            step = lane_step(moved, claimed, batch_size=self.settings.delivery_batch_size,
                             feeding_backlog=backlog.is_set() and feeding.is_set())
            if step == "stop":
                break
            if step == "wait":
                await asyncio.sleep(FEED_WAIT_SECONDS)
        return moved_any

    async def _deliver_batch(self, destination_id: uuid.UUID, *, backlog: asyncio.Event) -> tuple[bool, int]:
        """(anything delivered or dead-lettered, how many deliveries were claimed); a full claim sets `backlog`."""
        async with self.sessions.begin() as session:
            try:
                destination = await destinations_service.load(session, destination_id, box=self.box)
            except destinations_service.DestinationNotFound:  # deleted since the round listed it: its deliveries
                return False, 0                                # went with it, nothing is owed
            refusal = destination.refusal()
            if refusal is not None:  # its secrets would go where they were not given for: nothing is sent
                await delivery.record_health(session, destination_id, error=refusal, disable=True)
                log.warning("delivery.destination_refused", destination_id=str(destination_id))
                return False, 0
            claimed = await delivery.claim(session, destination_id, limit=self.settings.delivery_batch_size,
                                           lease_seconds=self.settings.delivery_lease_seconds)
        if not claimed.rows:
            return False, 0
        if len(claimed.rows) == self.settings.delivery_batch_size:
            backlog.set()
        adapter = self.adapters(destination, self.http, self.settings)
        # The whole batch must end well inside the lease, or another worker could take the same rows.
        budget = self.settings.delivery_lease_seconds * 0.8
        if destination.kind == "webhook":
            result = await self._send_events(adapter, claimed, budget)
        else:
            result = await self._push_states(adapter, destination, claimed, budget)
        error = _reason(result.error) if result.error else None
        async with self.sessions.begin() as session:
            await delivery.complete(session, claimed, result.completion, backoff=self.backoff)
            await delivery.forget_refs(session, destination_id, result.forget)
            await delivery.remember_links(session, destination_id, result.links)
            await delivery.remember_tags(session, destination_id, result.tags)
            await delivery.retire_refs(session, destination_id, result.retired)
            await commerce_service.remember(session, destination_id, result.commerce)
            await commerce_service.forget_people(session, destination_id, result.erased)
            await delivery.record_health(session, destination_id, error=error, disable=isinstance(result.error, Gone))
        kind, completion = destination.kind, result.completion
        DELIVERIES.labels(kind, "delivered").inc(len(completion.delivered))
        DELIVERIES.labels(kind, "retry").inc(len(completion.retry))
        DELIVERIES.labels(kind, "dead").inc(len(completion.dead))
        if error:
            log.warning("delivery.failed", destination_id=str(destination_id), kind=kind, error=error,
                        batch=len(claimed.rows))
        moved = bool(completion.delivered or completion.dead)  # False: all put back for later
        return moved, len(claimed.rows)

    async def _push_states(
        self, adapter: Any, destination: destinations_service.Loaded, claimed: delivery.Claimed, budget: float
    ) -> BatchResult:
        by_contact = {r["contact_id"]: r["id"] for r in claimed.rows}
        async with self.sessions() as session:
            plan = await delivery.plan(session, destination.row, claimed.rows, urls=self.links)
        states, erasures = plan.states, plan.erasures
        done = [by_contact[c] for c in plan.nothing + plan.vanished]
        result = BatchResult(delivery.Completion(delivered=done, dead={}, retry={}),
                             forget=[ref for c in plan.vanished for ref in plan.forget.get(c, ())],
                             erased=_people(plan, plan.vanished))
        if hasattr(adapter, "affordable"):  # a rate-limited vendor: send what fits, hand the rest back untried
            # The lanes of this destination share its rate, so each keeps to its part of the time.
            n_erasures, n_states = adapter.affordable(states, erasures, budget * 0.8 / LANES)
            untried = (*erasures[n_erasures:], *states[n_states:])
            result.completion.deferred = [by_contact[x.contact_id] for x in untried]
            states, erasures = states[:n_states], erasures[:n_erasures]
        try:
            async with asyncio.timeout(budget):
                outcomes: list[Outcome] = []
                if states:
                    outcomes += await adapter.push(states)
                if erasures:
                    outcomes += await adapter.erase(erasures)
        except Exception as exc:  # a bug in an adapter too: retried with backoff, not held until the lease ends
            _log_unexpected(exc)
            result.error = exc
            _fail(result.completion, [by_contact[s.contact_id] for s in states]
                  + [by_contact[e.contact_id] for e in erasures], exc)
            return result
        erased = {e.contact_id for e in erasures}
        known_refs = {s.contact_id: s.remote_ref for s in states}
        pushed_tags = {s.contact_id: s.tags for s in states if s.profile_changed}
        for outcome in outcomes:
            delivery_id = by_contact[outcome.contact_id]
            learnt = outcome.remote_ref if outcome.remote_ref != known_refs.get(outcome.contact_id) else None
            error = outcome.error or _unfit_refs(destination.kind, (*([learnt] if learnt else []), *outcome.retired))
            if error is not None:
                result.completion.dead[delivery_id] = error
                continue
            result.completion.delivered.append(delivery_id)
            if outcome.retired:
                result.retired[outcome.contact_id] = outcome.retired
            if outcome.contact_id in erased:
                result.forget += plan.forget.get(outcome.contact_id, ())
                result.erased += _people(plan, [outcome.contact_id])
                continue
            result.commerce += outcome.commerce
            if learnt is not None:
                result.links[outcome.contact_id] = learnt
            if outcome.contact_id in pushed_tags:
                result.tags[outcome.contact_id] = tuple(pushed_tags[outcome.contact_id])
        return result

    async def _send_events(self, adapter: Any, claimed: delivery.Claimed, budget: float) -> BatchResult:
        async with self.sessions() as session:
            messages = await delivery.event_messages(session, claimed.rows, links=self.links)
        result = BatchResult(delivery.Completion(delivered=[], dead={}, retry={}))
        limit = asyncio.Semaphore(WEBHOOK_CONCURRENCY)
        # One deadline for the whole batch, as for vendors: a message waiting for its place gets what is left.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget

        async def send(row: Any) -> None:
            message = messages.get(row["message_id"])
            if message is None:  # retention keeps every message an undelivered delivery needs: never expected
                result.completion.dead[row["id"]] = "the outbox message is no longer stored; nothing was sent"
                return
            async with limit:
                if loop.time() >= deadline:  # no time left in the lease: due again now, untried
                    result.completion.deferred.append(row["id"])
                    return
                try:
                    async with asyncio.timeout_at(deadline):
                        await adapter.send(message)
                except Exception as exc:
                    _log_unexpected(exc)
                    result.error = result.error or exc
                    _fail(result.completion, [row["id"]], exc)
                    return
            result.completion.delivered.append(row["id"])

        await asyncio.gather(*(send(r) for r in claimed.rows))
        return result


def _people(plan: delivery.Plan, contact_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """These contacts and those merged into them whose records the erasure settled (their commerce goes too)."""
    return list(dict.fromkeys([*contact_ids, *(owner for c in contact_ids for owner, _ref in plan.forget.get(c, ())),
                               *(owner for c in contact_ids for owner in plan.sold.get(c, ()))]))


def lane_step(moved: bool, claimed: int, *, batch_size: int, feeding_backlog: bool) -> Literal["go", "wait", "stop"]:
    """What a lane does after a batch: a full batch that moved, go on; a short (or empty) claim while the dispatcher
    is still feeding this destination's backlog, wait a moment and go on, since more is coming (a lane that retired
    there stayed retired until the round ended, and half the vendor's capacity went unused); else stop. A batch
    that moved nothing (the vendor refused it all) always stops the lane."""
    if moved and claimed == batch_size:
        return "go"
    if (moved or not claimed) and feeding_backlog:
        return "wait"
    return "stop"


async def _nothing() -> int:
    return 0


def _log_unexpected(exc: Exception) -> None:
    if not isinstance(exc, DeliveryFailed | TimeoutError | httpx.HTTPError):
        log.error("delivery.adapter_failed", **where(exc))


def _unfit_refs(kind: str, refs: Sequence[str]) -> str | None:
    """Remote records about to be stored are later put in vendor URLs: one not in the vendor's documented format is
    never kept (issue 15, class 7), whatever the adapter let through."""
    if all(vendor_ids.is_remote_ref(kind, ref) for ref in refs):
        return None
    return f"{kind}: the vendor's answer named a record in no valid id format; nothing of it was stored"


def _fail(completion: delivery.Completion, ids: list[int], exc: BaseException) -> None:
    """Permanent failures are dead letters at once; the rest are retried (when the vendor said, if it did)."""
    reason = _reason(exc)
    if isinstance(exc, DeliveryFailed) and exc.permanent:
        completion.dead.update(dict.fromkeys(ids, reason))
        return
    completion.retry.update(dict.fromkeys(ids, reason))
    if isinstance(exc, RetryLater):
        completion.retry_after = max(completion.retry_after or 0.0, exc.after_seconds)


def _reason(exc: BaseException) -> str:
    """What goes in last_error: the adapter's reason (no personal data) or the exception's type."""
    if isinstance(exc, DeliveryFailed):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


def create_worker(sessions: async_sessionmaker[AsyncSession], settings: Settings, *, box: SecretBox) -> Worker:
    """The production worker: real adapters over the SSRF-guarded client, and the background jobs."""
    from app.sync.factory import build_adapter, build_http_client

    return Worker(sessions, settings, box=box, adapters=build_adapter, http=build_http_client(settings),
                  jobs=_jobs())


def _jobs() -> list[JobRunner]:
    from app.journal import JournalUpkeep
    from app.services import segment_sync
    from app.services.event_partitions import EventPartitionUpkeep
    from app.services.idempotency import IdempotencyExpiry
    from app.services.imports.runner import run_next as run_next_import
    from app.services.imports.store import ReportValueExpiry
    from app.services.outbox_retention import OutboxRetention

    return [run_next_import, segment_sync.run_next, ReportValueExpiry(), IdempotencyExpiry(), JournalUpkeep(),
            OutboxRetention(), EventPartitionUpkeep()]


@contextlib.asynccontextmanager
async def run_in_background(worker: Worker) -> AsyncIterator[None]:
    """Run the worker beside the API (embedded mode) and stop it cleanly with the app."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await asyncio.wait_for(task, timeout=10)
            except TimeoutError:
                task.cancel()
        await worker.aclose()
