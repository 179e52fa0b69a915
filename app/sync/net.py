"""The network edge shared by the adapters: SSRF guard, overall deadline per call, Retry-After, rate limits.

SSRF: the guard sits in the connection layer of the shared `httpx.AsyncClient` built by `build_client`.
Every new TCP connection resolves the host once, refuses it when any resolved address is private,
loopback, link-local, multicast, unspecified, reserved or a cloud metadata address, and then connects
to one of the addresses it has just checked. There is no second resolution between the check and the
connect, so a DNS rebinding answer cannot slip in; TLS still verifies the certificate against the
host name (httpcore passes the original host as SNI). Keep-alive connections are reused only for the
same origin, which was checked when the connection was opened. `check_url` runs the same check ahead
of time (destination creation, clear error messages); it is advisory, the transport is the guard.

Deadline: `call` wraps the whole exchange (connect, send, headers, body) in `asyncio.timeout`, since
httpx's read timeout restarts on every byte and a trickling server could hold a worker forever.

Exceptions raised here are the adapters' contract types (`app.sync.base`):

    DeliveryFailed            network error, deadline exceeded, 5xx (retry)
    ├── DeliveryFailed(permanent=True)   refused address (BlockedAddress), bad URL
    └── RetryLater            429 (after `retry_after(...)` seconds)
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import ipaddress
import itertools
import math
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from app.sync.base import DeliveryFailed, RetryLater

__all__ = [
    "BlockedAddress",
    "CallTimes",
    "GuardedBackend",
    "RateLimiter",
    "Resolver",
    "address_refusal",
    "build_client",
    "call",
    "call_times",
    "check_url",
    "connection_share",
    "fit",
    "json_body",
    "rate_limiter",
    "retry_after",
    "run_all",
    "semaphore",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Cloud metadata endpoints, named even where the generic rules already cover them (they are the prize).
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254", "fd00:ec2::23")
)
_CARRIER_NAT = ipaddress.ip_network("100.64.0.0/10")  # shared address space (RFC 6598): not the internet
# A vendor's 1-second window, seen from our send times, is widened by this: the time between our send and the
# vendor's stamp varies by a few ms on loopback (bench_drain's trace); 50 ms leaves room for a starved machine.
WINDOW_MARGIN = 0.05
_PENDING_POLL = 0.005       # every admitted request is still on its way to the wire: look again this soon
# An admitted request not on the wire after this long belongs to a task that is gone (a call's deadline is 30 s):
# it stops counting, so a lost one cannot hold a key's limiter shut forever.
_PENDING_MAX = 120.0


class BlockedAddress(DeliveryFailed):
    """The target resolves to an address Carnet must not call (SSRF guard): a permanent failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, permanent=True)


