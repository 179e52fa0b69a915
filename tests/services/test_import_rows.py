"""Row validation of imports: the fast paths equal the API's normalizers, and a row is refused exactly when the
API would refuse the same values (hypothesis). Also the sniffing of files and the header guesses."""

from __future__ import annotations

import codecs
import csv
import io
import subprocess
import sys
import time
import tracemalloc
from datetime import date

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.schemas.contacts import ContactUpsert
from app.schemas.types import (
    email_by_validator,
    fast_email,
    fast_phone,
    phone_by_phonenumbers,
)
from app.services import suppressions
from app.services.imports import headers, rows, sniff
from app.services.imports.rows import STAGE_COLUMNS, Spec
from tests.csv_samples import build_csv, french_file

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
LOCAL = st.text(alphabet=ATEXT + ".é \"()@", min_size=0, max_size=70)
LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_é", min_size=0, max_size=65)
TLD = st.sampled_from(["com", "fr", "COM", "test", "local", "example", "c", "co", "xn--p1ai", "123", "museum",
                      "onion", "arpa", "invalid", "localhost", "a" * 64])
DOMAIN = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(LABEL, min_size=0, max_size=4), TLD)
EMAILS = st.one_of(st.builds(lambda local, domain: f"{local}@{domain}", LOCAL, DOMAIN), st.text(max_size=40))
SLOW = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _api_email(value: str) -> str | None:
    """The libraries' answer (the API and the import take the fast path first: this is its reference)."""
    try:
        return email_by_validator(value)
    except ValueError:
        return None


def _api_phone(value: str) -> str | None:
    try:
        return phone_by_phonenumbers(value)
    except ValueError:
        return None


class TestFastEmail:
    @SLOW
    @given(EMAILS)
    def test_accepts_only_what_email_validator_accepts_and_normalizes_alike(self, value: str) -> None:
        fast = fast_email(value)
        if fast is not None:
            assert _api_email(value) == fast

    @settings(max_examples=500, deadline=None)
    @given(st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,10})?@[a-z0-9]{1,20}\.(com|fr|org|net)", fullmatch=True))
    def test_takes_the_ordinary_addresses(self, value: str) -> None:
        assert fast_email(value) == _api_email(value) == value.lower()

    @pytest.mark.parametrize("value", ["a@b.test", "a@b.local", "a@xn--80ak6aa92e.com", "a--b@ab--cd.fr",
                                       "é@exemple.fr", "a..b@c.fr", "a@-b.fr", "a@b.c"])
    def test_leaves_the_rest_to_email_validator(self, value: str) -> None:
        assert fast_email(value) is None or fast_email(value) == _api_email(value)


PHONE_PREFIX = st.sampled_from(["0", "+33", "+33 ", "0033", "+33 0", "", "+", "00", "+32 ", "(0)", "+-33"])
PHONE_BODY = st.text(alphabet="0123456789 .-", min_size=0, max_size=16)


class TestFastPhone:
    @SLOW
    @given(st.builds(lambda p, b: p + b, PHONE_PREFIX, PHONE_BODY))
    def test_agrees_with_phonenumbers(self, value: str) -> None:
        try:
            fast = fast_phone(value)
        except ValueError:
            assert _api_phone(value) is None
            return
        if fast is not None:
            assert _api_phone(value) == fast

    @settings(max_examples=500, deadline=None)
    @given(st.from_regex(r"0[1-9]( ?[0-9]{2}){4}", fullmatch=True))
    def test_decides_french_national_numbers_itself(self, value: str) -> None:
        try:
            assert fast_phone(value) == _api_phone(value)
        except ValueError:
            assert _api_phone(value) is None


TEXTS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)


def _spec(*fields: str) -> Spec:
    return Spec(columns=tuple((i, f, f) for i, f in enumerate(fields)), attributes={}, digest_key=b"k" * 32,
                width=len(fields))


