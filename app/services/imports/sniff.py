"""What a spreadsheet export looks like: encoding (UTF-8 with or without BOM, else Windows-1252) and delimiter."""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterable

__all__ = ["BOM", "DELIMITERS", "WHITESPACE", "EncodingCheck", "RecordReader", "Unreadable", "detect_delimiter",
           "read_header"]

BOM = codecs.BOM_UTF8
DELIMITERS = (";", ",", "\t")
_SAMPLE_RECORDS = 20
# What pydantic's str_strip_whitespace trims (Unicode White_Space); Python's str.strip() also eats \x1c-\x1f,
# control characters the API refuses. A cell of only these is blank.
WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
              + "\u2028\u2029\u202f\u205f\u3000")


class EncodingCheck:
    """Fed the whole upload chunk by chunk: is it valid UTF-8 (then `utf-8` / `utf-8-sig`), else `cp1252`.

    Excel writes either UTF-8 (with a BOM when asked for "CSV UTF-8") or the Windows ANSI code page.
    Valid UTF-8 is almost never an accident in a Windows-1252 file, so "decodes as UTF-8" decides.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._first = b""
        self.utf8 = True

    def feed(self, data: bytes) -> None:
        if len(self._first) < 3:
            self._first += data[: 3 - len(self._first)]
        if self.utf8:
            try:
                self._decoder.decode(data)
            except UnicodeDecodeError:
                self.utf8 = False

    def result(self) -> str:
        if self.utf8:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self.utf8 = False
        if not self.utf8:
            return "cp1252"
        return "utf-8-sig" if self._first.startswith(BOM) else "utf-8"


def _cp1252_lenient(error: UnicodeError) -> tuple[str, int]:
    # The five bytes Windows-1252 leaves undefined decode as their Latin-1 code points (C1 controls),
    # which row validation then refuses like any control character.
    assert isinstance(error, UnicodeDecodeError)
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error("carnet-cp1252", _cp1252_lenient)


def detect_delimiter(sample: str) -> str:
    """The delimiter giving the most columns with a consistent count over the first records."""
    best, best_score = ";", (-1, -1)
    for delimiter in DELIMITERS:
        try:
            records = [r for r in _records(sample, delimiter) if any(cell.strip() for cell in r)]
        except csv.Error:
            continue
        if not records:
            continue
        width = len(records[0])
        consistent = sum(1 for r in records if len(r) == width)
        score = (1 if width > 1 and consistent * 10 >= len(records) * 8 else 0, width)
        if score > best_score:
            best, best_score = delimiter, score
    return best


def read_header(sample: str, delimiter: str) -> list[str]:
    """The first non-empty record: the column names, trimmed."""
    for record in _records(sample, delimiter):
        if any(cell.strip() for cell in record):
            return [cell.strip() for cell in record]
    return []


def _records(sample: str, delimiter: str) -> list[list[str]]:
    # The sample may end mid-record: only complete lines are parsed.
    cut = sample.rfind("\n")
    text = sample[: cut + 1] if cut >= 0 else sample
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=False)
    out = []
    for record in reader:
        out.append(record)
        if len(out) >= _SAMPLE_RECORDS:
            break
    return out


class Unreadable(list[str]):
    """A record the reader cannot hand out as cells (too long, or not CSV): one row, rejected with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def __reduce__(self) -> tuple[type[Unreadable], tuple[str]]:  # crosses to the validating process pickled
        return Unreadable, (self.reason,)


