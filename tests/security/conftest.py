"""The attacker's tools: the live spec-checking vendor fakes and the production worker of tests/sync."""

from tests.sync.conftest import brevo, mailchimp, worker

__all__ = ["brevo", "mailchimp", "worker"]