class TestSameRulesAsTheApi:
    @pytest.mark.parametrize("field", ["first_name", "gender", "address.postal_code", "language", "external_id",
                                       "address.country", "birth_date", "kind", "source"])
    @settings(max_examples=300, deadline=None)
    @given(value=st.one_of(TEXTS, st.dates().map(date.isoformat), st.dates().map(lambda d: d.strftime("%d/%m/%Y")),
                           st.sampled_from(["fr", "FR", "France", "prospect", "Client", "api", "0"])))
    def test_never_stores_what_the_api_refuses(self, field: str, value: str) -> None:
        """Text fields: refused exactly when the API refuses them. Converted fields (dd/mm/yyyy dates, country
        names, French kinds): whatever the import keeps, the API accepts and stores the same way."""
        assume(value.strip())
        out = rows.validate(_spec("email", field), [(2, ["a@exemple.fr", value])])
        column = {"address.postal_code": "postal_code", "address.country": "country"}.get(field, field)
        converted = field in ("address.country", "birth_date", "kind", "source")
        if out.records:
            stored = dict(zip(STAGE_COLUMNS, out.records[0], strict=True))[column]
            sent = stored.isoformat() if isinstance(stored, date) else stored
        else:
            sent = value
        body: dict[str, object] = {"email": "a@exemple.fr"}
        if field.startswith("address."):
            body["address"] = {field.removeprefix("address."): sent}
        else:
            body[field] = sent
        try:
            dumped = ContactUpsert.model_validate(body).model_dump(exclude_unset=True)
        except ValidationError:
            assert not out.records, (field, value)  # the import kept something the API refuses
            return
        if not out.records:
            assert converted, (field, value, out.rejects)  # plain text: refused although the API takes it
            return
        expected = dumped["address"][field.removeprefix("address.")] if field.startswith("address.") \
            else dumped[field]
        assert stored == (expected.value if hasattr(expected, "value") else expected)

    def test_french_dates_and_bounds(self) -> None:
        out = rows.validate(_spec("email", "birth_date"), [
            (2, ["a@exemple.fr", "05/11/1984"]), (3, ["b@exemple.fr", "1984-11-05"]),
            (4, ["c@exemple.fr", "31/02/1990"]),
            (5, ["d@exemple.fr", "01/01/1899"]), (6, ["e@exemple.fr", "01/01/2999"]),
        ])
        assert [r[STAGE_COLUMNS.index("birth_date")] for r in out.records] == [date(1984, 11, 5)] * 2
        assert [r[0] for r in out.rejects] == [4, 5, 6]

    def test_attributes_are_typed_by_their_definition(self) -> None:
        spec = Spec(columns=((0, "email", "E"), (1, "attributes.points", "P"), (2, "attributes.vip", "V"),
                             (3, "attributes.size", "S"), (4, "attributes.topics", "T"), (5, "attributes.since", "D")),
                    attributes={"points": ("number", ()), "vip": ("boolean", ()), "size": ("enum", ("S", "M")),
                                "topics": ("multi_enum", ("bio", "vin")), "since": ("date", ())},
                    digest_key=b"k", width=6)
        out = rows.validate(spec, [(2, ["a@x.fr", "12,5", "oui", "m", "vin, bio", "05/11/2020"]),
                                   (3, ["b@x.fr", "douze", "peut-être", "XXL", "bière", "hier"])])
        assert out.records[0][STAGE_COLUMNS.index("attributes")] == (
            '{"points": 12.5, "vip": true, "size": "M", "topics": ["vin", "bio"], "since": "2020-11-05"}')
        assert [c for _r, c, _reason, _v in out.rejects] == ["P", "V", "S", "T", "D"]
        assert out.rejected_rows == 1

    def test_digests_are_the_suppression_lists(self) -> None:
        suppressions.configure("s" * 40)
        assert suppressions._key is not None
        spec = Spec(columns=((0, "email", "E"), (1, "phone", "T")), attributes={}, digest_key=suppressions._key,
                    width=2)
        record = dict(zip(STAGE_COLUMNS, rows.validate(spec, [(2, ["A@X.fr", "06 12 34 56 78"])]).records[0],
                          strict=True))
        assert record["email_digest"] == suppressions.digest("email", "a@x.fr")
        assert record["phone_digest"] == suppressions.digest("phone", "+33612345678")


