"""Mailchimp Marketing API 3.0 adapter: make each mapped audience's member equal to Carnet's state.

Per push (see docs/sync.md):
1. address change (the known subscriber hash is not md5 of the current address): `PATCH
   /lists/{list}/members/{old hash}` with the new `email_address` on every mapped audience (404: nothing to move);
   "Member Exists" (the new address is already a member): the old member is archived and reported as retired.
2. membership per mapped list: the wanted remote status is `subscribed`, `unsubscribed`, or `pending`
   for `vendor_double_opt_in` lists (Mailchimp sends its confirmation mail); a contact pending on
   Carnet's own confirmation is not sent at all; a globally blocked contact is `unsubscribed` everywhere.
   The status is sent explicitly only when it changed (`status_changed`, or unknown); otherwise only
   `status_if_new`, so an unsubscribe done in Mailchimp is never overwritten by a profile update.
   Many explicit changes for one list go in batch subscribe calls (`POST /lists/{list}`, ≤ 500 members,
   `update_existing: true`); the rest are `PUT /lists/{list}/members/{hash}` upserts.
3. tags: `POST /lists/{list}/members/{hash}/tags`, current tags active, removed ones inactive, and the tag of
   each synced segment of that audience (active for members who may receive marketing, inactive otherwise).
4. commerce (the store's customer, products, orders, carts; member events): mailchimp_commerce.py.
Erasure: `POST /lists/{list}/members/{hash}/actions/delete-permanent` on every mapped list for each of the
person's hashes (404: done); a contact merged away under another address is archived instead
(`DELETE /lists/{list}/members/{hash}`) and reported as retired, so the person's erasure deletes it for good. The
store's carts, orders and customers of the person go with it (mailchimp_commerce.forget), also when no member of
theirs is left to delete (an erasure with no `refs`).

At most `max_connections` (10) requests in flight per account in this process (a semaphore per key). A batch
is cut to what those connections can send within its part of the lease (`affordable`), at the mean request time
this process measures for the account (net.CallTimes); the worker hands the rest back untried.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from app.logging import get_logger
from app.sync import ids, net
from app.sync.base import ContactState, DeliveryFailed, Erasure, Outcome, RetryLater
from app.sync.ids import subscriber_hash
from app.sync.mailchimp_commerce import MailchimpStore, forget, push_commerce, requests_of

__all__ = ["BATCH_MAX", "MailchimpAdapter", "MailchimpConfig", "api_base_url", "subscriber_hash"]

BATCH_MAX = 500
_NOT_A_HASH = "Mailchimp delete: the stored reference is not a subscriber hash"
_INLINE_RETRY_MAX_WAIT = 5.0
# A request's time before this process has measured any for the account (Mailchimp answers in 0.1 to 0.5 s; too
# long only makes the first batches short).
CALL_SECONDS_PRIOR = 0.3

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class MailchimpConfig:
    api_key: str                                # "<key>-<dc>", e.g. "...-us6"
    list_ids: tuple[str, ...] = ()              # every mapped audience: erasure deletes the member from each
    base_url: str | None = None                 # overrides https://<dc>.api.mailchimp.com/3.0 (tests, proxies)
    max_connections: int = 10                   # Mailchimp: 10 simultaneous connections per account
    batch_threshold: int = 10                   # this many explicit status changes for one list → batch call
    deadline_seconds: float = 30.0              # settings.sync_call_deadline_seconds
    retry_after_default: float = 1.0            # 429 without Retry-After (too many connections: short)
    store: MailchimpStore | None = None         # orders and carts go there (mailchimp_commerce.py)


def api_base_url(api_key: str) -> str:
    """https://<dc>.api.mailchimp.com/3.0 from the key's data-center suffix."""
    _, _, dc = api_key.rpartition("-")
    if not re.fullmatch(r"[a-z]{2,8}\d{1,4}", dc):
        raise ValueError("a Mailchimp API key ends with its data center, like -us6")
    return f"https://{dc}.api.mailchimp.com/3.0"


@dataclass(slots=True)
class _Write:
    state: ContactState
    list_id: str
    status: str                  # wanted remote status
    explicit: bool               # send `status` (a real change), not only `status_if_new`


