"""The network edge: SSRF refusals (at connect time, no rebinding), the overall deadline, Retry-After, pacing."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import random
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from app.sync import net
from app.sync.base import DeliveryFailed, RetryLater
from tests.fakes.server import LiveServer, max_in_window


class _Echo:
    """Answers the Host header it saw; `trickle` makes it drip a long body one byte at a time."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.trickle: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        self.hosts.append(request.headers.get("host", ""))
        if self.trickle is None:
            await PlainTextResponse("ok")(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        for _ in range(100):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await asyncio.sleep(self.trickle)


@pytest.fixture
def echo() -> Iterator[tuple[_Echo, LiveServer]]:
    app = _Echo()
    with LiveServer(app) as live:
        yield app, live


@pytest_asyncio.fixture
async def guarded() -> AsyncIterator[net.httpx.AsyncClient]:
    async with net.build_client(allow_private_networks=False) as client:
        yield client


class TestAddressRefusal:
    @pytest.mark.parametrize(("address", "reason"), [
        ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
        ("192.168.1.1", "private"), ("169.254.169.254", "cloud metadata address"),
        ("fd00:ec2::254", "cloud metadata address"), ("169.254.10.1", "link-local"), ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 ("::", "unspecified"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
        ("240.0.0.1", "private"), ("100.64.0.1", "shared (carrier-grade NAT)"), ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "cloud metadata address"), ("fc00::1", "private"), ("198.18.0.1", "private"),
    ])
    def test_refused(self, address: str, reason: str) -> None:
        assert net.address_refusal(ipaddress.ip_address(address)) == reason

    @pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
    def test_public_addresses_pass(self, address: str) -> None:
        assert net.address_refusal(ipaddress.ip_address(address)) is None


class TestCheckUrl:
    async def test_a_name_resolving_to_loopback_is_refused(self) -> None:
        async def resolver(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        with pytest.raises(net.BlockedAddress, match="loopback") as caught:
            await net.check_url("https://hooks.shop.example/in", allow_private=False, resolver=resolver)
        assert caught.value.permanent

    async def test_localhost_is_refused_through_the_system_resolver(self) -> None:
        with pytest.raises(net.BlockedAddress):
            await net.check_url("http://localhost:8080/", allow_private=False)

    async def test_one_refused_address_among_several_refuses_the_host(self) -> None:
        async def resolver(host: str, port: int) -> list[str]:
            return ["93.184.216.34", "10.0.0.5"]

        with pytest.raises(net.BlockedAddress, match="private"):
            await net.check_url("https://shop.example/", allow_private=False, resolver=resolver)

    async def test_the_allow_flag_lets_private_targets_through(self) -> None:
        await net.check_url("http://127.0.0.1:9/", allow_private=True)

    @pytest.mark.parametrize("url", ["ftp://shop.example/", "file:///etc/passwd", "https://user:pw@shop.example/",
                                     "not a url", "https://shop.example:99999/"])
    async def test_malformed_or_non_http_urls_are_permanent_failures(self, url: str) -> None:
        with pytest.raises(DeliveryFailed) as caught:
            await net.check_url(url, allow_private=True)
        assert caught.value.permanent


class TestGuardedClient:
    async def test_connecting_to_loopback_is_refused(self, echo: tuple[_Echo, LiveServer],
                                                     guarded: net.httpx.AsyncClient) -> None:
        app, live = echo
        for url in (live.url, f"http://localhost:{live.port}/"):
            with pytest.raises(net.BlockedAddress):
                await net.call(guarded, "GET", url, deadline=5)
        assert app.hosts == []

    async def test_the_checked_address_is_the_one_connected(self, echo: tuple[_Echo, LiveServer]) -> None:
        app, live = echo
        calls: list[str] = []

        async def resolver(host: str, port: int) -> list[str]:
            calls.append(host)
            return ["127.0.0.1"]

        async with net.build_client(allow_private_networks=True, resolver=resolver) as client:
            response = await net.call(client, "GET", f"http://vendor.test:{live.port}/", deadline=5)
        assert response.text == "ok"
        assert calls == ["vendor.test"]                       # one resolution, used for the connection
        assert app.hosts == [f"vendor.test:{live.port}"]      # the name travels in Host (and SNI for TLS)

    async def test_dns_rebinding_after_the_advisory_check_is_caught_at_connect(
        self, echo: tuple[_Echo, LiveServer]
    ) -> None:
        app, live = echo
        answers = iter([["93.184.216.34"], ["127.0.0.1"]])

        async def rebinding(host: str, port: int) -> list[str]:
            return next(answers)

        url = f"http://rebind.test:{live.port}/"
        await net.check_url(url, allow_private=False, resolver=rebinding)   # first answer: public
        async with net.build_client(allow_private_networks=False, resolver=rebinding) as client:
            with pytest.raises(net.BlockedAddress):
                await net.call(client, "GET", url, deadline=5)             # second answer: loopback
        assert app.hosts == []


class TestDeadline:
    async def test_a_trickling_server_is_cut_at_the_overall_deadline(self, echo: tuple[_Echo, LiveServer]) -> None:
        app, live = echo
        app.trickle = 0.2  # a byte every 0.2 s: httpx's 10 s read timeout never fires
        async with net.build_client(allow_private_networks=True, timeout=10) as client:
            started = time.monotonic()
            with pytest.raises(DeliveryFailed, match="no complete answer within 1 s") as caught:
                await net.call(client, "GET", live.url, deadline=1.0)
        assert 0.9 <= time.monotonic() - started < 2.0
        assert not caught.value.permanent

    async def test_connection_refused_is_a_retryable_failure(self) -> None:
        live = LiveServer(_Echo()).start()
        live.stop()
        async with net.build_client(allow_private_networks=True) as client:
            with pytest.raises(DeliveryFailed, match="network error") as caught:
                await net.call(client, "GET", live.url, deadline=5)
        assert not caught.value.permanent


class TestRetryAfter:
    def test_seconds(self) -> None:
        assert net.retry_after({"retry-after": "7"}, default=1) == 7

    def test_http_date(self) -> None:
        assert net.retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:20 GMT"}, default=1,
                               now=1445412480.0) == pytest.approx(20)

    def test_brevo_reset_header_and_the_longest_wins(self) -> None:
        assert net.retry_after({"x-sib-ratelimit-reset": "3"}, default=1) == 3
        assert net.retry_after({"retry-after": "2", "x-sib-ratelimit-reset": "9"}, default=1) == 9

    def test_garbage_negative_and_huge_values(self) -> None:
        assert net.retry_after({"retry-after": "soon"}, default=1.5) == 1.5
        assert net.retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, default=1) == 0
        assert net.retry_after({"retry-after": "999999"}, default=1) == 3600

    def test_a_vendor_wait_that_is_not_a_number_is_not_zero(self) -> None:
        """A wait taken from a vendor answer is checked like any vendor value (issue 15, class 7): `nan` made it 0,
        so the vendor that asked for a pause was called again at once."""
        assert net.retry_after({"x-sib-ratelimit-reset": "nan"}, default=1.5) == 1.5
        assert net.retry_after({"x-sib-ratelimit-reset": "inf"}, default=1) == 3600