class TestSniffing:
    def test_encodings(self) -> None:
        for data, expected in [("é;à\n".encode("cp1252"), "cp1252"), ("é;à\n".encode(), "utf-8"),
                               (codecs.BOM_UTF8 + "é\n".encode(), "utf-8-sig"), (b"plain ascii\n", "utf-8")]:
            check = sniff.EncodingCheck()
            for i in range(len(data)):  # fed byte by byte: multi-byte characters split across chunks
                check.feed(data[i:i + 1])
            assert check.result() == expected

    @pytest.mark.parametrize("delimiter", [";", ",", "\t"])
    def test_delimiters(self, delimiter: str) -> None:
        text = build_csv(["Nom", "Prénom", "Ville, pays"], [["a", "b, c", "d"], ["e", "f", "g"]],
                         delimiter=delimiter, encoding="utf-8").decode()
        assert sniff.detect_delimiter(text) == delimiter
        assert sniff.read_header(text, delimiter) == ["Nom", "Prénom", "Ville, pays"]

    @settings(max_examples=50, deadline=None)
    @given(st.integers(min_value=1, max_value=5000))
    def test_records_do_not_depend_on_chunk_boundaries(self, size: int) -> None:
        data = french_file(60).data
        whole = sniff.RecordReader("cp1252", ";")
        expected = whole.feed(data) + whole.close()
        reader = sniff.RecordReader("cp1252", ";")
        got: list[list[str]] = []
        for i in range(0, len(data), size):
            got += reader.feed(data[i:i + size])
        assert got + reader.close() == expected
        assert len(expected) == 61 + 6 and expected[4][4] == "12 rue de l'Église\r\nBâtiment B"


    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(["a", "é", ";", ",", " ", "\t", "\r\n", "\n", "\x00"]), max_size=80).map("".join),
           st.sampled_from([";", ",", "\t"]))
    def test_lines_without_quotes_are_what_the_csv_module_reads(self, text: str, delimiter: str) -> None:
        reader = sniff.RecordReader("utf-8", delimiter)  # such lines skip the csv module: same records
        got = reader.feed(text.encode()) + reader.close()
        assert got == list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=False))


class TestHeaders:
    def test_french_and_english_names_fold_accents_and_case(self) -> None:
        guessed = headers.guess(["NOM", "Prénom", "E-mail", "Courriel", "Téléphone", "Portable", "Code Postal",
                                 "Ville", "Société", "Date de naissance", "Pays", "Taille vêtement", "Divers"],
                                ["taille_vetement"])
        assert guessed == {0: "last_name", 1: "first_name", 2: "email", 4: "phone", 6: "address.postal_code",
                           7: "address.city", 8: "company", 9: "birth_date", 10: "address.country",
                           11: "attributes.taille_vetement"}
        assert headers.guess(["Email Address", "First Name", "Zip", "Mobile"], []) == {
            0: "email", 1: "first_name", 2: "address.postal_code", 3: "phone"}

    def test_a_file_needs_a_key_column(self) -> None:
        with pytest.raises(headers.MappingProblem) as problem:
            headers.resolve(["Nom", "Ville"], None, [])
        assert problem.value.field == "file"


def test_the_validating_process_imports_no_web_or_database_stack() -> None:
    """Each validating process imports app.services.imports.rows (spawned, nothing inherited): importing the app's
    models, FastAPI and the database drivers there was ~85 MB of its ~120 MB, and the import's RSS bar is 300 MB."""
    heavy = "{'fastapi', 'starlette', 'sqlalchemy', 'sqlmodel', 'asyncpg', 'structlog', 'rich', 'jose'}"
    script = ("import sys, app.services.imports.rows; "
              f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy} or m.startswith('app.models')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,  # noqa: S603
                          check=True)
    assert done.stdout.strip() == "[]"


