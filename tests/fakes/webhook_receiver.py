"""A Standard Webhooks receiver: verifies every delivery on its own (not with Carnet's code) and records it.

Verification follows spec §"Verifying Webhook Authenticity": the signed content is
`{webhook-id}.{webhook-timestamp}.{body}`, HMAC-SHA256 keyed with the base64-decoded part of the
`whsec_` secret; `webhook-signature` holds space-delimited `v1,<base64>` entries, any one may match;
timestamps outside the tolerance are refused. `answers` scripts the statuses (200 by default; 410,
429 + Retry-After, 500, or a 307 redirect to `redirect_to`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["Delivery", "FakeWebhookReceiver"]

TOLERANCE_SECONDS = 5 * 60


@dataclass
class Delivery:
    id: str
    timestamp: str
    signatures: str
    body: bytes
    valid: bool
    reason: str = ""

    @property
    def payload(self) -> Any:
        return json.loads(self.body)


class FakeWebhookReceiver:
    def __init__(self, *secrets: str) -> None:
        self.secrets = list(secrets)
        self.deliveries: list[Delivery] = []
        self.answers: deque[tuple[int, dict[str, str]]] = deque()
        self.delay = 0.0

    def answer(self, status: int, count: int = 1, headers: Mapping[str, str] | None = None) -> None:
        self.answers.extend((status, dict(headers or {})) for _ in range(count))

    def verify(self, headers: Mapping[str, str], body: bytes) -> tuple[bool, str]:
        msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
        signatures = headers.get("webhook-signature", "")
        if not (msg_id and stamp and signatures):
            return False, "missing webhook-* headers"
        if not stamp.isdigit() or abs(time.time() - int(stamp)) > TOLERANCE_SECONDS:
            return False, "timestamp outside the tolerance"
        content = f"{msg_id}.{stamp}.".encode() + body
        for secret in self.secrets:
            key = base64.b64decode(secret.removeprefix("whsec_"))
            expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
            for entry in signatures.split(" "):
                version, _, signature = entry.partition(",")
                if version == "v1" and hmac.compare_digest(signature, expected):
                    return True, ""
        return False, "no signature matches"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        valid, reason = self.verify(headers, body)
        if request.method != "POST" or headers.get("content-type", "").split(";")[0] != "application/json":
            valid, reason = False, "not a JSON POST"
        self.deliveries.append(Delivery(headers.get("webhook-id", ""), headers.get("webhook-timestamp", ""),
                                        headers.get("webhook-signature", ""), body, valid, reason))
        if self.delay:
            await asyncio.sleep(self.delay)
        status, extra = self.answers.popleft() if self.answers else ((204, {}) if valid else (401, {}))
        await Response(status_code=status, headers=extra)(scope, receive, send)