class MailchimpAdapter:
    def __init__(self, config: MailchimpConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self._base = (config.base_url or api_base_url(config.api_key)).rstrip("/")
        self._account = hashlib.sha256(config.api_key.encode()).hexdigest()[:16]
        self._auth = httpx.BasicAuth("carnet", config.api_key)
        self._times = net.call_times("mailchimp", self._account, CALL_SECONDS_PRIOR)

    # -- Adapter ------------------------------------------------------------------------------------
    async def push(self, states: Sequence[ContactState]) -> list[Outcome]:
        errors: dict[uuid.UUID, str] = {}
        retired: dict[uuid.UUID, str] = {}

        def fail(state: ContactState, reason: str) -> None:
            errors.setdefault(state.contact_id, reason)

        await net.run_all(self._move(state, old, list_id, fail, retired)
                          for state in states if (old := _former_hash(state))
                          for list_id in dict.fromkeys((*self.config.list_ids, *state.lists)))

        # A record that could not be moved is not written under the new address (that would make a second one).
        writes = [w for state in states if state.contact_id not in errors for w in _writes(state)]
        batched, singles = self._grouped(writes)
        await net.run_all([
            *(self._batch(list_id, group[i:i + BATCH_MAX], fail)
              for list_id, group in batched.items() for i in range(0, len(group), BATCH_MAX)),
            *(self._put(write, fail) for write in singles if _needs_put(write)),
        ])
        await net.run_all(self._tags(write, tags, fail) for write in writes
                          if write.state.contact_id not in errors and (tags := _tag_changes(write)))

        # The store's customers, products, orders, carts and events, once the members exist.
        await push_commerce(self._request, _reason, f"{self._base}|{self._account}", self.config.store, states,
                            errors)
        log.info("sync.mailchimp.push", contacts=len(states), failed=len(errors))
        return [
            Outcome(s.contact_id, error=errors[s.contact_id]) if s.contact_id in errors
            else Outcome(s.contact_id, remote_ref=subscriber_hash(s.email),
                         retired=(retired[s.contact_id],) if s.contact_id in retired else (),
                         commerce=s.commerce.records if s.commerce else ())
            for s in states
        ]

    def affordable(
        self, states: Sequence[ContactState], erasures: Sequence[Erasure], seconds: float
    ) -> tuple[int, int]:
        """How many erasures, then states (in order), fit in `seconds` on this process's share of the account's
        connections, each request holding one for the mean time measured here (from a prior until measured).

        Mailchimp caps connections, not a rate. Six lanes of 1,500 orders share 10 connections: 90 s a batch at
        0.1 s an answer even at full use, past the lease's budget, so batches timed out and went back whole
        (docs/performance.md, issue 20). The worker hands back what does not fit, untried.
        """
        capacity = seconds * net.connection_share(self.config.max_connections) / self._times.mean
        writes = [_writes(s) for s in states]
        batched, _ = self._grouped([w for of_state in writes for w in of_state])  # as `push` will group them
        products: set[str] = set()
        lists = len(self.config.list_ids)
        return net.fit(capacity,
                       (len(e.refs) * lists + (len(e.commerce) if not e.archive else 0) for e in erasures),
                       (self._requests(s, w, batched, products) for s, w in zip(states, writes, strict=True)))

    def _requests(self, state: ContactState, writes: list[_Write], batched: Mapping[str, object],
                  products: set[str]) -> float:
        """What one state costs in requests (batch subscribe calls shared by BATCH_MAX members, each product
        counted once a batch: `products` holds the skus counted so far)."""
        moves = len(dict.fromkeys((*self.config.list_ids, *state.lists))) if _former_hash(state) else 0
        calls = 0.0
        for write in writes:
            if write.explicit and write.list_id in batched:
                calls += 1 / BATCH_MAX
            elif _needs_put(write):
                calls += 1
            calls += 1 if _tag_changes(write) else 0
        return moves + calls + requests_of(self.config.store, state, products)

    def _grouped(self, writes: list[_Write]) -> tuple[dict[str, list[_Write]], list[_Write]]:
        """The writes sent in batch calls, by list (a list's explicit status changes, when there are
        `batch_threshold` of them), and the others, sent one by one."""
        batched: dict[str, list[_Write]] = {}
        singles: list[_Write] = []
        for write in writes:
            if write.explicit:
                batched.setdefault(write.list_id, []).append(write)
            else:
                singles.append(write)
        for list_id, group in list(batched.items()):
            if len(group) < self.config.batch_threshold:
                singles += batched.pop(list_id)
        return batched, singles

    async def erase(self, erasures: Sequence[Erasure]) -> list[Outcome]:
        errors: dict[uuid.UUID, str] = {}
        archived: dict[uuid.UUID, str] = {}   # contact -> the hash archived

        async def delete(erasure: Erasure, ref: str | None, list_id: str) -> None:
            if ref is None:  # never a request built from it (issue 15, class 7)
                errors.setdefault(erasure.contact_id, _NOT_A_HASH)
                return
            if erasure.archive:  # merged away: archived, so the address can come back one day
                response, step = await self._request("DELETE", f"/lists/{list_id}/members/{ref}"), "archive"
                if response.status_code == 204:
                    archived[erasure.contact_id] = ref
            else:
                response = await self._request("POST", f"/lists/{list_id}/members/{ref}/actions/delete-permanent")
                step = "delete-permanent"
            if response.status_code not in (204, 404):
                errors.setdefault(erasure.contact_id, _reason(step, response))

        async def commerce(erasure: Erasure) -> None:
            error = await forget(self._request, _reason, self.config.store, erasure)
            if error:
                errors.setdefault(erasure.contact_id, error)

        await net.run_all([*(delete(e, _hash(ref), list_id) for e in erasures for ref in e.refs
                             for list_id in self.config.list_ids),
                           *(commerce(e) for e in erasures if e.commerce and not e.archive)])
        log.info("sync.mailchimp.erase", contacts=len(erasures), lists=len(self.config.list_ids))
        return [Outcome(e.contact_id, error=errors.get(e.contact_id),
                        retired=(archived[e.contact_id],) if e.contact_id in archived else ()) for e in erasures]

    # -- steps --------------------------------------------------------------------------------------
    async def _move(self, state: ContactState, old: str, list_id: str, fail: Any, retired: dict[uuid.UUID, str]
                    ) -> None:
        response = await self._request("PATCH", f"/lists/{list_id}/members/{old}",
                                       json={"email_address": state.email})
        if response.status_code in (200, 404):
            return
        if response.status_code == 400 and _title(response) == "Member Exists":
            # The new address is already on the list: the upsert below updates that member, and the old one is
            # archived (else the person gets every campaign twice), remembered as retired until their erasure.
            log.warning("sync.mailchimp.email_change_conflict", contact_id=str(state.contact_id))
            archive = await self._request("DELETE", f"/lists/{list_id}/members/{old}")
            if archive.status_code in (204, 404):
                retired[state.contact_id] = old
            else:
                fail(state, _reason("archive of the former address", archive))
            return
        fail(state, _reason("address change", response))

    async def _put(self, write: _Write, fail: Any) -> None:
        state = write.state
        body: dict[str, Any] = {"email_address": state.email, "status_if_new": write.status}
        if write.explicit:
            body["status"] = write.status
        if state.fields:
            body["merge_fields"] = _merge_fields(state.fields)
        response = await self._request("PUT", f"/lists/{write.list_id}/members/{subscriber_hash(state.email)}",
                                       json=body)
        if response.status_code != 200:
            fail(state, _reason("upsert", response))

    async def _batch(self, list_id: str, group: list[_Write], fail: Any) -> None:
        members = []
        for write in group:
            member: dict[str, Any] = {"email_address": write.state.email, "status": write.status}
            if write.state.fields:
                member["merge_fields"] = _merge_fields(write.state.fields)
            members.append(member)
        response = await self._request("POST", f"/lists/{list_id}", json={"members": members, "update_existing": True})
        if response.status_code != 200:
            for write in group:
                fail(write.state, _reason("batch subscribe", response))
            return
        by_email = {w.state.email: w.state for w in group}
        for item in net.json_body(response).get("errors") or ():
            state = by_email.get(str(item.get("email_address", "")).lower())
            if state is not None:
                fail(state, f"Mailchimp batch subscribe: {ids.vendor_word(item.get('error_code'))}")

    async def _tags(self, write: _Write, tags: list[dict[str, str]], fail: Any) -> None:
        state = write.state
        response = await self._request("POST", f"/lists/{write.list_id}/members/{subscriber_hash(state.email)}/tags",
                                       json={"tags": tags})
        if response.status_code != 204:
            fail(state, _reason("tags", response))

    # -- transport ----------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request under the account's connection cap; 429/5xx/auth problems raise."""
        gate = net.semaphore("mailchimp", self._account, self.config.max_connections)
        for attempt in range(3):
            async with gate:
                started = time.monotonic()
                response = await net.call(self.client, method, self._base + path, auth=self._auth,
                                          deadline=self.config.deadline_seconds, **kwargs)
                self._times.record(time.monotonic() - started)
            status = response.status_code
            if status == 429:
                wait = net.retry_after(response.headers, default=self.config.retry_after_default)
                if wait <= _INLINE_RETRY_MAX_WAIT and attempt < 2:
                    await asyncio.sleep(wait)
                    continue
                raise RetryLater("Mailchimp rate limit (429)", after_seconds=wait)
            if status >= 500:
                if "retry-after" in response.headers:
                    raise RetryLater(f"Mailchimp answered {status}",
                                     after_seconds=net.retry_after(response.headers, default=1.0))
                raise DeliveryFailed(f"Mailchimp answered {status}")
            if status in (401, 403):
                raise DeliveryFailed(f"Mailchimp refused the API key ({status}): check the destination's api_key")
            return response
        raise AssertionError("unreachable")


def _writes(state: ContactState) -> list[_Write]:
    out = []
    for list_id, status in state.lists.items():
        if state.marketing_blocked:
            wanted = "unsubscribed"
        elif status == "pending":
            if list_id not in state.vendor_double_opt_in:
                continue  # Carnet sends its own confirmation; Mailchimp hears of the member once confirmed
            wanted = "pending"
        else:
            wanted = status
        explicit = state.status_changed is None or list_id in state.status_changed or state.marketing_blocked
        out.append(_Write(state, list_id, wanted, explicit))
    return out


def _needs_put(write: _Write) -> bool:
    """A member written one by one is sent when its status is news, its profile changed, or it is not there yet."""
    return write.explicit or write.state.profile_changed or write.state.remote_ref is None


def _tag_changes(write: _Write) -> list[dict[str, str]]:
    """Contact tags when the profile changed (removed ones inactive), and the synced segments' tags of this audience."""
    state = write.state
    status: dict[str, str] = {}
    if state.profile_changed:
        status.update((t, "active") for t in state.tags)
        for t in state.removed_tags:
            status.setdefault(t, "inactive")
    status.update((t, "active" if active else "inactive")
                  for t, active in state.segment_tags.get(write.list_id, {}).items())
    return [{"name": name, "status": value} for name, value in status.items()]


def _former_hash(state: ContactState) -> str | None:
    """The subscriber hash of the member to move onto the current address, if the address changed since."""
    if state.previous_email and state.previous_email.lower() != state.email.lower():
        return subscriber_hash(state.previous_email)
    ref = state.remote_ref
    if ref and ids.is_subscriber_hash(ref) and ref != subscriber_hash(state.email):
        return ref
    return None


def _hash(ref: str) -> str | None:
    """A remote reference as a subscriber hash (an address, in references made before hashes were kept); None
    when it is neither."""
    if "@" in ref:
        return subscriber_hash(ref)
    return ref if ids.is_subscriber_hash(ref) else None


def _merge_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Merge field values are strings, numbers or address objects; None clears the field ("")."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None:
            out[name] = ""
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, int | float | str | dict):
            out[name] = value
        elif hasattr(value, "isoformat"):
            out[name] = value.isoformat()
        else:
            out[name] = str(value)
    return out


def _title(response: httpx.Response) -> str:
    return ids.vendor_word(net.json_body(response).get("title"))


def _reason(step: str, response: httpx.Response) -> str:
    """Dead-letter text: step, status and Mailchimp's problem title (its detail quotes the address: left out)."""
    return f"Mailchimp {step}: {response.status_code} {_title(response)}"
