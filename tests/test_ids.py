"""app.ids: the import's ids as text are the same UUIDv7s as the API's; its digests the suppression list's."""

from __future__ import annotations

import time
import uuid

from app.ids import keyed_digest, keyed_digester, new_id, new_id_texts


def test_an_id_as_text_is_a_uuid_v7_in_its_canonical_form_dated_now() -> None:
    before = time.time_ns() // 1_000_000
    texts = new_id_texts(10_000)
    after = time.time_ns() // 1_000_000
    assert len(set(texts)) == len(texts)
    for text in texts[:100]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # lowercase, dashes where str(UUID) puts them
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert before <= parsed.int >> 80 <= after
    assert texts[0][:8] <= texts[-1][:8]  # the milliseconds lead: later ids sort later
    assert (new_id().version, new_id().variant) == (7, uuid.RFC_4122)


def test_a_digester_digests_as_keyed_digest_does() -> None:
    key = b"\x00\xffk" * 30  # longer than SHA-256's block: HMAC hashes it first
    digest = keyed_digester(key)
    for kind, value in [("email", "léa.martin@exemple.fr"), ("phone", "+33612345678"), ("email", "")]:
        assert digest(kind, value) == keyed_digest(key, kind, value)
    assert keyed_digester(b"k")("email", "a@b.fr") == keyed_digest(b"k", "email", "a@b.fr")


def test_ids_made_in_bulk_increase_in_the_order_given() -> None:
    texts = new_id_texts(10_000)
    assert texts == sorted(texts) and len(set(texts)) == len(texts)  # UUID text order is the uuid type's order