class RecordReader:
    """Turns byte chunks into CSV records, one chunk at a time (never the whole file in memory).

    Lines are grouped into records by quote parity (a quoted cell may hold newlines; quotes inside it are
    doubled), then parsed by the csv module. A group that never closes its quote is cut after
    `MAX_RECORD_LINES` lines so a stray quote cannot swallow the rest of the file. A record longer than
    `MAX_RECORD_CHARS` (line endings included) is not kept: its text is dropped as it arrives (only its quotes
    are counted, to find where it ends), and it comes out as one `Unreadable` record; reading resumes after it.
    So memory stays bounded and every byte is looked at a constant number of times, whatever the file holds.
    A quoted cell longer than the csv module's limit (`CSV_FIELD_LIMIT`) makes its record `Unreadable` too.
    Given the header's `width`, a record is cut to it: blank cells past it are dropped, and a record with a value
    past it is `Unreadable` (the row would be refused anyway): a 1 MiB line of `a;a;a;…` would otherwise be held
    as 500,000 cells (~18 MB each) until its batch is written.
    """

    MAX_RECORD_LINES = 200
    MAX_RECORD_CHARS = 1024 * 1024
    CSV_FIELD_LIMIT = csv.field_size_limit()

    def __init__(self, encoding: str, delimiter: str, width: int | None = None) -> None:
        errors = "carnet-cp1252" if encoding == "cp1252" else "strict"
        self._decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
        self._delimiter = delimiter
        self._width = width
        self._tail: list[str] = []   # pieces of an incomplete line (joined once the line ends: linear)
        self._tail_size = 0
        self._group: list[str] = []  # lines of a record whose quotes are still open
        self._group_size = 0
        self._group_lines = 0        # lines of the open record (kept or dropped)
        self._quotes = 0
        self._dropping = False       # the open record went over MAX_RECORD_CHARS: its text is not kept

    def feed(self, chunk: bytes) -> list[list[str]]:
        return self._take(self._decoder.decode(chunk))

    def close(self) -> list[list[str]]:
        records = self._take(self._decoder.decode(b"", final=True))
        if self._tail or self._dropping:  # the last line has no line ending
            records += self._parse([self._end_tail("", "")])
        if self._group:
            records += self._flush()
        if self._dropping:
            records.append(self._dropped())
        return records

    def _take(self, text: str) -> list[list[str]]:
        if not text:
            return []
        lines = text.split("\n")
        rest = lines.pop()
        records: list[list[str]] = []
        if lines and (self._tail or self._dropping):
            records = self._parse([self._end_tail(lines[0], "\n")])
            del lines[0]
        if lines:
            records += self._parse([line + "\n" for line in lines])
        if rest:
            if self._dropping:
                self._quotes += rest.count('"')
            else:
                self._tail.append(rest)
                self._tail_size += len(rest)
                if self._tail_size + self._group_size > self.MAX_RECORD_CHARS:
                    self._drop()
        return records

    def _end_tail(self, last: str, ending: str) -> str:
        """The line the tail pieces, `last` and `ending` make (only `ending` while dropping: the line's text
        does not matter then, its quotes do)."""
        if not self._dropping and self._tail_size + len(last) + len(ending) + self._group_size > self.MAX_RECORD_CHARS:
            self._tail.append(last)
            self._drop()
            return ending
        if self._dropping:
            self._quotes += last.count('"')
            return ending
        line = "".join(self._tail) + last + ending
        self._tail, self._tail_size = [], 0
        return line

    def _drop(self) -> None:
        """The open record is too long: forget its text, keep counting its quotes."""
        self._quotes += sum(piece.count('"') for piece in self._tail)
        self._tail, self._tail_size = [], 0
        self._group, self._group_size = [], 0
        self._dropping = True

    def _dropped(self) -> Unreadable:
        self._dropping, self._quotes, self._group_lines = False, 0, 0
        return Unreadable(f"unreadable row: longer than {self.MAX_RECORD_CHARS} characters")

    def _parse(self, lines: Iterable[str]) -> list[list[str]]:
        records: list[list[str]] = []
        delimiter, limit = self._delimiter, self.MAX_RECORD_CHARS
        for line in lines:
            if not self._group and not self._dropping and '"' not in line:
                # Most lines: no quote, so the csv module would only split them (~5x faster than a reader each).
                if len(line) > limit:
                    records.append(Unreadable(f"unreadable row: longer than {limit} characters"))
                    continue
                body = line[:-2] if line.endswith("\r\n") else line.removesuffix("\n")
                if "\r" not in body:
                    records.append(self._fit(body.split(delimiter)) if body else [])
                    continue
            self._group_lines += 1
            self._quotes += line.count('"')
            if not self._dropping:
                self._group.append(line)
                self._group_size += len(line)
                if self._group_size > self.MAX_RECORD_CHARS:
                    self._drop()
            if self._quotes % 2 == 0 or self._group_lines >= self.MAX_RECORD_LINES:
                if self._dropping:
                    records.append(self._dropped())
                else:
                    records += self._flush()
        return records

    def _flush(self) -> list[list[str]]:
        group = self._group
        self._group, self._group_size, self._group_lines, self._quotes = [], 0, 0, 0
        try:
            return [self._fit(record) for record in csv.reader(group, delimiter=self._delimiter, strict=False)]
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                return [Unreadable(f"unreadable row: a quoted cell is longer than {self.CSV_FIELD_LIMIT} characters")]
            if "new-line character seen in unquoted field" in str(exc):
                return [Unreadable("unreadable row: a line break (CR) inside a cell that is not quoted")]
            return [Unreadable(f"unreadable row: not valid CSV ({exc})")]

    def _fit(self, record: list[str]) -> list[str]:
        """The record cut to the header's width (see the class docstring)."""
        width = self._width
        if width is None or len(record) <= width:
            return record
        if any(cell.strip(WHITESPACE) for cell in record[width:]):
            return Unreadable(f"the row has {len(record)} cells, the header {width}")
        return record[:width]
