"""Run a fake on loopback as a live HTTP server (uvicorn in a thread), and the base every fake shares.

`FakeVendor` is an ASGI app that records every request (arrival time, account, status, violations),
tracks concurrency per account, and can be told to be down (503), slow (`delay`), trickling (`trickle`:
one byte of the answer every so often) or to answer the next requests with forced statuses (429 with
headers). Connection refused is `LiveServer.stop()` (and `start()` again on the same port).
Subclasses check the request against the spec and answer like the vendor.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tests.fakes.spec import Operation, Spec

__all__ = ["FakeVendor", "LiveServer", "Seen", "max_in_window"]


@dataclass
class Seen:
    at: float                       # time.monotonic() at arrival
    method: str
    path: str
    account: str
    status: int = 0
    operation: str = ""             # the spec's operationId
    done_at: float = 0.0            # time.monotonic() when the answer was sent
    body: Any = None
    violations: list[str] = field(default_factory=list)


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most arrivals in any sliding window of `window` seconds."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


class FakeVendor:
    spec: Spec

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.violations: list[str] = []
        self.down = False                   # answer 503 to everything
        self.delay = 0.0                    # seconds before answering
        self.trickle: float | None = None   # seconds between the bytes of the answer
        self.forced: deque[tuple[int, dict[str, str]]] = deque()
        self.over_limit = 0                 # requests the vendor's own limit refused
        self._in_flight: Counter[str] = Counter()
        self.peak_concurrency: Counter[str] = Counter()

    # -- controls -----------------------------------------------------------------------------------
    def force(self, status: int, count: int = 1, headers: Mapping[str, str] | None = None) -> None:
        """Answer the next `count` requests with this status (e.g. 429 with Retry-After)."""
        self.forced.extend((status, dict(headers or {})) for _ in range(count))

    def reset_counters(self) -> None:
        self.seen.clear()
        self.over_limit = 0
        self.peak_concurrency.clear()

    # -- measures -----------------------------------------------------------------------------------
    def arrivals(self, account: str | None = None) -> list[float]:
        return [s.at for s in self.seen if account is None or s.account == account]

    def max_per_second(self, account: str | None = None) -> int:
        return max_in_window(self.arrivals(account))

    def rate(self, account: str | None = None) -> float:
        """Requests per second between the first and the last arrival."""
        times = sorted(self.arrivals(account))
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0

    def mean_concurrency(self, account: str | None = None) -> float:
        """Average requests in flight from the first arrival to the last answer."""
        seen = [s for s in self.seen if account is None or s.account == account]
        if not seen:
            return 0.0
        span = max(s.done_at for s in seen) - min(s.at for s in seen)
        return sum(s.done_at - s.at for s in seen) / span if span > 0 else 0.0

    def calls(self, operation: str) -> list[Seen]:
        """Requests to one operation (by operationId) that the vendor accepted (2xx)."""
        return [s for s in self.seen if s.operation == operation and 200 <= s.status < 300]

    # -- to implement -------------------------------------------------------------------------------
    def account(self, headers: Mapping[str, str]) -> str:
        raise NotImplementedError

    def authorized(self, account: str) -> bool:
        return True

    def limit(self, account: str, now: float) -> Response | None:
        """The vendor's own rate/concurrency limit; a response refuses the request."""
        return None

    def error(self, status: int, title: str, detail: str, headers: Mapping[str, str] | None = None) -> Response:
        raise NotImplementedError

    async def handle(self, op: Operation, params: dict[str, str], query: dict[str, str], body: Any,
                     seen: Seen) -> Response:
        raise NotImplementedError

    # -- ASGI ---------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        arrived = time.monotonic()     # before the body: the connection is busy from the first byte
        request = Request(scope, receive)
        headers = {k.lower(): v for k, v in request.headers.items()}
        account = self.account(headers)
        seen = Seen(arrived, request.method, request.url.path, account)
        self.seen.append(seen)
        self._in_flight[account] += 1
        self.peak_concurrency[account] = max(self.peak_concurrency[account], self._in_flight[account])
        try:
            raw = await request.body()
            response = await self._respond(request, raw, headers, account, seen)
            seen.status = response.status_code
            if self.trickle is not None:
                response = self._trickled(response)
            await response(scope, receive, send)
        finally:
            self._in_flight[account] -= 1
            seen.done_at = time.monotonic()

    async def _respond(self, request: Request, raw: bytes, headers: dict[str, str], account: str,
                       seen: Seen) -> Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            return self.error(503, "Service Unavailable", "the fake is down")
        if self.forced:
            status, extra = self.forced.popleft()
            return self.error(status, "Forced", "forced by the test", extra)
        refused = self.limit(account, seen.at)
        if refused is not None:
            self.over_limit += 1
            return refused
        query = list(request.query_params.multi_items())
        op, params, body, problems = self.spec.check(request.method, request.url.path, query, headers, raw)
        seen.body = body
        seen.operation = op.operation_id if op is not None else ""
        if problems:
            seen.violations = problems
            self.violations += [f"{request.method} {request.url.path}: {p[:300]}" for p in problems]
            return self.error(400, "Invalid Resource", "; ".join(p[:300] for p in problems))
        assert op is not None
        if not self.authorized(account):
            return self.error(401, "API Key Invalid", "Your API key may be invalid, or you've attempted to access "
                              "the wrong datacenter.")
        return await self.handle(op, params, dict(query), body, seen)

    def violation(self, seen: Seen, reason: str) -> None:
        seen.violations.append(reason)
        self.violations.append(f"{seen.method} {seen.path}: {reason}")

    def _trickled(self, response: Response) -> Response:
        body, pause = bytes(response.body), self.trickle or 0.0

        async def drip() -> AsyncIterator[bytes]:
            for i in range(len(body)):
                await asyncio.sleep(pause)
                yield body[i:i + 1]

        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        return StreamingResponse(drip(), status_code=response.status_code, headers=headers)


class LiveServer:
    """A fake served on 127.0.0.1 at a fixed port chosen by the OS; stop() refuses connections."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LiveServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", ws="none", http="h11", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=1, backlog=1024)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake server did not start")
            time.sleep(0.01)
        self._sock = sock
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._sock.close()
        self._server = self._thread = None

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
