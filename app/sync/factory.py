"""From a stored destination to the adapter that speaks its vendor's API."""

from __future__ import annotations

from typing import Any

import httpx

from app.services.commerce import store_list_id
from app.services.destinations import Loaded
from app.services.secret_targets import api_url
from app.settings import Settings
from app.sync import net
from app.sync.brevo import API_URL, BrevoAdapter, BrevoConfig
from app.sync.mailchimp import MailchimpAdapter, MailchimpConfig
from app.sync.mailchimp_commerce import MailchimpStore
from app.sync.webhook import WebhookAdapter, WebhookConfig

__all__ = ["build_adapter", "build_http_client"]


def build_http_client(settings: Settings) -> httpx.AsyncClient:
    """The worker's one shared client: SSRF-guarded connections, no redirects, no proxy from the environment."""
    return net.build_client(allow_private_networks=settings.sync_allow_private_networks)


def build_adapter(destination: Loaded, client: httpx.AsyncClient, settings: Settings) -> Any:
    """The adapter sends the secrets to `api_url(...)` only: the address they are bound to (the worker checked)."""
    config = destination.config  # public config and decrypted secrets
    deadline = settings.sync_call_deadline_seconds
    url = api_url(destination.kind, config)
    if destination.kind == "brevo":
        return BrevoAdapter(BrevoConfig(
            api_key=config["api_key"], base_url=url or API_URL,
            doi_template_id=config.get("double_opt_in_template_id"),
            doi_redirection_url=config.get("double_opt_in_redirect_url"), deadline_seconds=deadline,
        ), client)
    if destination.kind == "mailchimp":
        store = MailchimpStore(config["store_id"], store_list_id(destination.row), config.get("store_currency")) \
            if config.get("store_id") else None
        # The store's audience too: writing a customer adds the address there (a transactional member), which an
        # erasure, an archive or an address change must reach like a mapped list's member.
        audiences = [m["remote_list_id"] for m in destination.row["list_mappings"]]
        return MailchimpAdapter(MailchimpConfig(
            api_key=config["api_key"], base_url=url, deadline_seconds=deadline,
            list_ids=tuple(dict.fromkeys([*audiences, *([store.list_id] if store and store.list_id else [])])),
            store=store,
        ), client)
    secrets = tuple(s for s in (config.get("secret"), config.get("previous_secret")) if s)
    return WebhookAdapter(WebhookConfig(url=url or "", secrets=secrets,
                                        allow_private_networks=settings.sync_allow_private_networks), client)
