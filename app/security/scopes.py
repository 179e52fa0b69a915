"""Scopes (`resource:action`) and the roles that bundle them (API.md "Roles and scopes")."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ROLE_SCOPES", "Role", "Scope"]


class Scope(StrEnum):
    CONTACTS_READ = "contacts:read"
    CONTACTS_WRITE = "contacts:write"
    CONTACTS_ERASE = "contacts:erase"
    PII_READ = "pii:read"
    ATTRIBUTES_WRITE = "attributes:write"
    TAGS_WRITE = "tags:write"
    TAGS_DELETE = "tags:delete"
    LISTS_READ = "lists:read"
    LISTS_WRITE = "lists:write"
    MEMBERSHIPS_WRITE = "memberships:write"
    CONSENTS_READ = "consents:read"
    CONSENTS_WRITE = "consents:write"
    ORDERS_READ = "orders:read"
    ORDERS_WRITE = "orders:write"
    EVENTS_READ = "events:read"
    EVENTS_WRITE = "events:write"
    SEGMENTS_READ = "segments:read"
    SEGMENTS_WRITE = "segments:write"
    IMPORTS_WRITE = "imports:write"
    EXPORTS_READ = "exports:read"
    DESTINATIONS_READ = "destinations:read"
    DESTINATIONS_WRITE = "destinations:write"
    RETENTION_RUN = "retention:run"
    TOKENS_ADMIN = "tokens:admin"
    JOURNAL_READ = "journal:read"


class Role(StrEnum):
    ADMIN = "admin"
    MANAGER = "manager"
    EDITOR = "editor"
    VIEWER = "viewer"
    INTEGRATION = "integration"


_OWNER_ONLY = frozenset({Scope.CONTACTS_ERASE, Scope.RETENTION_RUN, Scope.TOKENS_ADMIN, Scope.JOURNAL_READ})
_READS = frozenset(s for s in Scope if s.endswith(":read")) - {Scope.PII_READ, Scope.EXPORTS_READ} - _OWNER_ONLY

ROLE_SCOPES: dict[Role, frozenset[Scope]] = {
    Role.ADMIN: frozenset(Scope),
    Role.MANAGER: frozenset(Scope) - _OWNER_ONLY,
    Role.EDITOR: _READS
    - {Scope.DESTINATIONS_READ}
    | {
        Scope.PII_READ,
        Scope.CONTACTS_WRITE,
        Scope.TAGS_WRITE,
        Scope.MEMBERSHIPS_WRITE,
        Scope.CONSENTS_WRITE,
    },
    Role.VIEWER: _READS - {Scope.DESTINATIONS_READ},
    Role.INTEGRATION: frozenset(
        {
            Scope.CONTACTS_READ,
            Scope.CONTACTS_WRITE,
            Scope.PII_READ,
            Scope.ORDERS_READ,
            Scope.ORDERS_WRITE,
            Scope.EVENTS_WRITE,
            Scope.CONSENTS_READ,
            Scope.CONSENTS_WRITE,
            Scope.LISTS_READ,
            Scope.MEMBERSHIPS_WRITE,  # a newsletter form on the shop subscribes through the back office
        }
    ),
}