async def _arrivals(limiter: net.RateLimiter, n: int, lags: list[float], noise: list[float], *,
                    counted_at_send: bool) -> list[float]:
    """When n requests reach the vendor: the k-th admitted is held back lags[k] (a busy event loop between the
    limiter and the socket), then goes on the wire, then arrives noise[k] later (network, the vendor's stamp)."""
    arrivals: list[float] = []
    admitted = itertools.count()

    async def one() -> None:
        async with limiter.slot() as sent:
            k = next(admitted)
            if not counted_at_send:
                sent()              # what a limiter that counts at admission does
            await asyncio.sleep(lags[k])
            sent()
            arrivals.append(time.monotonic() + noise[k])
            await asyncio.sleep(0.02)  # the answer

    await asyncio.gather(*(one() for _ in range(n)))
    return arrivals


class TestPacing:
    async def test_the_limiter_spreads_starts_and_caps_each_window(self) -> None:
        limiter = net.RateLimiter(50)
        starts = []
        began = time.monotonic()
        for _ in range(60):
            await limiter.acquire()
            starts.append(time.monotonic())
        assert time.monotonic() - began >= 1.0 + net.WINDOW_MARGIN - 0.01   # the 51st waited for the window
        assert max_in_window(starts) <= 50
        assert min(b - a for a, b in itertools.pairwise(starts)) >= limiter.spacing - 0.002

    async def test_no_second_at_the_vendor_exceeds_the_limit_under_scheduling_jitter(self) -> None:
        """A third of the requests are held back 50-300 ms between admission and the wire, and each arrives up to
        40 ms after its send: still never more than 20 in any 1-second window at the vendor, and the rate used."""
        draw = random.Random(20)  # noqa: S311 (a seeded, repeatable jitter: no secret)
        n = 70
        lags = [draw.uniform(0.05, 0.3) if draw.random() < 0.33 else 0.0 for _ in range(n)]
        noise = [draw.uniform(0.0, 0.04) for _ in range(n)]
        arrivals = await _arrivals(net.RateLimiter(20), n, lags, noise, counted_at_send=True)
        assert max_in_window(arrivals) <= 20
        ordered = sorted(arrivals)
        assert (n - 1) / (ordered[-1] - ordered[0]) >= 0.8 * 20

    async def test_counting_at_admission_lets_a_held_back_request_crowd_a_second(self) -> None:
        """The same measure against the failure it guards: the first request held back 0.7 s lands in the next
        window's second, beside its 20 requests. Counted from its send, it holds one of them back."""
        n = 41
        lags = [0.7 if k == 0 else 0.0 for k in range(n)]
        arrivals = await _arrivals(net.RateLimiter(20), n, lags, [0.0] * n, counted_at_send=False)
        assert max_in_window(arrivals) > 20
        arrivals = await _arrivals(net.RateLimiter(20), n, lags, [0.0] * n, counted_at_send=True)
        assert max_in_window(arrivals) <= 20

    async def test_a_pause_holds_everyone_sharing_the_key(self) -> None:
        limiter = net.rate_limiter("test", "k1", 100)
        assert net.rate_limiter("test", "k1", 100) is limiter
        limiter.pause(0.3)
        began = time.monotonic()
        await limiter.acquire()
        assert time.monotonic() - began >= 0.29

    async def test_a_request_lost_before_the_wire_stops_counting_after_a_while(self, monkeypatch: pytest.MonkeyPatch,
                                                                             ) -> None:
        limiter = net.RateLimiter(1)
        await limiter._admit()                     # admitted, and its task gone without a word
        monkeypatch.setattr(net, "_PENDING_MAX", 0.05)
        async with asyncio.timeout(2):
            await limiter.acquire()                # would wait forever if the lost one counted for good

    async def test_the_gate_lets_waiters_in_one_by_one_first_come_first_served(self) -> None:
        gate = net.Gate(2)
        order: list[int] = []
        peak = inside = 0

        async def hold(k: int) -> None:
            nonlocal peak, inside
            async with gate:
                inside += 1
                peak = max(peak, inside)
                order.append(k)
                await asyncio.sleep(0.01)
                inside -= 1

        await asyncio.gather(*(hold(k) for k in range(20)))
        assert peak == 2 and order == list(range(20))

    async def test_the_gate_grows_at_once_and_a_cancelled_waiter_gives_its_place_on(self) -> None:
        gate = net.Gate(1)
        release = asyncio.Event()
        entered: list[str] = []

        async def hold(name: str) -> None:
            async with gate:
                entered.append(name)
                await release.wait()

        first = asyncio.create_task(hold("first"))
        await asyncio.sleep(0.01)
        doomed, third = asyncio.create_task(hold("doomed")), asyncio.create_task(hold("third"))
        await asyncio.sleep(0.01)
        doomed.cancel()
        gate.size = 2                              # a place opens: the next live waiter takes it
        await asyncio.sleep(0.01)
        assert entered == ["first", "third"]
        release.set()
        await asyncio.gather(first, third)
        with pytest.raises(asyncio.CancelledError):
            await doomed
        async with gate, gate:                     # nothing leaked: both places are free again
            pass

    async def test_run_all_raises_the_longest_wait(self) -> None:
        async def wait(seconds: float) -> None:
            raise RetryLater("429", after_seconds=seconds)

        with pytest.raises(RetryLater) as caught:
            await net.run_all([wait(1), wait(5), wait(2)])
        assert caught.value.after_seconds == 5