class TestUnreadable:
    """Bad bytes end as one rejected row each, with a reason; a reject value never holds a NUL (PostgreSQL text)."""

    def test_a_nul_is_rejected_and_shown_escaped(self) -> None:
        out = rows.validate(_spec("email", "last_name"), [(3, ["q5@example.com", "a\x00b"])])
        assert out.rejected_rows == 1
        assert out.rejects == [(3, "last_name", "control characters (such as NUL) are not allowed", "a\\0b")]

    def test_an_unreadable_record_is_a_rejected_row(self) -> None:
        reader = sniff.RecordReader("utf-8", ",")
        records = reader.feed(b'a@x.fr,"' + b"x" * (130 * 1024) + b'"\nb@x.fr,ok\n') + reader.close()
        assert records[1] == ["b@x.fr", "ok"]
        out = rows.validate(_spec("email", "last_name"), [(2, records[0]), (3, records[1])])
        assert out.rejects == [(2, None, "unreadable row: a quoted cell is longer than 131072 characters", None)]
        assert len(out.records) == 1

    @pytest.mark.parametrize("size", [1000, 64 * 1024, 2**20, 10 * 2**20])
    def test_an_overlong_record_is_one_unreadable_row_and_reading_resumes(self, size: int) -> None:
        limit = sniff.RecordReader.MAX_RECORD_CHARS
        data = (b"Email,Nom\r\n" + b"a@x.fr," + b"y" * limit + b"\r\n"            # one line too long
                + b'b@x.fr,"' + b"w" * limit + b'\nmore",tail\r\n'                # a quoted record too long
                + b"c@x.fr," + b"v" * (limit - 9) + b"\r\n"                       # at the limit exactly: read
                + b"d@x.fr,fine\r\n" + b"z" * (limit + 1))                        # too long, at the end
        reader = sniff.RecordReader("utf-8", ",")
        got: list[list[str]] = []
        for i in range(0, len(data), size):
            got += reader.feed(data[i:i + size])
        got += reader.close()
        assert [type(r).__name__ for r in got] == ["list", "Unreadable", "Unreadable", "list", "list", "Unreadable"]
        assert got[1].reason == f"unreadable row: longer than {limit} characters"  # type: ignore[attr-defined]
        assert got[3][0] == "c@x.fr" and len(got[3][1]) == limit - 9
        assert got[4] == ["d@x.fr", "fine"]

    def test_reading_a_huge_line_is_linear_and_bounded(self) -> None:
        reader = sniff.RecordReader("utf-8", ",")
        chunk = b"y" * 2**20
        tracemalloc.start()
        try:
            reader.feed(b"Email,Nom\na@x.fr,")
            started = time.perf_counter()
            for _ in range(64):  # 64 MiB without a newline
                assert reader.feed(chunk) == []
            elapsed = time.perf_counter() - started
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 * 2**20, peak
        assert elapsed < 5, elapsed
        assert len(reader.close()) == 1

    def test_a_record_is_cut_to_the_header_width_and_a_value_past_it_makes_it_unreadable(self) -> None:
        """Blank cells past the header are dropped, quoted or not; a value past it refuses the row at once (as
        validation would) instead of keeping every cell of it until its batch is written."""
        reader = sniff.RecordReader("utf-8", ";", width=2)
        data = b'a@x.fr;A;;\xc2\xa0;\nb@x.fr;B;;x\n"c@x.fr";"C\nD";;" "\n"d@x.fr";D;"x"\n' + b"e;" * 1000 + b"\n"
        got = reader.feed(data) + reader.close()
        assert got[0] == ["a@x.fr", "A"] and got[2] == ["c@x.fr", "C\nD"]
        assert [type(r).__name__ for r in got] == ["list", "Unreadable", "list", "Unreadable", "Unreadable"]
        assert got[1].reason == "the row has 4 cells, the header 2"  # type: ignore[attr-defined]
        assert got[4].reason == "the row has 1001 cells, the header 2"  # type: ignore[attr-defined]
