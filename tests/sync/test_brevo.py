"""Brevo adapter against the live fake Brevo: every request checked against brevo-v3.openapi.json."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app.sync import net
from app.sync.base import ContactState, DeliveryFailed, Erasure, RetryLater
from app.sync.brevo import LIST_BATCH, BrevoAdapter, BrevoConfig
from tests.fakes.brevo import FakeBrevo, RemoteContact
from tests.fakes.server import LiveServer


@pytest.fixture
def brevo() -> Iterator[tuple[FakeBrevo, LiveServer]]:
    fake = FakeBrevo(api_key=f"xkeysib-{uuid.uuid4().hex}", lists={1, 2, 3})
    with LiveServer(fake) as live:
        yield fake, live
    assert fake.violations == []


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with net.build_client(allow_private_networks=True) as http:
        yield http


def adapter(brevo: tuple[FakeBrevo, LiveServer], client: httpx.AsyncClient, **config: Any) -> BrevoAdapter:
    fake, live = brevo
    options: dict[str, Any] = {"doi_template_id": 12, "doi_redirection_url": "https://shop.example/confirmed",
                               "deadline_seconds": 5.0, **config}
    return BrevoAdapter(BrevoConfig(api_key=fake.api_key, base_url=live.url, **options), client)


def state(email: str, **overrides: Any) -> ContactState:
    values: dict[str, Any] = {"contact_id": uuid.uuid4(), "email": email, "fields": {"FIRSTNAME": "Claire"},
                              "lists": {"1": "subscribed"}}
    return ContactState(**{**values, **overrides})


class TestPush:
    async def test_creates_contacts_attributes_and_memberships(self, brevo: tuple[FakeBrevo, LiveServer],
                                                               client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        states = [
            state("a@example.com", lists={"1": "subscribed", "2": "subscribed"}),
            state("b@example.com", fields={"FIRSTNAME": "Bob", "ORDERS": 3, "VIP": True}),
            state("c@example.com", lists={"1": "unsubscribed", "2": "subscribed"}),
        ]
        outcomes = await adapter(brevo, client).push(states)
        assert [o.error for o in outcomes] == [None, None, None]
        for s, outcome in zip(states, outcomes, strict=True):
            remote = fake.by_email(s.email)
            assert remote is not None and outcome.remote_ref == str(remote.id)
        assert fake.members(1) == {"a@example.com", "b@example.com"}
        assert fake.members(2) == {"a@example.com", "c@example.com"}
        assert fake.by_email("b@example.com").attributes == {"FIRSTNAME": "Bob", "ORDERS": 3, "VIP": True}
        # Grouped: one add per list, not one per contact (c was in no list: its remove changed nothing).
        assert len(fake.calls("createContact")) == 3
        assert sorted(len(c.body["emails"]) for c in fake.calls("addContactToList")) == [2, 2]
        assert all(c.body["updateEnabled"] is True for c in fake.calls("createContact"))

    async def test_a_second_push_of_the_same_state_changes_nothing(self, brevo: tuple[FakeBrevo, LiveServer],
                                                                   client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        sync = adapter(brevo, client)
        first = state("a@example.com", lists={"1": "subscribed", "2": "unsubscribed"})
        [outcome] = await sync.push([first])
        again = ContactState(**{**_fields(first), "remote_ref": outcome.remote_ref})
        [second] = await sync.push([again])
        assert second.error is None and second.remote_ref == outcome.remote_ref
        assert len(fake.contacts) == 1 and fake.members(1) == {"a@example.com"} and fake.members(2) == set()

    async def test_unsubscribe_removes_from_the_list(self, brevo: tuple[FakeBrevo, LiveServer],
                                                     client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        sync = adapter(brevo, client)
        [outcome] = await sync.push([state("a@example.com")])
        await sync.push([state("a@example.com", lists={"1": "unsubscribed"}, remote_ref=outcome.remote_ref,
                               profile_changed=False)])
        assert fake.members(1) == set()
        assert len(fake.calls("createContact")) == 1  # memberships only: no profile write

    async def test_global_opt_out_is_email_blacklisted(self, brevo: tuple[FakeBrevo, LiveServer],
                                                       client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        sync = adapter(brevo, client)
        [outcome] = await sync.push([state("a@example.com", marketing_blocked=True)])
        assert fake.by_email("a@example.com").email_blacklisted is True
        await sync.push([state("a@example.com", remote_ref=outcome.remote_ref)])
        assert fake.by_email("a@example.com").email_blacklisted is False

    async def test_an_address_change_updates_the_same_contact_by_id(self, brevo: tuple[FakeBrevo, LiveServer],
                                                                   client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        sync = adapter(brevo, client)
        [outcome] = await sync.push([state("old@example.com")])
        [moved] = await sync.push([state("new@example.com", remote_ref=outcome.remote_ref,
                                         previous_email="old@example.com")])
        assert moved.error is None and moved.remote_ref == outcome.remote_ref
        assert fake.by_email("old@example.com") is None
        assert fake.by_email("new@example.com").id == int(outcome.remote_ref or 0)
        assert fake.members(1) == {"new@example.com"}
        [update] = fake.calls("updateContact")
        assert update.body["attributes"]["EMAIL"] == "new@example.com"

    async def test_a_known_contact_is_updated_by_id_so_a_new_address_renames_it(
        self, brevo: tuple[FakeBrevo, LiveServer], client: httpx.AsyncClient
    ) -> None:
        """The worker keeps no former address: a profile write by id carries EMAIL, whatever it was before."""
        fake, _ = brevo
        sync = adapter(brevo, client)
        [outcome] = await sync.push([state("old@example.com")])
        [same] = await sync.push([state("old@example.com", remote_ref=outcome.remote_ref, fields={"FIRSTNAME": "C"})])
        [moved] = await sync.push([state("new@example.com", remote_ref=outcome.remote_ref)])
        assert same.remote_ref == moved.remote_ref == outcome.remote_ref and moved.error is None
        assert fake.by_email("old@example.com") is None and fake.by_email("new@example.com").id == int(moved.remote_ref)
        assert len(fake.calls("createContact")) == 1 and len(fake.calls("updateContact")) == 2
        assert fake.members(1) == {"new@example.com"}

    async def test_a_new_address_brevo_already_has_takes_over_and_the_old_record_goes(
        self, brevo: tuple[FakeBrevo, LiveServer], client: httpx.AsyncClient
    ) -> None:
        fake, _ = brevo
        sync = adapter(brevo, client)
        [outcome] = await sync.push([state("old@example.com")])
        fake.put(RemoteContact(99, "new@example.com"))
        [moved] = await sync.push([state("new@example.com", remote_ref=outcome.remote_ref)])
        assert moved.error is None and moved.remote_ref == "99"
        # No second record of the person under the former address (Brevo has no archive: deleted).
        assert fake.deleted == ["old@example.com"] and set(fake.contacts) == {99}
        assert fake.members(1) == {"new@example.com"}

    async def test_an_existing_brevo_contact_gets_its_id_remembered(self, brevo: tuple[FakeBrevo, LiveServer],
                                                                    client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        fake.put(RemoteContact(41, "known@example.com"))
        [outcome] = await adapter(brevo, client).push([state("known@example.com")])
        assert outcome.remote_ref == "41"   # 204 from the upsert, then one lookup by email
        assert len(fake.calls("getContactInfo")) == 1

    async def test_double_opt_in_goes_through_brevo(self, brevo: tuple[FakeBrevo, LiveServer],
                                                    client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        s = state("a@example.com", lists={"3": "pending", "1": "pending"}, vendor_double_opt_in=frozenset({"3"}))
        [outcome] = await adapter(brevo, client).push([s])
        assert outcome.error is None
        [doi] = fake.calls("createDoiContact")
        assert doi.body["includeListIds"] == [3] and doi.body["templateId"] == 12
        assert doi.body["redirectionUrl"] == "https://shop.example/confirmed"
        assert fake.members(3) == set() and fake.members(1) == set()  # nobody is on a list before confirming
        fake.confirm_doi("a@example.com")
        assert fake.members(3) == {"a@example.com"}

    async def test_double_opt_in_mail_goes_once_not_at_every_profile_change(
        self, brevo: tuple[FakeBrevo, LiveServer], client: httpx.AsyncClient
    ) -> None:
        """Brevo's doubleOptinConfirmation sends the confirmation mail. It was called at every push of a person still
        pending, so each profile change before the click (a name, a stat after an order) mailed them again."""
        fake, _ = brevo
        sync = adapter(brevo, client)
        s = state("a@example.com", lists={"3": "pending"}, vendor_double_opt_in=frozenset({"3"}))
        [first] = await sync.push([s])
        assert first.error is None and len(fake.calls("createDoiContact")) == 1
        # Later pushes while still pending: the profile changed, the membership did not.
        changed = ContactState(**{**_fields(s), "remote_ref": first.remote_ref, "fields": {"FIRSTNAME": "Cléo"},
                                  "status_changed": frozenset()})
        [again] = await sync.push([changed])
        assert again.error is None and len(fake.calls("createDoiContact")) == 1
        assert fake.by_email("a@example.com").attributes["FIRSTNAME"] == "Cléo"  # type: ignore[union-attr]
        # Asked again (the list's status changed: pending anew), the mail goes again.
        [asked] = await sync.push([ContactState(**{**_fields(changed), "status_changed": frozenset({"3"})})])
        assert asked.error is None and len(fake.calls("createDoiContact")) == 2

    async def test_double_opt_in_without_a_template_is_a_contact_error(self, brevo: tuple[FakeBrevo, LiveServer],
                                                                       client: httpx.AsyncClient) -> None:
        s = state("a@example.com", lists={"3": "pending"}, vendor_double_opt_in=frozenset({"3"}))
        [outcome] = await adapter(brevo, client, doi_template_id=None).push([s])
        assert outcome.error is not None and "doi_template_id" in outcome.error

    async def test_a_list_add_for_a_contact_deleted_at_brevo_creates_it_anew(
        self, brevo: tuple[FakeBrevo, LiveServer], client: httpx.AsyncClient
    ) -> None:
        """A membership-only push (no profile write) for a contact deleted at Brevo since: the add answers 201 with
        the address in `failure` ("already in/out list and/or doesn't exist"), or a 400 when no address of the call
        changed anything. Both counted as done, and the subscriber never reached the list. Now the contact is
        written again (created anew, as a profile write's 404 is) and added."""
        fake, _ = brevo
        sync = adapter(brevo, client)
        [present] = _known_contacts(fake, 1, lists={"1": "subscribed"})
        gone = state("gone@example.com", remote_ref="77", profile_changed=False)       # deleted at Brevo
        alone = state("alone@example.com", remote_ref="78", profile_changed=False, lists={"2": "subscribed"})
        outcomes = await sync.push([present, gone, alone])
        assert [o.error for o in outcomes] == [None, None, None]
        assert fake.members(1) == {present.email, gone.email} and fake.members(2) == {alone.email}
        assert outcomes[1].remote_ref == str(fake.by_email(gone.email).id)   # the new record is remembered
        # Already on the list (a replay): still done, one record.
        [again] = await sync.push([ContactState(**{**_fields(gone), "remote_ref": outcomes[1].remote_ref})])
        assert again.error is None and again.remote_ref == outcomes[1].remote_ref
        assert fake.members(1) == {present.email, gone.email} and len(fake.contacts) == 3

    async def test_an_unknown_list_fails_only_its_contacts(self, brevo: tuple[FakeBrevo, LiveServer],
                                                           client: httpx.AsyncClient) -> None:
        good, bad = state("a@example.com"), state("b@example.com", lists={"99": "subscribed"})
        outcomes = await adapter(brevo, client).push([good, bad])
        assert outcomes[0].error is None
        assert outcomes[1].error == "Brevo list add: 404 document_not_found"
        assert "@" not in (outcomes[1].error or "")


class TestBatching:
    async def test_list_changes_go_150_per_call(self, brevo: tuple[FakeBrevo, LiveServer],
                                                client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        states = _known_contacts(fake, 400, lists={"1": "subscribed", "2": "unsubscribed"})
        for s in states[:10]:
            fake.contacts[int(s.remote_ref or 0)].list_ids.add(2)
        outcomes = await adapter(brevo, client).push(states)
        assert all(o.error is None for o in outcomes)
        assert sorted(len(c.body["emails"]) for c in fake.calls("addContactToList")) == [100, 150, 150]
        assert max(len(c.body["emails"]) for c in fake.seen if c.operation == "removeContactFromList") <= LIST_BATCH
        assert len(fake.members(1)) == 400 and fake.members(2) == set()
        assert fake.calls("createContact") == []


class TestRateLimit:
    async def test_drain_stays_under_10_per_second_and_uses_at_least_90_percent(
        self, brevo: tuple[FakeBrevo, LiveServer], client: httpx.AsyncClient
    ) -> None:
        fake, _ = brevo
        # 6,000 membership changes over 2 lists = 40 calls of 150; two adapters share the key (two workers).
        states = _known_contacts(fake, 3000, lists={"1": "subscribed", "2": "subscribed"})
        first, second = adapter(brevo, client), adapter(brevo, client)
        await net.run_all([first.push(states[:1500]), second.push(states[1500:])])
        assert len(fake.seen) == 40
        assert fake.over_limit == 0
        assert fake.max_per_second(fake.api_key) <= 10
        assert fake.rate(fake.api_key) >= 9.0, fake.rate(fake.api_key)
        assert len(fake.members(1)) == 3000 and len(fake.members(2)) == 3000

    async def test_a_429_pauses_the_key_and_is_retried_in_place(self, brevo: tuple[FakeBrevo, LiveServer],
                                                                 client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        fake.force(429, headers={"x-sib-ratelimit-limit": "10", "x-sib-ratelimit-remaining": "0",
                                 "x-sib-ratelimit-reset": "1"})
        started = time.monotonic()
        [outcome] = await adapter(brevo, client).push([state("a@example.com")])
        assert outcome.error is None and fake.members(1) == {"a@example.com"}
        assert time.monotonic() - started >= 1.0
        assert [s.status for s in fake.seen][:2] == [429, 201]

    async def test_a_long_reset_becomes_retry_later(self, brevo: tuple[FakeBrevo, LiveServer],
                                                    client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        fake.force(429, headers={"retry-after": "20", "x-sib-ratelimit-reset": "30"})
        with pytest.raises(RetryLater) as caught:  # (the 30 s pause stays with this test's own key)
            await adapter(brevo, client).push([state("a@example.com")])
        assert caught.value.after_seconds == 30

    async def test_the_fake_refuses_what_exceeds_10_per_second(self, brevo: tuple[FakeBrevo, LiveServer]) -> None:
        fake, live = brevo
        async with httpx.AsyncClient(base_url=live.url) as raw:
            answers = [await raw.get("/contacts/lists", headers={"api-key": fake.api_key}) for _ in range(15)]
        refused = [a for a in answers if a.status_code == 429]
        assert len(refused) == 5 and fake.over_limit == 5
        assert refused[0].headers["x-sib-ratelimit-remaining"] == "0"
        assert int(refused[0].headers["x-sib-ratelimit-reset"]) >= 1


class TestFailures:
    async def test_5xx_and_down_are_retryable(self, brevo: tuple[FakeBrevo, LiveServer],
                                              client: httpx.AsyncClient) -> None:
        fake, live = brevo
        fake.down = True
        with pytest.raises(DeliveryFailed) as caught:
            await adapter(brevo, client).push([state("a@example.com")])
        assert not caught.value.permanent
        fake.down = False
        live.stop()   # connection refused
        with pytest.raises(DeliveryFailed, match="network error") as refused:
            await adapter(brevo, client).push([state("a@example.com")])
        assert not refused.value.permanent
        live.start()
        [outcome] = await adapter(brevo, client).push([state("a@example.com")])
        assert outcome.error is None and fake.members(1) == {"a@example.com"}

    async def test_too_early_is_retried_not_a_dead_letter(self, brevo: tuple[FakeBrevo, LiveServer],
                                                          client: httpx.AsyncClient) -> None:
        """createContact and updateContact document 425 Too Early (the spec's responses): Brevo is not ready for the
        request yet. It was read as the contact's permanent error (a dead letter); it is retried, in place when it
        passes, else later with the batch."""
        fake, _ = brevo
        fake.force(425)
        [outcome] = await adapter(brevo, client).push([state("a@example.com")])
        assert outcome.error is None and fake.members(1) == {"a@example.com"}
        fake.force(425, count=3)
        with pytest.raises(DeliveryFailed) as caught:
            await adapter(brevo, client).push([state("b@example.com")])
        assert not caught.value.permanent

    async def test_a_bad_key_is_a_call_failure(self, brevo: tuple[FakeBrevo, LiveServer],
                                               client: httpx.AsyncClient) -> None:
        _, live = brevo
        sync = BrevoAdapter(BrevoConfig(api_key="xkeysib-wrong", base_url=live.url), client)
        with pytest.raises(DeliveryFailed, match="API key"):
            await sync.push([state("a@example.com")])

    async def test_a_trickling_answer_is_cut_at_the_deadline(self, brevo: tuple[FakeBrevo, LiveServer],
                                                             client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        fake.trickle = 0.3
        started = time.monotonic()
        with pytest.raises(DeliveryFailed, match="no complete answer"):
            await adapter(brevo, client, deadline_seconds=1.0).push([state("a@example.com")])
        assert time.monotonic() - started < 2.5


class TestErase:
    async def test_deletes_by_contact_id_and_a_second_time_is_done_too(self, brevo: tuple[FakeBrevo, LiveServer],
                                                                       client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        sync = adapter(brevo, client)
        s = state("a@example.com")
        [outcome] = await sync.push([s])
        erasure = Erasure(s.contact_id, outcome.remote_ref or "")
        assert [o.error for o in await sync.erase([erasure])] == [None]
        assert fake.contacts == {} and fake.deleted == ["a@example.com"]
        assert [o.error for o in await sync.erase([erasure])] == [None]   # 404: already gone
        assert all(c.path.startswith("/contacts/") for c in fake.seen if c.method == "DELETE")

    async def test_every_record_of_the_person_goes(self, brevo: tuple[FakeBrevo, LiveServer],
                                                   client: httpx.AsyncClient) -> None:
        fake, _ = brevo
        sync = adapter(brevo, client)
        pushed = [(s, (await sync.push([s]))[0]) for s in (state("a@example.com"), state("b@example.com"))]
        [(first, one), (_, two)] = pushed
        erasure = Erasure(first.contact_id, one.remote_ref or "", other_refs=(two.remote_ref or "", "12345"))
        # Three requests each; the first one always goes (however many records), the next only if it fits.
        assert sync.affordable([], [erasure, erasure], 0.25) == (1, 0)
        assert [o.error for o in await sync.erase([erasure])] == [None]   # 12345: never there (404), done
        assert fake.contacts == {} and sorted(fake.deleted) == ["a@example.com", "b@example.com"]


    async def test_an_erasure_of_commerce_records_only_asks_brevo_nothing(
        self, brevo: tuple[FakeBrevo, LiveServer], client: httpx.AsyncClient
    ) -> None:
        """No contact of the person is left at Brevo (its address is another contact's now), only orders sent under
        it: Brevo's API deletes no order nor event, and the other contact's record is not the person's to delete."""
        fake, _ = brevo
        sync = adapter(brevo, client)
        await sync.push([state("c@example.com")])
        erasure = Erasure(uuid.uuid4(), None, commerce=(("order", "O-1"),))
        assert erasure.refs == () and sync.affordable([], [erasure], 0.25) == (1, 0)
        assert [o.error for o in await sync.erase([erasure])] == [None]
        assert fake.deleted == [] and not [c for c in fake.seen if c.method == "DELETE"]
        assert fake.by_email("c@example.com") is not None

    async def test_a_record_that_cannot_be_deleted_does_not_keep_the_others(
        self, brevo: tuple[FakeBrevo, LiveServer], client: httpx.AsyncClient
    ) -> None:
        """One record of the person Carnet cannot delete (a stored reference in no id format, or a refusal) used to
        stop the erasure there: the records after it were never asked for, and each retry stopped at the same one."""
        fake, _ = brevo
        sync = adapter(brevo, client)
        [pushed] = await sync.push([state("b@example.com")])
        erasure = Erasure(uuid.uuid4(), "not-an-id", other_refs=(pushed.remote_ref or "",))
        [outcome] = await sync.erase([erasure])
        assert outcome.error == "Brevo delete: the stored reference is not a Brevo contact id"
        assert fake.contacts == {} and fake.deleted == ["b@example.com"]


class TestFakeBrevo:
    """The fake itself: requests that break the spec are caught, recorded and answered 400."""

    @pytest.mark.parametrize(("method", "path", "body", "headers", "expected"), [
        ("POST", "/contacts", {"email": "a@example.com", "updateEnable": True}, None, "updateEnable"),
        ("POST", "/contacts", {"email": "not-an-email"}, None, "email"),
        ("POST", "/contacts/lists/1/contacts/add", {"emails": [f"{i}@example.com" for i in range(151)]}, None,
         "more than 150 items"),
        ("POST", "/contacts/lists/x/contacts/add", {"emails": ["a@example.com"]}, None, "listId"),
        ("POST", "/contacts/doubleOptinConfirmation", {"email": "a@example.com", "includeListIds": [1]}, None,
         "templateId"),
        ("POST", "/contacts", {"email": "a@example.com"}, {"api-key": ""}, "credentials"),
        ("DELETE", "/contacts/1?identifierType=id", None, None, "identifierType"),
        ("PATCH", "/contacts/1", {}, None, "method not allowed"),
    ])
    async def test_a_wrong_request_is_a_violation(self, method: str, path: str, body: Any,
                                                  headers: dict[str, str] | None, expected: str) -> None:
        fake = FakeBrevo()
        with LiveServer(fake) as live:
            async with httpx.AsyncClient(base_url=live.url) as raw:
                response = await raw.request(method, path, json=body,
                                             headers=headers if headers is not None else {"api-key": fake.api_key})
        assert response.status_code == 400
        assert response.json()["code"] == "invalid_parameter"
        assert fake.violations and any(expected in v for v in fake.violations), fake.violations


def _fields(s: ContactState) -> dict[str, Any]:
    return {name: getattr(s, name) for name in ContactState.__slots__}


def _known_contacts(fake: FakeBrevo, n: int, *, lists: dict[str, Any]) -> list[ContactState]:
    """Contacts Brevo already has (seeded in the fake): a push of memberships only."""
    states = []
    for i in range(n):
        email = f"c{i}@example.com"
        remote = fake._create(email, {})
        states.append(state(email, lists=lists, remote_ref=str(remote.id), profile_changed=False))
    return states


class TestAffordable:
    """What fits in a lease at this process's rate (the worker hands the rest back untried)."""

    def test_profile_writes_cost_a_request_and_list_calls_are_shared(
        self, brevo: tuple[FakeBrevo, LiveServer], client: httpx.AsyncClient,
    ) -> None:
        sync = adapter(brevo, client, requests_per_second=10)   # 10 in any 1.05 s: 95 requests in 10 s
        first = [state(f"n{i}@example.com") for i in range(1500)]   # unknown: upsert + id lookup
        known = [state(f"k{i}@example.com", remote_ref=str(i + 1)) for i in range(1500)]
        lists_only = [state(f"m{i}@example.com", remote_ref=str(i + 1), profile_changed=False) for i in range(1500)]
        assert sync.affordable(first, [], 10.0) == (0, 47)        # 95 requests, 2 a contact (+ list calls)
        assert sync.affordable(known, [], 10.0) == (0, 94)        # 1 a contact, plus its share of list calls
        assert sync.affordable(lists_only, [], 10.0) == (0, 1500)  # 10 list calls of 150
        erasures = [Erasure(uuid.uuid4(), str(i)) for i in range(200)]
        assert sync.affordable(known, erasures, 10.0) == (95, 0)
        assert sync.affordable(first[:1], [], 0.01) == (0, 1)     # always progress
