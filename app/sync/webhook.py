"""Standard Webhooks v1 sender: signed JSON POSTs, one outbox message per request.

Each delivery carries `webhook-id` (the message id, the same on every retry), `webhook-timestamp` (the
time of this attempt) and `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`
keyed with the bytes after `whsec_`, one entry per secret, space-separated (two secrets during a
rotation). The body is `{"type", "timestamp", "data"}` (spec "Payload structure"), minified.

Answers (spec "Delivery success and failure"): 2xx done; 410 → `Gone` (disable the endpoint);
429, 408, 5xx → retry (`RetryLater` when a Retry-After says how long); 3xx → permanent failure
(redirects are never followed); any other status → permanent failure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from app.sync import net
from app.sync.base import DeliveryFailed, EventMessage, Gone, RetryLater

__all__ = ["WebhookAdapter", "WebhookConfig", "generate_secret", "secret_key", "sign", "signature_header"]

SECRET_PREFIX = "whsec_"  # noqa: S105 (the format marker, not a secret)


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    secrets: tuple[str, ...]                     # whsec_...; the newest first, an old one during rotation
    allow_private_networks: bool = False         # settings.sync_allow_private_networks
    deadline_seconds: float = 30.0               # settings.sync_call_deadline_seconds
    retry_after_default: float = 30.0            # 429 without Retry-After

    def __post_init__(self) -> None:
        if not self.secrets:
            raise ValueError("a webhook destination needs at least one signing secret")
        for secret in self.secrets:
            secret_key(secret)


def generate_secret(n_bytes: int = 32) -> str:
    """A new signing secret, `whsec_` + base64 of random bytes (the spec asks for 24 to 64 bytes)."""
    if not 24 <= n_bytes <= 64:
        raise ValueError("a signing secret has between 24 and 64 random bytes")
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(n_bytes)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret; ValueError when it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a signing secret starts with whsec_")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a signing secret is whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("a signing secret is too short")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<signature>` entry."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets_)


class WebhookAdapter:
    def __init__(self, config: WebhookConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client

    async def send(self, message: EventMessage) -> None:
        config = self.config
        # Advisory here (clear, early error); the guarded transport of net.build_client checks at connect.
        await net.check_url(config.url, allow_private=config.allow_private_networks)
        body = json.dumps({"type": message.topic, "timestamp": message.created_at, "data": dict(message.payload)},
                          separators=(",", ":"), ensure_ascii=False, default=str).encode()
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": message.id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": signature_header(config.secrets, message.id, stamp, body),
        }
        response = await net.call(self.client, "POST", config.url, deadline=config.deadline_seconds,
                                  content=body, headers=headers)
        status = response.status_code
        if 200 <= status < 300:
            return
        if status == 410:
            raise Gone("the endpoint answered 410 Gone")
        if status == 429 or (status >= 500 and "retry-after" in response.headers):
            wait = net.retry_after(response.headers, default=config.retry_after_default)
            raise RetryLater(f"the endpoint answered {status}", after_seconds=wait)
        if status >= 500 or status == 408:
            raise DeliveryFailed(f"the endpoint answered {status}")
        if 300 <= status < 400:
            raise DeliveryFailed(f"the endpoint answered a redirect ({status}), not followed: update the URL",
                                 permanent=True)
        raise DeliveryFailed(f"the endpoint answered {status}", permanent=True)