def address_refusal(address: IPAddress) -> str | None:
    """Why this address is refused (None: it is a public unicast address)."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return address_refusal(mapped)
    if address in _METADATA:
        return "cloud metadata address"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("shared (carrier-grade NAT)", isinstance(address, ipaddress.IPv4Address) and address in _CARRIER_NAT),
        ("not globally routable", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def resolve_checked(host: str, port: int, *, allow_private: bool, resolver: Resolver | None = None) -> list[str]:
    """The addresses of host, all of them checked; BlockedAddress when any is refused."""
    host = host.strip("[]")
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = await (resolver or system_resolver)(host, port)
        except OSError as exc:
            raise DeliveryFailed(f"cannot resolve the destination host ({type(exc).__name__})") from None
        if not addresses:
            raise DeliveryFailed("the destination host has no address")
    if not allow_private:
        for text in addresses:
            reason = address_refusal(ipaddress.ip_address(text.split("%")[0]))
            if reason is not None:
                # One refused address refuses the host: a round-robin answer must not pick the bad one later.
                raise BlockedAddress(f"the destination resolves to a {reason} address (SSRF guard)")
    return addresses


async def check_url(url: str, *, allow_private: bool, resolver: Resolver | None = None) -> None:
    """Refuse URLs Carnet must not call: not http(s), credentials in the URL, or a refused address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryFailed("the destination URL must be an absolute http(s) URL", permanent=True)
    if parts.username or parts.password:
        raise DeliveryFailed("the destination URL must not carry credentials", permanent=True)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise DeliveryFailed("the destination URL has an invalid port", permanent=True) from None
    await resolve_checked(parts.hostname, port, allow_private=allow_private, resolver=resolver)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend: resolve, check, then connect to the checked address (no rebinding window)."""

    def __init__(self, *, allow_private: bool, resolver: Resolver | None = None) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private = allow_private
        self._resolver = resolver

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await resolve_checked(host, port, allow_private=self._allow_private, resolver=self._resolver)
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("unix sockets are not a destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, *, allow_private: bool, resolver: Resolver | None, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, retries=0)
        # httpx builds its pool without a backend argument; this one is identical plus the guard.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True, http2=False, retries=0,
            network_backend=GuardedBackend(allow_private=allow_private, resolver=resolver),
        )


def build_client(
    *, allow_private_networks: bool, resolver: Resolver | None = None, max_connections: int = 100,
    timeout: float = 10.0,
) -> httpx.AsyncClient:
    """The one shared client for every adapter: guarded connections, no redirects, no proxy from the env."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(
        transport=_GuardedTransport(allow_private=allow_private_networks, resolver=resolver, limits=limits),
        follow_redirects=False,
        trust_env=False,            # an HTTPS_PROXY from the environment would bypass the address check
        timeout=httpx.Timeout(timeout),
        headers={"user-agent": "carnet-sync/1"},
    )


async def call(
    client: httpx.AsyncClient, method: str, url: str, *, deadline: float, on_sent: Callable[[], None] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """One vendor request with its body read, under an overall deadline; network trouble → DeliveryFailed.

    `on_sent` is called once the request's headers are written to the socket (a rate limiter's send time)."""
    if on_sent is not None:
        async def trace(event: str, info: Mapping[str, Any]) -> None:
            if event.endswith("send_request_headers.complete"):
                on_sent()

        kwargs["extensions"] = {**kwargs.get("extensions", {}), "trace": trace}
    try:
        async with asyncio.timeout(deadline):
            return await client.request(method, url, follow_redirects=False, **kwargs)
    except TimeoutError:
        raise DeliveryFailed(f"no complete answer within {deadline:g} s") from None
    except httpx.TransportError as exc:
        raise DeliveryFailed(f"network error: {type(exc).__name__}") from None


def retry_after(headers: Mapping[str, str], *, default: float, now: float | None = None,
                ceiling: float = 3600.0) -> float:
    """Seconds to wait from Retry-After (seconds or HTTP date) and Brevo's x-sib-ratelimit-reset; the longest."""
    waits: list[float] = []
    value = headers.get("retry-after")
    if value:
        value = value.strip()
        if value.isascii() and value.isdigit():  # "²" is a digit to isdigit(), not to float()
            waits.append(float(value))
        else:
            with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
                waits.append(parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now))
    reset = headers.get("x-sib-ratelimit-reset")
    if reset:
        with contextlib.suppress(ValueError):
            waits.append(float(reset))
    waits = [w for w in waits if not math.isnan(w)]  # a "nan" wait became 0: the vendor that asked would be hammered
    if not waits:
        return default
    return min(max(max(waits), 0.0), ceiling)


