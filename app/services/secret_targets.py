"""Where each destination secret is sent, and the rule that binds a secret to the address it was given for.

A destination's secrets are sent to one address each: Brevo's `api_key` (the `api-key` header) and Mailchimp's
(basic auth) to the vendor's API, the webhook `secret` and `previous_secret` (the signatures they make) to the
receiver's URL. Anyone who may edit a destination (a manager) may change those addresses, but never sees the
secrets; so a secret goes only to the address it was given for (issue 15, docs/security.md "Class 1"):

- `api_url` is the one function that says where a kind's secrets go; the adapters are built with it.
- Changing that address (`base_url`, webhook `url`, or a Mailchimp key's data center) needs every secret sent
  there again in the same request, or its removal (`null`): `rebind` answers 422 `secret_bound_to_target`
  naming each one otherwise, and nothing is stored.
- The target each secret was given for is sealed with it (`destinations._seal`); `unbound` tells the worker when
  the stored config no longer matches (a change made behind the API): it then disables the destination rather
  than send the secret anywhere else.

Inbound secrets (`inbound_secret`, Mailchimp `signing_secret`) are never sent: they check what vendors send to
Carnet's own `PUBLIC_BASE_URL`, which no API caller can change.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any
from urllib.parse import urlsplit

from app.errors import FieldError, InvalidInput
from app.sync import brevo
from app.sync.mailchimp import api_base_url

__all__ = ["SENT_SECRETS", "api_url", "rebind", "target", "targets", "unbound"]

# The secrets each kind sends out, and so binds to api_url(...).
SENT_SECRETS: dict[str, tuple[str, ...]] = {
    "brevo": ("api_key",), "mailchimp": ("api_key",), "webhook": ("secret", "previous_secret"),
}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def api_url(kind: str, config: Mapping[str, Any]) -> str | None:
    """The URL this destination's secrets are sent to (`config` holds the public part and the secrets)."""
    if kind == "webhook":
        return config.get("url")
    if config.get("base_url"):
        return str(config["base_url"])
    if kind == "brevo":
        return brevo.API_URL
    try:
        return api_base_url(str(config.get("api_key", "")))
    except ValueError:
        return None  # a Mailchimp key without its data center: nowhere to send it (the adapter refuses it too)


def target(url: str | None) -> str:
    """The address a URL names, compared when deciding whether a secret may follow it: scheme, host, port (the
    default one spelled out), path without its trailing `/`, and the query. Stricter than the origin on purpose:
    on a shared host (a proxy, a webhook relay such as Zapier) another path or query is another receiver."""
    if not url:
        return ""
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    except ValueError:
        return url  # an invalid port: compared as written (validation refused it before it was stored)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}{query}"


def targets(kind: str, config: Mapping[str, Any]) -> dict[str, str]:
    """Each secret of `config` that is sent out → the address it goes to."""
    where = target(api_url(kind, config))
    return {name: where for name in SENT_SECRETS.get(kind, ()) if config.get(name)}


def rebind(kind: str, config: Mapping[str, Any], *, bound: Mapping[str, str], given: Set[str]) -> dict[str, str]:
    """The targets to seal with the secrets of a changed `config`: a secret given in this request is bound to
    where it goes now; one kept from before must be going where it was given for (else 422, nothing stored)."""
    wanted = targets(kind, config)
    refused = [name for name, where in wanted.items() if name not in given and bound.get(name) != where]
    if refused:
        raise InvalidInput(*(FieldError(
            f"config.{name}", "this secret was given for another address: to send it to the new one, give it "
            "again in the same request (or remove it with null)", "secret_bound_to_target") for name in refused))
    return wanted


def unbound(kind: str, config: Mapping[str, Any], bound: Mapping[str, str]) -> list[str]:
    """Secrets that would now go elsewhere than where they were given for (a binding unknown, from before
    bindings were sealed, is taken as it is)."""
    return [name for name, where in targets(kind, config).items() if bound.get(name, where) != where]
