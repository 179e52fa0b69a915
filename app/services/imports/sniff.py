"""What a spreadsheet export looks like: encoding (UTF-8 with or without BOM, else Windows-1252) and delimiter."""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterable, Iterator

__all__ = ["BOM", "DELIMITERS", "EncodingCheck", "decode_lines", "detect_delimiter", "read_header"]

BOM = codecs.BOM_UTF8
DELIMITERS = (";", ",", "\t")
_SAMPLE_RECORDS = 20


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


def decode_lines(chunks: Iterable[bytes], encoding: str) -> Iterator[str]:
    """Physical lines (with their ending) of a file given in byte chunks; what csv.reader expects."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="carnet-cp1252" if encoding == "cp1252" else "strict")
    pending = ""
    for chunk in chunks:
        text = pending + decoder.decode(chunk)
        lines = text.split("\n")
        pending = lines.pop()
        for line in lines:
            yield line + "\n"
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


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


class RecordReader:
    """Turns byte chunks into CSV records, one chunk at a time (never the whole file in memory).

    Lines are grouped into records by quote parity (a quoted cell may hold newlines; quotes inside it are
    doubled), then parsed by the csv module. A group that never closes its quote is cut after
    `MAX_RECORD_LINES` lines so a stray quote cannot swallow the rest of the file.
    """

    MAX_RECORD_LINES = 200

    def __init__(self, encoding: str, delimiter: str) -> None:
        errors = "carnet-cp1252" if encoding == "cp1252" else "strict"
        self._decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
        self._delimiter = delimiter
        self._pending = ""           # an incomplete line
        self._group: list[str] = []  # lines of a record whose quotes are still open
        self._quotes = 0

    def feed(self, chunk: bytes) -> list[list[str]]:
        text = self._pending + self._decoder.decode(chunk)
        lines = text.split("\n")
        self._pending = lines.pop()
        return self._parse(line + "\n" for line in lines)

    def close(self) -> list[list[str]]:
        tail = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        records = self._parse([tail] if tail else [])
        if self._group:
            records += self._flush()
        return records

    def _parse(self, lines: Iterable[str]) -> list[list[str]]:
        records: list[list[str]] = []
        for line in lines:
            if not self._group and '"' not in line:
                # Most lines: no quote, so the csv module would only split them (~5x faster than a reader each).
                body = line[:-2] if line.endswith("\r\n") else line.removesuffix("\n")
                if "\r" not in body:
                    records.append(body.split(self._delimiter) if body else [])
                    continue
            self._group.append(line)
            self._quotes += line.count('"')
            if self._quotes % 2 == 0 or len(self._group) >= self.MAX_RECORD_LINES:
                records += self._flush()
        return records

    def _flush(self) -> list[list[str]]:
        group, self._group, self._quotes = self._group, [], 0
        try:
            return list(csv.reader(group, delimiter=self._delimiter, strict=False))
        except csv.Error:
            return [["\x00unparsable"]]  # refused by validation as a control character