class RateLimiter:
    """At most `limit` requests in any `window` seconds, counted the way a vendor counts arrivals; per API key.

    A request counts from its admission until it is on the wire (`sent`, which `call` reports from httpcore's trace
    of the request headers), and then for `window` seconds from that moment. A request admitted and then held back
    by a busy event loop therefore cannot let later ones crowd into its second at the vendor: whatever the lag
    between admission and send, no `window` of send times holds more than `limit` (docs/sync.md, "Rate"). The
    window is 1 s plus `WINDOW_MARGIN` for what the send time cannot see (the network, the vendor's own stamping).
    Admissions are also kept `spacing` apart (half the mean interval): a backlog does not go out in one burst,
    yet the pace can catch up after a stall.

    No lock: the check and the reservation happen without an await between them, so it works on any event loop.
    """

    def __init__(self, rate: float) -> None:
        self._sent: list[float] = []        # send times still inside the window, oldest first
        self._pending: dict[int, float] = {}    # admitted, not on the wire yet: ticket -> admission time
        self._tickets = itertools.count()
        self._last = -math.inf              # the last admission
        self._not_before = 0.0              # a vendor-asked pause
        self.configure(rate)

    def configure(self, rate: float) -> None:
        """`rate` requests per second: floor(rate) per window of 1 s + margin; below 1/s, one per 1/rate s + margin."""
        self.limit = max(1, math.floor(rate))
        self.window = max(1.0, self.limit / rate) + WINDOW_MARGIN
        self.spacing = self.interval / 2

    @property
    def interval(self) -> float:
        """The mean time between requests at full speed."""
        return self.window / self.limit

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Callable[[], None]]:
        """Admission for one request; call the `sent` it yields once the request is on the wire (else: at the end,
        which may be later than the send: counting a request longer is always safe)."""
        ticket = await self._admit()

        def sent() -> None:
            if self._pending.pop(ticket, None) is not None:
                bisect.insort(self._sent, time.monotonic())

        try:
            yield sent
        finally:
            sent()

    async def acquire(self) -> None:
        """Admission for a request that is counted as sent at once."""
        async with self.slot():
            pass

    def pause(self, seconds: float) -> None:
        """The vendor said wait: no request from anyone sharing this key before then."""
        self._not_before = max(self._not_before, time.monotonic() + seconds)

    async def _admit(self) -> int:
        while True:
            now = time.monotonic()
            wait = self._wait(now)
            if wait <= 0:
                ticket = next(self._tickets)
                self._pending[ticket] = self._last = now
                return ticket
            await asyncio.sleep(wait)

    def _wait(self, now: float) -> float:
        sent = self._sent
        while sent and sent[0] <= now - self.window:
            sent.pop(0)
        for ticket in [t for t, at in self._pending.items() if at < now - _PENDING_MAX]:
            del self._pending[ticket]
        wait = max(self._not_before - now, self._last + self.spacing - now)
        if len(self._pending) + len(sent) >= self.limit:
            # Full: until the oldest send leaves the window, or (all of them still pending) a moment.
            wait = max(wait, sent[0] + self.window - now if sent else _PENDING_POLL)
        return wait


class Gate:
    """At most `size` holders at once, the waiters let in first come, first served; unlike asyncio.Semaphore,
    `size` may change while it is in use.

    A release hands its place to exactly one waiter. (It was a Condition whose release woke every waiter to
    re-check: with a push's 1,500 per-contact requests waiting in each of 6 lanes, each release woke ~9,000
    coroutines, and the worker's CPU, not the vendor, capped Mailchimp at 4.4 of its 10 connections.)
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._holders = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, size: int) -> None:
        self._size = size
        self._admit()

    async def __aenter__(self) -> None:
        if self._holders < self._size and not self._waiters:
            self._holders += 1
            return
        place = asyncio.get_running_loop().create_future()
        self._waiters.append(place)
        try:
            await place          # set by `_admit`, which counted us as a holder already
        except asyncio.CancelledError:
            if place.done() and not place.cancelled():
                self._holders -= 1   # let in just as we were cancelled: the place goes to the next one
                self._admit()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(place)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._holders -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self._holders < self._size:
            place = self._waiters.popleft()
            if not place.done():
                self._holders += 1
                place.set_result(None)


class CallTimes:
    """The mean time one request holds a connection to a vendor account in this process (an exponential moving
    average over the last ~1/`weight` requests), starting from `prior` until requests are measured.

    A connection-capped vendor (Mailchimp) answers `connections / mean` requests per second at best; the mean
    includes whatever the event loop adds while the request holds its place, so a busy worker is measured slower.
    A short memory: after a slow spell (batches cut small, few samples each) the pace comes back within a few
    batches.
    """

    def __init__(self, prior: float, weight: float = 0.05) -> None:
        self.mean = prior
        self._weight = weight

    def record(self, seconds: float) -> None:
        self.mean += self._weight * (seconds - self.mean)


_call_times: dict[tuple[str, str], CallTimes] = {}


def call_times(vendor: str, account: str, prior: float) -> CallTimes:
    """This process's measure of one vendor account's request times (per account, like its limits)."""
    return _call_times.get((vendor, account)) or _call_times.setdefault((vendor, account), CallTimes(prior))


def fit(capacity: float, erasures: Iterable[float], states: Iterable[float]) -> tuple[int, int]:
    """How many erasures, then states (in order), fit in `capacity` requests, from each one's cost in requests.

    The first erasure always goes, however many requests it takes; so does the first state when no erasure went
    (a batch always makes progress). For an adapter's `affordable`: the worker hands the rest back untried."""
    erased = 0
    for cost in erasures:
        if capacity < cost and erased:
            break
        capacity -= cost
        erased += 1
    kept = 0
    for cost in states:
        capacity -= cost
        if capacity < 0:
            return erased, max(kept, 1 if not erased else 0)
        kept += 1
    return erased, kept


