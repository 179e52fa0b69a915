"""Real-world CSV files, generated: what Excel (French or English), shop back offices and CRMs export."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["FRENCH_HEADER", "Sample", "build_csv", "french_file", "plain_file"]

FRENCH_HEADER = ["Nom", "Prénom", "E-mail", "Téléphone", "Adresse", "Code postal", "Ville", "Société",
                 "Date de naissance", "Pays", "Taille"]


def build_csv(
    header: Sequence[str], rows: Iterable[Sequence[object]], *, delimiter: str = ";", encoding: str = "cp1252",
    bom: bool = False, newline: str = "\r\n",
) -> bytes:
    """A file as a spreadsheet writes it: minimal quoting, CRLF, the given code page."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator=newline, quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    data = out.getvalue().encode(encoding)
    return (b"\xef\xbb\xbf" + data) if bom else data


@dataclass
class Sample:
    data: bytes
    rows: int                                   # data rows
    good: list[int] = field(default_factory=list)  # row numbers expected imported
    bad: dict[int, str] = field(default_factory=dict)  # row number → expected reason (substring)
    duplicates: dict[int, int] = field(default_factory=dict)  # row number → row it duplicates
    suppressed: list[str] = field(default_factory=list)  # emails to put on the suppression list first
    suppressed_rows: list[int] = field(default_factory=list)


def french_file(n: int = 200, *, encoding: str = "cp1252", bom: bool = False, delimiter: str = ";") -> Sample:
    """Excel-French: `;`, Windows-1252, accents, dd/mm/yyyy, a multi-line address, 5% bad rows of every kind,
    duplicates inside the file and people who were erased."""
    rows: list[list[object]] = []
    sample = Sample(b"", 0)
    bad_kinds = [
        ("email", "pas-un-email", "not a valid email"),
        ("phone", "12", "phone"),
        ("birth", "31/02/1990", "not a date"),
        ("size", "XXL", "options"),
        ("nokey", None, "no email and no external_id"),
        ("long", "S" * 300, "at most 255 characters"),
        ("email", "jean@@exemple.fr", "not a valid email"),
        ("phone", "06 12", "phone"),
        ("birth", "12/12/1850", "between 1900-01-01 and today"),
        ("size", "géant", "options"),
    ]
    bad_at = {i * (n // len(bad_kinds)) + 7: kind for i, kind in enumerate(bad_kinds)}  # 5% of 200
    for i in range(n):
        row_number = i + 2
        email = f"Client.{i}@Exemple.fr"
        row: list[object] = [
            f"Lefèvre{i}", "Hélène" if i % 2 else "François", email, f"06 12 34 {i // 100 % 100:02d} {i % 100:02d}",
            "12 rue de l'Église\r\nBâtiment B" if i == 3 else f"{i} avenue Jean Jaurès", f"{25000 + i:05d}",
            "Besançon", "Café des Arts" if i % 3 == 0 else "", f"{(i % 28) + 1:02d}/0{(i % 9) + 1}/19{60 + i % 40}",
            "France", ["S", "M", "L"][i % 3],
        ]
        if i in bad_at:
            kind, value, reason = bad_at[i]
            if kind == "email":
                row[2] = value
            elif kind == "phone":
                row[3] = value
            elif kind == "birth":
                row[8] = value
            elif kind == "size":
                row[10] = value
            elif kind == "nokey":
                row[2] = ""
            elif kind == "long":
                row[7] = value
            sample.bad[row_number] = reason
        else:
            sample.good.append(row_number)
        rows.append(row)
    # duplicates inside the file (another casing is the same address once normalized)
    for original in (10, 11, 50):
        dup = list(rows[original])
        dup[2] = str(dup[2]).upper() if original == 10 else dup[2]
        dup[0] = "Doublon"
        rows.append(dup)
        sample.duplicates[len(rows) + 1] = original + 2
    # people who were erased: their rows are skipped
    for k in range(3):
        email = f"efface.{k}@exemple.fr"
        rows.append(["Effacé", "Paul", email, "", "", "", "", "", "", "FR", "M"])
        sample.suppressed.append(email)
        sample.suppressed_rows.append(len(rows) + 1)
    sample.rows = len(rows)
    sample.data = build_csv(FRENCH_HEADER, rows, delimiter=delimiter, encoding=encoding, bom=bom)
    return sample


def plain_file(n: int, *, start: int = 0, phone: bool = True) -> bytes:
    """An English UTF-8 export with commas: email, names, phone, city, customer id."""
    header = ["Email", "First name", "Last name", "Phone", "City", "Customer ID"]
    rows = (
        [f"user{i}@shop.example.com", f"First{i}", f"Last{i}", f"+33 6 {i // 10**6 % 100:02d} {i // 10**4 % 100:02d} "
         f"{i // 100 % 100:02d} {i % 100:02d}" if phone else "", "Lyon" if i % 2 else "Paris", f"C{i:07d}"]
        for i in range(start, start + n)
    )
    return build_csv(header, rows, delimiter=",", encoding="utf-8")
