"""app.ids: the import's ids as text are the same UUIDv7s as the API's."""

from __future__ import annotations

import time
import uuid

from app.ids import new_id, new_id_text


def test_an_id_as_text_is_a_uuid_v7_in_its_canonical_form_dated_now() -> None:
    before = time.time_ns() // 1_000_000
    texts = [new_id_text() for _ in range(10_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(texts)) == len(texts)
    for text in texts[:100]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # lowercase, dashes where str(UUID) puts them
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert before <= parsed.int >> 80 <= after
    assert texts[0][:8] <= texts[-1][:8]  # the milliseconds lead: later ids sort later
    assert (new_id().version, new_id().variant) == (7, uuid.RFC_4122)
