"""Standard Webhooks sender against a live receiver that verifies signatures on its own."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import pytest_asyncio

from app.sync import net
from app.sync.base import DeliveryFailed, EventMessage, Gone, RetryLater
from app.sync.webhook import WebhookAdapter, WebhookConfig, generate_secret, secret_key, sign, signature_header
from tests.fakes.server import LiveServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver

# The test vector of the Standard Webhooks reference libraries (the spec's signature scheme, §"Signature
# scheme"; the spec text shows the format but no secret, the libraries' tests pin this one).
VECTOR = {"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
          "timestamp": 1614265330, "body": b'{"test": 2432232314}',
          "signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}

SECRET = generate_secret()
OLD_SECRET = generate_secret()
MESSAGE = EventMessage(id="msg_0193a1b2c3", topic="membership.subscribed", created_at="2026-11-23T10:00:00Z",
                       payload={"contact_id": "0193a1b2-0000-7000-8000-000000000001", "list_id": "newsletter"})


@pytest.fixture
def receiver() -> Iterator[tuple[FakeWebhookReceiver, LiveServer]]:
    app = FakeWebhookReceiver(SECRET)
    with LiveServer(app) as live:
        yield app, live


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with net.build_client(allow_private_networks=True) as http:
        yield http


def adapter(url: str, client: httpx.AsyncClient, *secrets: str, deadline: float = 5.0,
            allow_private: bool = True) -> WebhookAdapter:
    return WebhookAdapter(WebhookConfig(url=url, secrets=secrets or (SECRET,), deadline_seconds=deadline,
                                        allow_private_networks=allow_private), client)


class TestSignature:
    def test_matches_the_standard_webhooks_vector(self) -> None:
        assert sign(VECTOR["secret"], VECTOR["id"], VECTOR["timestamp"], VECTOR["body"]) == VECTOR["signature"]

    def test_two_secrets_give_two_space_separated_signatures_newest_first(self) -> None:
        header = signature_header([SECRET, VECTOR["secret"]], VECTOR["id"], VECTOR["timestamp"], VECTOR["body"])
        first, second = header.split(" ")
        assert first == sign(SECRET, VECTOR["id"], VECTOR["timestamp"], VECTOR["body"])
        assert second == VECTOR["signature"]

    def test_generated_secrets(self) -> None:
        secret = generate_secret()
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
        assert secret != generate_secret()
        with pytest.raises(ValueError, match="24 and 64"):
            generate_secret(8)

    @pytest.mark.parametrize("bad", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_c2hvcnQ="])
    def test_malformed_secrets_are_refused(self, bad: str) -> None:
        with pytest.raises(ValueError, match="signing secret"):
            secret_key(bad)
        with pytest.raises(ValueError, match="signing secret"):
            WebhookConfig(url="https://shop.example/hooks", secrets=(bad,))


class TestSend:
    async def test_delivers_a_signed_standard_webhook(self, receiver: tuple[FakeWebhookReceiver, LiveServer],
                                                      client: httpx.AsyncClient) -> None:
        app, live = receiver
        await adapter(live.url + "/hooks", client).send(MESSAGE)
        [delivery] = app.deliveries
        assert delivery.valid, delivery.reason
        assert delivery.id == MESSAGE.id
        assert abs(int(delivery.timestamp) - time.time()) < 5
        assert delivery.payload == {"type": "membership.subscribed", "timestamp": "2026-11-23T10:00:00Z",
                                    "data": dict(MESSAGE.payload)}
        assert b" " not in delivery.body  # minified: what is signed is what is sent

    async def test_the_id_is_stable_across_retries(self, receiver: tuple[FakeWebhookReceiver, LiveServer],
                                                   client: httpx.AsyncClient) -> None:
        app, live = receiver
        app.answer(503)
        sender = adapter(live.url, client)
        with pytest.raises(DeliveryFailed) as caught:
            await sender.send(MESSAGE)
        assert not caught.value.permanent
        await sender.send(MESSAGE)
        assert [d.id for d in app.deliveries] == [MESSAGE.id, MESSAGE.id]
        assert all(d.valid for d in app.deliveries)

    async def test_during_rotation_a_receiver_with_either_secret_verifies(
        self, receiver: tuple[FakeWebhookReceiver, LiveServer], client: httpx.AsyncClient
    ) -> None:
        app, live = receiver
        for known in (SECRET, OLD_SECRET):
            app.secrets = [known]
            await adapter(live.url, client, SECRET, OLD_SECRET).send(MESSAGE)
        assert [d.valid for d in app.deliveries] == [True, True]
        assert all(len(d.signatures.split(" ")) == 2 for d in app.deliveries)
        app.secrets = [generate_secret()]
        with pytest.raises(DeliveryFailed):  # the receiver says 401: a permanent failure
            await adapter(live.url, client, SECRET, OLD_SECRET).send(MESSAGE)
        assert app.deliveries[-1].reason == "no signature matches"


class TestAnswers:
    async def test_410_is_gone(self, receiver: tuple[FakeWebhookReceiver, LiveServer],
                               client: httpx.AsyncClient) -> None:
        app, live = receiver
        app.answer(410)
        with pytest.raises(Gone) as caught:
            await adapter(live.url, client).send(MESSAGE)
        assert caught.value.permanent

    async def test_429_waits_as_told(self, receiver: tuple[FakeWebhookReceiver, LiveServer],
                                     client: httpx.AsyncClient) -> None:
        app, live = receiver
        app.answer(429, headers={"retry-after": "7"})
        with pytest.raises(RetryLater) as caught:
            await adapter(live.url, client).send(MESSAGE)
        assert caught.value.after_seconds == 7

    @pytest.mark.parametrize(("status", "permanent"), [(500, False), (502, False), (504, False), (408, False),
                                                       (400, True), (401, True), (404, True), (422, True)])
    async def test_other_statuses(self, receiver: tuple[FakeWebhookReceiver, LiveServer],
                                  client: httpx.AsyncClient, status: int, permanent: bool) -> None:
        app, live = receiver
        app.answer(status)
        with pytest.raises(DeliveryFailed) as caught:
            await adapter(live.url, client).send(MESSAGE)
        assert caught.value.permanent is permanent
        assert not isinstance(caught.value, RetryLater | Gone)

    async def test_redirects_are_not_followed(self, receiver: tuple[FakeWebhookReceiver, LiveServer],
                                              client: httpx.AsyncClient) -> None:
        app, live = receiver
        target = FakeWebhookReceiver(SECRET)
        with LiveServer(target) as elsewhere:
            app.answer(307, headers={"location": elsewhere.url + "/moved"})
            with pytest.raises(DeliveryFailed, match="redirect") as caught:
                await adapter(live.url, client).send(MESSAGE)
        assert caught.value.permanent
        assert target.deliveries == []


class TestEdge:
    async def test_a_loopback_url_is_refused_without_the_allow_flag(
        self, receiver: tuple[FakeWebhookReceiver, LiveServer]
    ) -> None:
        app, live = receiver
        async with net.build_client(allow_private_networks=False) as guarded:
            for url in (live.url, f"http://localhost:{live.port}/"):
                with pytest.raises(net.BlockedAddress) as caught:
                    await adapter(url, guarded, allow_private=False).send(MESSAGE)
                assert caught.value.permanent
        assert app.deliveries == []

    async def test_a_slow_receiver_is_cut_at_the_deadline(self, receiver: tuple[FakeWebhookReceiver, LiveServer],
                                                          client: httpx.AsyncClient) -> None:
        app, live = receiver
        app.delay = 3
        started = time.monotonic()
        with pytest.raises(DeliveryFailed, match="no complete answer") as caught:
            await adapter(live.url, client, deadline=0.5).send(MESSAGE)
        assert time.monotonic() - started < 1.5
        assert not caught.value.permanent
