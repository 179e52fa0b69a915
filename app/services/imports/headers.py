"""Column → field mapping: guessed from English and French headers (accents and case ignored), or given.

Fields are named as on the wire: `email`, `address.city`, `attributes.<name>`. A header that matches no
known name but equals a custom attribute's name (once accents, case and punctuation are folded) maps to
that attribute.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping

__all__ = ["FIELDS", "KEY_FIELDS", "MappingProblem", "fold", "guess", "resolve"]

# Every field an import may set (contact fields a client may write through the API, except tags/attributes).
FIELDS = (
    "external_id", "email", "phone", "first_name", "last_name", "company", "job_title", "sector", "gender",
    "birth_date", "address.line1", "address.line2", "address.postal_code", "address.city", "address.region",
    "address.country", "language", "source", "kind", "first_contact_channel",
)
KEY_FIELDS = ("email", "external_id")  # what a row is matched by; a file needs at least one of them

_SYNONYMS: dict[str, tuple[str, ...]] = {
    "email": ("email", "e mail", "mail", "courriel", "adresse email", "adresse e mail", "adresse mail",
              "adresse courriel", "email address", "e mail address", "mail address"),
    "phone": ("telephone", "tel", "phone", "phone number", "numero de telephone", "num tel", "portable", "mobile",
              "tel portable", "telephone portable", "telephone mobile", "cell", "cellphone", "mobile phone", "gsm",
              "numero de portable"),
    "first_name": ("prenom", "first name", "firstname", "given name", "forename"),
    "last_name": ("nom", "nom de famille", "last name", "lastname", "surname", "family name"),
    "company": ("societe", "entreprise", "company", "company name", "organisation", "organization",
                "raison sociale"),
    "job_title": ("fonction", "poste", "job title", "job", "position"),
    "sector": ("secteur", "secteur d activite", "sector", "industry"),
    "gender": ("civilite", "genre", "sexe", "gender", "salutation"),
    "birth_date": ("date de naissance", "naissance", "date naissance", "birth date", "birthdate", "date of birth",
                   "dob", "birthday"),
    "address.line1": ("adresse", "adresse 1", "adresse ligne 1", "rue", "address", "address 1", "address line 1",
                      "street", "adresse postale"),
    "address.line2": ("adresse 2", "complement d adresse", "complement adresse", "adresse ligne 2", "address 2",
                      "address line 2"),
    "address.postal_code": ("code postal", "cp", "postal code", "zip", "zip code", "postcode"),
    "address.city": ("ville", "commune", "localite", "city", "town"),
    "address.region": ("region", "departement", "state", "province"),
    "address.country": ("pays", "country", "country code", "code pays"),
    "language": ("langue", "language", "lang"),
    "external_id": ("id client", "identifiant", "identifiant client", "numero client", "n client", "no client",
                    "code client", "ref client", "reference client", "customer id", "external id", "client id"),
    "kind": ("type", "type de contact", "kind", "contact type"),
    "source": ("source", "origine"),
    "first_contact_channel": ("canal", "canal d acquisition", "channel", "first contact channel"),
}
_BY_NAME = {name: field for field, names in _SYNONYMS.items() for name in names}


class MappingProblem(ValueError):
    """A mapping that cannot work; `field` names the request field to blame (for a 422)."""

    def __init__(self, message: str, *, field: str = "mapping", code: str = "invalid_mapping") -> None:
        super().__init__(message)
        self.field = field
        self.code = code


def fold(text: str) -> str:
    """`Prénom ` → `prenom`, `E-mail` → `e mail`, `Code_Postal` → `code postal`."""
    stripped = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^a-z0-9]+", " ", stripped.lower()).split())


def guess(header: list[str], attribute_names: Iterable[str]) -> dict[int, str]:
    """{column index: field} from the headers; the first column claiming a field wins."""
    attributes = {name.replace("_", " "): name for name in attribute_names}
    mapping: dict[int, str] = {}
    taken: set[str] = set()
    for index, name in enumerate(header):
        folded = fold(name)
        field = _BY_NAME.get(folded)
        if field is None and folded in attributes:
            field = f"attributes.{attributes[folded]}"
        if field is not None and field not in taken:
            mapping[index] = field
            taken.add(field)
    return mapping


def resolve(
    header: list[str], given: Mapping[str, str | None] | None, attribute_names: Iterable[str]
) -> dict[int, str]:
    """The mapping to use: `given` ({column name: field or null to ignore}) exactly, else the guess."""
    names = set(attribute_names)
    if given is None:
        mapping = guess(header, names)
    else:
        folded_columns: dict[str, int] = {}
        for index, name in enumerate(header):
            folded_columns.setdefault(fold(name), index)
        mapping = {}
        for column, field in given.items():
            index = header.index(column) if column in header else folded_columns.get(fold(column))
            if index is None:
                raise MappingProblem(f"no column named {column!r} in the file's header", field=f"mapping.{column}")
            if field is None or field == "":
                continue
            if not _known(field, names):
                raise MappingProblem(
                    f"unknown field {field!r}: one of {', '.join(FIELDS)} or attributes.<defined attribute>",
                    field=f"mapping.{column}")
            if field in mapping.values():
                raise MappingProblem(f"two columns are mapped to {field!r}", field=f"mapping.{column}")
            mapping[index] = field
    if not any(field in KEY_FIELDS for field in mapping.values()):
        raise MappingProblem(
            "no column holds an email or an external_id (customer id), which every row is matched by; "
            "name the columns with `mapping`", field="file", code="key_column_missing")
    return mapping


def _known(field: str, attribute_names: set[str]) -> bool:
    if field.startswith("attributes."):
        return field.removeprefix("attributes.") in attribute_names
    return field in FIELDS
