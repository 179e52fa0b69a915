"""Brevo API v3 adapter: make Brevo's contacts and list memberships equal to Carnet's state.

Per push (see docs/sync.md for the reasoning):
1. profile write per contact (skipped when only memberships changed): a contact whose Brevo id is known is
   updated by id, `PUT /contacts/{id}?identifierType=contact_id` with `attributes` from the field mappings,
   `attributes.EMAIL` (so an address changed in Carnet renames that contact rather than making a second one)
   and `emailBlacklisted` (the global opt-out); a new one is `POST /contacts` with `updateEnabled: true`.
2. list memberships, grouped over all contacts of the push: `POST /contacts/lists/{id}/contacts/add|remove`
   with at most 150 emails per call.
3. double opt-in: `POST /contacts/doubleOptinConfirmation` (template id and redirection URL from the
   config) for contacts `pending` on a list of `vendor_double_opt_in`.
4. commerce (products, orders, carts, events) when the destination pushes it: brevo_commerce.py.
Erasure: `DELETE /contacts/{id}?identifierType=contact_id` for each of the person's records (404 counts as done);
Brevo's API deletes no order or event, the contact's deletion is all it offers (docs/sync.md, "Commerce").

Every request waits for the process-wide limiter of its API key (at most 10 requests in any 1.05 s, counted
from when each is on the wire: net.RateLimiter); a 429 pauses that limiter for `x-sib-ratelimit-reset`/`Retry-After`
seconds, is retried in place when the wait is short, and otherwise becomes `RetryLater`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from app.logging import get_logger
from app.sync import ids, net
from app.sync.base import ContactState, DeliveryFailed, Erasure, Outcome, RetryLater
from app.sync.brevo_commerce import BATCH as COMMERCE_BATCH
from app.sync.brevo_commerce import push_commerce

__all__ = ["API_URL", "LIST_BATCH", "BrevoAdapter", "BrevoConfig"]

API_URL = "https://api.brevo.com/v3"
LIST_BATCH = 150            # addContactToListByEmails / removeContactFromListByEmails: maxItems 150
_INLINE_RETRY_MAX_WAIT = 5.0
_ALREADY = ("already in list", "already removed from list")
_ADDRESS = re.compile(r"[^@\s/?#]+@[^@\s/?#]+")
_NO_ID = "Brevo upsert: no valid contact id (a positive integer) in Brevo's answers"

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class BrevoConfig:
    api_key: str
    base_url: str = API_URL                     # (a slots dataclass has no class attribute to read it from)
    doi_template_id: int | None = None          # required when a list is in vendor_double_opt_in
    doi_redirection_url: str | None = None
    requests_per_second: float = 10.0           # Brevo's contacts limit per API key
    deadline_seconds: float = 30.0              # settings.sync_call_deadline_seconds
    retry_after_default: float = 1.0            # 429 without any reset header
    concurrency: int = 8                        # requests in flight (hides latency; the limiter sets the pace)


class BrevoAdapter:
    def __init__(self, config: BrevoConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self._base = config.base_url.rstrip("/")
        self._account = account = hashlib.sha256(config.api_key.encode()).hexdigest()[:16]
        self._limiter = net.rate_limiter("brevo", account, config.requests_per_second)

    # -- Adapter ------------------------------------------------------------------------------------
    async def push(self, states: Sequence[ContactState]) -> list[Outcome]:
        refs: dict[uuid.UUID, str | None] = {s.contact_id: s.remote_ref for s in states}
        errors: dict[uuid.UUID, str] = {}
        gate = asyncio.Semaphore(self.config.concurrency)

        async def profile(state: ContactState) -> None:
            async with gate:
                refs[state.contact_id], error = await self._write_profile(state)
                if error:
                    errors[state.contact_id] = error

        await net.run_all(
            profile(state) for state in states
            if _writes_profile(state)
        )

        live = [s for s in states if s.contact_id not in errors]
        adds, removes, doi = self._plan_lists(live, errors)

        # Membership-only adds Brevo did not do: already on the list, or the contact was deleted at Brevo since.
        unsure: dict[uuid.UUID, tuple[ContactState, list[int]]] = {}

        async def list_call(list_id: int, batch: list[ContactState], *, add: bool) -> None:
            async with gate:
                error, failed = await self._list_call(list_id, [s.email for s in batch], add=add)
                for state in batch if error else ():
                    errors.setdefault(state.contact_id, error)
                for state in batch if add else ():
                    if state.email in failed and not _writes_profile(state):
                        unsure.setdefault(state.contact_id, (state, []))[1].append(list_id)

        async def doi_call(state: ContactState, list_ids: list[int]) -> None:
            async with gate:
                error = await self._double_opt_in(state, list_ids)
                if error:
                    errors.setdefault(state.contact_id, error)

        await net.run_all([
            *(list_call(list_id, members[start:start + LIST_BATCH], add=add)
              for plan, add in ((adds, True), (removes, False))
              for list_id, members in plan.items()
              for start in range(0, len(members), LIST_BATCH)),
            *(doi_call(state, list_ids) for state, list_ids in doi),
        ])

        async def rewrite(state: ContactState, list_ids: list[int]) -> None:
            """The contact written again (created anew if Brevo deleted it, as a profile write's 404 is), then added."""
            async with gate:
                refs[state.contact_id], error = await self._write_profile(state)
                for list_id in list_ids:
                    error = error or (await self._list_call(list_id, [state.email], add=True))[0]
                if error:
                    errors.setdefault(state.contact_id, error)

        await net.run_all(rewrite(state, list_ids) for state, list_ids in unsure.values())

        # Orders, carts, events after the contacts they name exist (brevo_commerce.py).
        await push_commerce(self._request, _reason, f"{self._base}|{self._account}", live, errors)
        log.info("sync.brevo.push", contacts=len(states), failed=len(errors))
        return [
            Outcome(s.contact_id, error=errors[s.contact_id]) if s.contact_id in errors
            else Outcome(s.contact_id, remote_ref=refs[s.contact_id],
                         commerce=s.commerce.records if s.commerce else ())
            for s in states
        ]

    def affordable(
        self, states: Sequence[ContactState], erasures: Sequence[Erasure], seconds: float
    ) -> tuple[int, int]:
        """How many erasures, then states (in order), fit in `seconds` at this process's share of the rate.

        One request per contact for a profile write (two when the Brevo id must be looked up), per record an
        erasure deletes and per double opt-in; list calls carry 150 contacts. A batch of first pushes (1,500
        profile writes, 160 s at 10/s) would outlive its lease and be retried whole forever: the worker hands
        back the rest.
        """
        return net.fit(seconds / self._limiter.interval, (len(e.refs) for e in erasures),
                       (_requests(s) for s in states))

    async def erase(self, erasures: Sequence[Erasure]) -> list[Outcome]:
        """Brevo has no archive: a merged-away contact is deleted like an erased one (nothing stays retired). An
        erasure's commerce records (orders, carts sent as events) have no delete in Brevo's API: an erasure with no
        contact of the person left (`refs` empty) sends nothing and is done (docs/sync.md, "Commerce")."""
        outcomes = []
        for erasure in erasures:
            errors = [await self._delete(ref) for ref in erasure.refs]  # every record, whatever one of them answers
            outcomes.append(Outcome(erasure.contact_id, error=next(filter(None, errors), None)))
        log.info("sync.brevo.erase", contacts=len(erasures))
        return outcomes

    async def _delete(self, ref: str) -> str | None:
        if ids.is_brevo_id(ref):
            kind = "contact_id"
        elif _ADDRESS.fullmatch(ref):
            kind = "email_id"  # a reference kept as the address, before ids were
        else:  # never a request built from it (issue 15, class 7)
            return "Brevo delete: the stored reference is not a Brevo contact id"
        response = await self._request("DELETE", f"/contacts/{quote(ref, safe='')}", params={"identifierType": kind})
        return None if response.status_code in (204, 404) else _reason("delete", response)

    # -- steps --------------------------------------------------------------------------------------
    async def _write_profile(self, state: ContactState) -> tuple[str | None, str | None]:
        """(remote_ref, error) after making the Brevo contact carry this state's attributes and opt-out."""
        attributes = _attributes(state.fields)
        known = state.remote_ref if state.remote_ref and ids.is_brevo_id(state.remote_ref) else None
        former: str | None = None        # our record, when the address turned out to have a Brevo contact of its own
        if known or _email_changed(state):
            # By id, EMAIL included: the record we made follows the address wherever it went in Carnet.
            identifier, kind = (known, "contact_id") if known else (state.previous_email or "", "email_id")
            response = await self._request(
                "PUT", f"/contacts/{quote(identifier, safe='')}", params={"identifierType": kind},
                json={"attributes": {**attributes, "EMAIL": state.email}, "emailBlacklisted": state.marketing_blocked},
            )
            if response.status_code == 204:
                ref = known or await self._lookup_id(state.email)
                return (ref, None) if ref else (state.remote_ref, _NO_ID)
            if response.status_code == 400 and _code(response) == "duplicate_parameter":
                # The new address already has its own Brevo contact: that one becomes ours (upsert below), and
                # ours under the former address is deleted (Brevo has no archive; else campaigns come twice).
                log.warning("sync.brevo.email_change_conflict", contact_id=str(state.contact_id))
                former = identifier
            elif response.status_code != 404:
                return state.remote_ref, _reason("address change" if _email_changed(state) else "update", response)
        response = await self._request("POST", "/contacts", json={
            "email": state.email, "attributes": attributes, "emailBlacklisted": state.marketing_blocked,
            "updateEnabled": True,
        })
        if response.status_code in (201, 204):
            # 201 names the new contact (an id that is not one is asked again by address); 204: it existed.
            ref = ids.brevo_id(net.json_body(response).get("id")) or await self._lookup_id(state.email)
            if ref is None:
                return state.remote_ref, _NO_ID
        else:
            return state.remote_ref, _reason("upsert", response)
        if former is not None and former != ref:
            error = await self._delete(former)
            if error:
                return state.remote_ref, error
        return ref, None

    def _plan_lists(
        self, states: Sequence[ContactState], errors: dict[uuid.UUID, str]
    ) -> tuple[dict[int, list[ContactState]], dict[int, list[ContactState]], list[tuple[ContactState, list[int]]]]:
        adds: dict[int, list[ContactState]] = {}
        removes: dict[int, list[ContactState]] = {}
        doi: list[tuple[ContactState, list[int]]] = []
        for state in states:
            confirm: list[int] = []
            for remote_list, status in state.lists.items():
                if not ids.is_brevo_id(remote_list):
                    errors[state.contact_id] = "Brevo list: a mapped remote_list_id is not a Brevo list id"
                    break
                list_id = int(remote_list)
                if status == "subscribed":
                    adds.setdefault(list_id, []).append(state)
                elif status == "pending" and remote_list in state.vendor_double_opt_in:
                    if _asks(state, remote_list):  # the call mails the person: once per request, not per push
                        confirm.append(list_id)
                else:  # unsubscribed, or pending on Carnet's own confirmation: not on the Brevo list
                    removes.setdefault(list_id, []).append(state)
            if confirm and state.contact_id not in errors:
                doi.append((state, confirm))
        for plan in (adds, removes):
            for list_id, members in plan.items():
                plan[list_id] = [s for s in members if s.contact_id not in errors]
        return adds, removes, doi

    async def _list_call(self, list_id: int, emails: list[str], *, add: bool) -> tuple[str | None, set[str]]:
        """(error, the addresses Brevo did not move): Brevo's `failure` "could be already in/out list and/or doesn't
        exist"; a 400 saying so is every address of the call."""
        action = "add" if add else "remove"
        response = await self._request("POST", f"/contacts/lists/{list_id}/contacts/{action}", json={"emails": emails})
        if response.status_code == 201:
            contacts = net.json_body(response).get("contacts")
            failure = contacts.get("failure") if isinstance(contacts, dict) else None
            return None, {str(e).lower() for e in failure} if isinstance(failure, list) else set()
        if response.status_code == 400 and any(text in _message(response) for text in _ALREADY):
            return None, set(emails)  # nothing changed: already where they should be, or not at Brevo at all
        return _reason(f"list {action}", response), set()

    async def _double_opt_in(self, state: ContactState, list_ids: list[int]) -> str | None:
        config = self.config
        if config.doi_template_id is None or not config.doi_redirection_url:
            return "double opt-in through Brevo needs doi_template_id and doi_redirection_url in the destination"
        response = await self._request("POST", "/contacts/doubleOptinConfirmation", json={
            "email": state.email, "attributes": _attributes(state.fields), "includeListIds": list_ids,
            "templateId": config.doi_template_id, "redirectionUrl": config.doi_redirection_url,
        })
        return None if response.status_code in (201, 204) else _reason("double opt-in", response)

    async def _lookup_id(self, email: str) -> str | None:
        """The Brevo id of this address, if Brevo knows it and gives a valid one."""
        response = await self._request("GET", f"/contacts/{quote(email, safe='')}",
                                       params={"identifierType": "email_id"})
        return ids.brevo_id(net.json_body(response).get("id")) if response.status_code == 200 else None

    # -- transport ----------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One rate-limited request; 429/5xx/auth problems raise, other answers go back to the caller."""
        headers = {"api-key": self.config.api_key, "accept": "application/json"}
        for attempt in range(3):
            async with self._limiter.slot() as sent:
                response = await net.call(self.client, method, self._base + path,
                                          deadline=self.config.deadline_seconds, on_sent=sent, headers=headers,
                                          **kwargs)
            status = response.status_code
            if status == 429:
                wait = net.retry_after(response.headers, default=self.config.retry_after_default)
                self._limiter.pause(wait)
                if wait <= _INLINE_RETRY_MAX_WAIT and attempt < 2:
                    continue
                raise RetryLater("Brevo rate limit (429)", after_seconds=wait)
            if status == 425:  # Too Early (createContact, updateContact): not ready for it yet, not a refusal
                wait = net.retry_after(response.headers, default=self.config.retry_after_default)
                if wait <= _INLINE_RETRY_MAX_WAIT and attempt < 2:
                    await asyncio.sleep(wait)
                    continue
                raise RetryLater("Brevo answered 425 Too Early", after_seconds=wait)
            if status >= 500:
                if "retry-after" in response.headers:
                    raise RetryLater(f"Brevo answered {status}",
                                     after_seconds=net.retry_after(response.headers, default=1.0))
                raise DeliveryFailed(f"Brevo answered {status}")
            if status in (401, 403):
                raise DeliveryFailed(f"Brevo refused the API key ({status}): check the destination's api_key")
            return response
        raise AssertionError("unreachable")


def _requests(state: ContactState) -> float:
    """What one state costs in requests (list calls shared by LIST_BATCH contacts)."""
    profile = 0 if not _writes_profile(state) else (1 if state.remote_ref and state.remote_ref.isdigit() else 2)
    doi = 1 if any(status == "pending" and remote in state.vendor_double_opt_in and _asks(state, remote)
                   for remote, status in state.lists.items()) else 0
    commerce = state.commerce.requests(COMMERCE_BATCH) if state.commerce else 0
    return profile + doi + len(state.lists) / LIST_BATCH + commerce


def _asks(state: ContactState, remote_list: str) -> bool:
    """Whether this push asks for the list's confirmation: its status is news (or unknown: a first push)."""
    return state.status_changed is None or remote_list in state.status_changed


def _writes_profile(state: ContactState) -> bool:
    """The push writes the contact itself (not only list changes): new to Brevo, changed, or a new address."""
    return state.profile_changed or state.remote_ref is None or _email_changed(state)


def _email_changed(state: ContactState) -> bool:
    return bool(state.previous_email) and state.previous_email != state.email


def _attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Brevo attribute values are numbers, strings, booleans or lists of strings; None is left out."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool | int | float | str):
            out[name] = value
        elif isinstance(value, dt.date | dt.datetime):
            out[name] = value.isoformat()
        elif isinstance(value, decimal.Decimal):
            out[name] = float(value)
        elif isinstance(value, list | tuple | set | frozenset):
            out[name] = [str(v) for v in value]
        else:
            out[name] = str(value)
    return out


def _code(response: httpx.Response) -> str:
    return ids.vendor_word(net.json_body(response).get("code"))


def _message(response: httpx.Response) -> str:
    return str(net.json_body(response).get("message", ""))


def _reason(step: str, response: httpx.Response) -> str:
    """Dead-letter text: the step, the status and Brevo's code (its message may quote the address: left out)."""
    return f"Brevo {step}: {response.status_code} {_code(response)}"