# How many worker processes share each vendor account's limits right now (the worker's heartbeat sets it):
# each process keeps 1/share of the rate and of the connections, so together they stay within the limit.
_share = 1
SHARED_HEADROOM = 0.9
_limiters: dict[tuple[str, str], RateLimiter] = {}
_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], Gate]] = (
    weakref.WeakKeyDictionary()
)


def set_share(processes: int) -> None:
    """The number of worker processes delivering now (>= 1); the limits apply from the next request."""
    global _share
    _share = max(1, processes)


def rate_limiter(vendor: str, account: str, rate: float) -> RateLimiter:
    """This process's limiter for one vendor account (the key's fingerprint, never the key, is the name)."""
    limiter = _limiters.get((vendor, account)) or _limiters.setdefault((vendor, account), RateLimiter(rate))
    # In place, so a vendor-asked pause and the requests in the window are kept. Shared, a little less: the
    # processes' windows are not in step, and a jittered arrival from each can land in the same second.
    limiter.configure(rate / _share * (SHARED_HEADROOM if _share > 1 else 1.0))
    return limiter


def connection_share(size: int) -> int:
    """This process's part of an account's `size` concurrent connections."""
    return max(1, size // _share)


def semaphore(vendor: str, account: str, size: int) -> Gate:
    """This process's cap on concurrent requests to one vendor account (per event loop)."""
    per_loop = _gates.setdefault(asyncio.get_running_loop(), {})
    gate = per_loop.get((vendor, account)) or per_loop.setdefault((vendor, account), Gate(size))
    gate.size = connection_share(size)
    return gate


async def run_all(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run vendor calls concurrently; the first failure cancels the rest and is raised as itself.

    From a group of failures: the longest RetryLater (the vendor's wait applies to all), else the
    first retryable DeliveryFailed, else the first one; anything else (a bug) propagates as the group.
    """
    try:
        async with asyncio.TaskGroup() as tasks:
            for coroutine in coroutines:
                tasks.create_task(coroutine)
    except BaseExceptionGroup as group:
        failures = _leaves(group)
        if not all(isinstance(e, DeliveryFailed) for e in failures):
            raise
        waits = [e for e in failures if isinstance(e, RetryLater)]
        if waits:
            raise max(waits, key=lambda e: e.after_seconds) from None
        retryable = [e for e in failures if isinstance(e, DeliveryFailed) and not e.permanent]
        raise (retryable or failures)[0] from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def json_body(response: httpx.Response) -> Mapping[str, Any]:
    """A vendor's JSON object answer, or {} when it is not one (error pages, empty bodies)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, Mapping) else {}
