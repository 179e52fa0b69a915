"""Browser tests on a real Chromium (Debian's, driven by Playwright) against a live `carnet serve`.

A second origin serves a shop page with the newsletter form; a webhook receiver stands for the shop's mailer
(it gets the confirmation and preference links Carnet sends out). The scenario is what a person does: sign up
from the shop, confirm from the email, change one list and leave the other (with the keyboard), download their
data, erase it. Every Carnet page gets an axe-core scan (0 serious or critical violations). With
CARNET_SCREENSHOTS=<dir> each page is also saved as a PNG there (docs/screenshots holds the committed ones).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url
from starlette.responses import HTMLResponse
from starlette.types import Receive, Scope, Send

from tests.auth import TEST_SECRET, bearer
from tests.conftest import _drop, _recreate, _with_database
from tests.fakes.server import LiveServer as LoopbackServer
from tests.fakes.webhook_receiver import FakeWebhookReceiver
from tests.faults.harness import LiveServer as CarnetServer

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
AXE = Path(__file__).with_name("node_modules") / "axe-core" / "axe.min.js"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN = bearer()
WORDING = "J'accepte de recevoir la lettre de Maison Lumière (désinscription en un clic dans chaque e-mail)."
SCREENSHOTS = os.environ.get("CARNET_SCREENSHOTS")
_AXE_SOURCE = AXE.read_text() if AXE.exists() else ""

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and AXE.exists()),
                                reason="chromium or axe-core missing: bin/setup-browser installs them")


@dataclass
class Stack:
    carnet: CarnetServer
    shop: LoopbackServer          # an allowed origin
    stranger: LoopbackServer      # the same page on an origin the list does not allow
    receiver: FakeWebhookReceiver
    api: httpx.AsyncClient
    newsletter: dict[str, Any]
    offers: dict[str, Any]


class ShopPage:
    """The shop's own page: the form posts JSON with fetch (CORS), and works as a plain form without script."""

    def __init__(self) -> None:
        self.action = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await HTMLResponse(_SHOP_PAGE.replace("{action}", self.action).replace("{wording}", WORDING))(
            scope, receive, send)


@pytest.fixture(scope="module")
def stack_servers(server_url: str, worker_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    name = f"carnet_browser_{worker_id}_{os.getpid()}"
    asyncio.run(_recreate(server_url, name))
    url = make_url(_with_database(server_url, name)).set(drivername="postgresql").render_as_string(
        hide_password=False)
    shop_page, stranger_page = ShopPage(), ShopPage()
    receiver = FakeWebhookReceiver()
    with LoopbackServer(shop_page) as shop, LoopbackServer(stranger_page) as stranger, \
            LoopbackServer(receiver) as hooks:
        carnet = CarnetServer(tmp_path_factory.mktemp("carnet"), url, TEST_SECRET, RUN_WORKER_IN_API="true",
                              SYNC_ALLOW_PRIVATE_NETWORKS="true", WORKER_IDLE_SECONDS="0.2",
                              SIGNUP_ANSWER_SECONDS="0.05", PUBLIC_NAME="Maison Lumière", PUBLIC_COLOR="#0b7a75",
                              LOG_LEVEL="WARNING")
        carnet.env["PUBLIC_BASE_URL"] = carnet.base_url
        carnet.start()
        try:
            yield {"carnet": carnet, "shop": shop, "stranger": stranger, "receiver": receiver, "hooks": hooks,
                   "pages": (shop_page, stranger_page)}
        finally:
            carnet.stop()
    asyncio.run(_drop(server_url, name))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(stack_servers: dict) -> AsyncIterator[Stack]:
    carnet: CarnetServer = stack_servers["carnet"]
    async with httpx.AsyncClient(base_url=carnet.base_url, headers=ADMIN, timeout=30) as api:
        shop = stack_servers["shop"]
        newsletter = await _created(api.post("/v1/lists", json={
            "name": "newsletter-fr", "display_name": "La lettre de Maison Lumière", "description": "Une fois par mois",
            "public_signup": True, "signup_origins": [shop.url], "signup_wording": WORDING,
            "signup_policy_version": "2026-03", "double_opt_in": True}))
        offers = await _created(api.post("/v1/lists", json={
            "name": "offers", "display_name": "Ventes privées", "description": "Avant tout le monde",
            "public_signup": True, "signup_origins": [shop.url], "signup_wording": "Je veux les ventes privées"}))
        hook = await _created(api.post("/v1/destinations", json={
            "kind": "webhook", "name": "mailer", "config": {"url": stack_servers["hooks"].url + "/carnet"}}))
        stack_servers["receiver"].secrets.append(hook["generated_secrets"]["secret"])
        for page in stack_servers["pages"]:
            page.action = f"{carnet.base_url}/v1/public/lists/{newsletter['id']}/signup"
        yield Stack(carnet, shop, stack_servers["stranger"], stack_servers["receiver"], api, newsletter, offers)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        await chromium.close()


async def test_a_person_signs_up_confirms_chooses_downloads_and_erases(stack: Stack, browser: Any,
                                                                      tmp_path: Path) -> None:
    email = f"lea.{uuid.uuid4().hex[:8]}@example.com"
    # bypass_csp: our pages forbid every script; the scan injects axe-core all the same (the test's, not theirs).
    context = await browser.new_context(locale="fr-FR", bypass_csp=True, accept_downloads=True,
                                        viewport={"width": 960, "height": 900})
    page = await context.new_page()

    # 1. The shop's page, on an allowed origin: the form posts JSON to Carnet (a CORS preflight, then the POST).
    await page.goto(stack.shop.url + "/newsletter")
    await shot(page, "01-shop-signup-form")
    await page.fill("#email", email)
    await page.fill("#first_name", "Léa")
    await page.check("#consent")
    await page.click("button[type=submit]")
    await page.wait_for_function("document.getElementById('result').textContent.length > 0")
    assert "e-mail est en route" in await page.text_content("#result")
    contact = await _one_contact(stack.api, email)
    assert contact["first_name"] == "Léa"

    # 2. The confirmation email (the webhook the shop's mailer receives): the page, then the button.
    sent = await _webhook(stack.receiver, "membership.confirmation_requested", contact["id"])
    await page.goto(sent["confirm_url"])
    await check_page(page, "02-confirm")
    assert await _status(stack.api, stack.newsletter["id"], contact["id"]) == "pending"  # opening changed nothing
    await page.click("button:has-text('Oui, je m')")
    await check_page(page, "03-confirmed")
    assert await _status(stack.api, stack.newsletter["id"], contact["id"]) == "subscribed"

    # 3. The preference center, from the link every email carries; two lists, one left with the keyboard.
    await _created(stack.api.put(f"/v1/lists/{stack.offers['id']}/members/{contact['id']}",
                                 json={"consent": {"proof": {"wording": "Je veux les ventes privées"}}}))
    preferences_url = sent["preferences_url"]
    await page.goto(preferences_url)
    await check_page(page, "04-preferences")
    checkbox = page.locator(f"#list-{stack.newsletter['id']}")
    assert await checkbox.is_checked()
    await _tab_to(page, f"list-{stack.newsletter['id']}")
    await page.keyboard.press("Space")
    await _tab_to_text(page, "Enregistrer mes choix")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("p.notice")
    await check_page(page, "05-preferences-saved")
    assert await _status(stack.api, stack.newsletter["id"], contact["id"]) == "unsubscribed"
    assert await _status(stack.api, stack.offers["id"], contact["id"]) == "subscribed"
    ledger = (await stack.api.get(f"/v1/contacts/{contact['id']}/consents")).json()
    assert [(e["purpose"], e["action"]) for e in ledger["events"]][-1] == ("list_subscription", "withdrawn")

    # 4. Download my data: a file, everything held, the person's own data unmasked.
    async with page.expect_download() as download_info:
        await page.click("button:has-text('Télécharger mes données')")
    download = await download_info.value
    saved = tmp_path / download.suggested_filename
    await download.save_as(saved)
    document = json.loads(saved.read_text())
    assert document["profile"]["email"] == email and document["pii_masked"] is False
    assert {m["list_id"] for m in document["memberships"]} == {stack.newsletter["id"], stack.offers["id"]}

    # 5. Erasure: a confirmation step, then nothing is left.
    await page.click("button:has-text('Effacer mes données')")
    await check_page(page, "06-erase-confirm")
    assert (await stack.api.get(f"/v1/contacts/{contact['id']}")).status_code == 200  # not yet
    await page.click("button:has-text('Oui, effacer mes données')")
    await check_page(page, "07-erased")
    assert (await stack.api.get(f"/v1/contacts/{contact['id']}")).status_code == 404
    await page.goto(preferences_url)
    assert "Nous ne détenons rien sur vous" in await page.content()
    await context.close()


async def test_english_page_and_a_form_without_script(stack: Stack, browser: Any) -> None:
    context = await browser.new_context(locale="en-GB", java_script_enabled=False, viewport={"width": 960,
                                                                                           "height": 800})
    page = await context.new_page()
    email = f"sam.{uuid.uuid4().hex[:8]}@example.com"
    await page.goto(stack.shop.url + "/newsletter")
    await page.fill("#email", email)
    await page.check("#consent")
    await page.click("button[type=submit]")  # no script: the browser posts the form and shows Carnet's page
    await page.wait_for_load_state()
    assert "Check your inbox" in await page.content()
    await shot(page, "08-signup-without-script")
    await check_html(browser, await page.content(), "08-signup-without-script")  # axe needs script: a copy
    contact = await _one_contact(stack.api, email)
    links = (await stack.api.get(f"/v1/contacts/{contact['id']}/links")).json()
    await page.goto(links["preferences_url"])
    assert '<html lang="en">' in await page.content()
    await shot(page, "09-preferences-english")
    await check_html(browser, await page.content(), "09-preferences-english")
    await context.close()


async def test_a_page_on_another_origin_cannot_sign_anyone_up(stack: Stack, browser: Any) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    email = f"nope.{uuid.uuid4().hex[:8]}@example.com"
    refused: list[str] = []
    page.on("console", lambda message: refused.append(message.text))
    await page.goto(stack.stranger.url + "/newsletter")
    await page.fill("#email", email)
    await page.check("#consent")
    await page.click("button[type=submit]")
    await page.wait_for_function("document.getElementById('result').textContent.length > 0")
    assert await page.text_content("#result") == "refused"  # the preflight got no CORS headers: fetch failed
    assert any("CORS" in text or "Access-Control" in text for text in refused), refused
    found = (await stack.api.get("/v1/contacts", params={"email": email})).json()["data"]
    assert found == []
    await context.close()


# ---- helpers -----------------------------------------------------------------------------------------------


async def check_page(page: Any, name: str) -> None:
    """axe-core on the page: no serious or critical violation; and its screenshot when asked for."""
    await _axe(page, name)
    await shot(page, name)


async def check_html(browser: Any, html: str, name: str) -> None:
    """axe-core on a page seen without script (the scan itself needs it): the same HTML in a scripted page."""
    context = await browser.new_context(bypass_csp=True)
    page = await context.new_page()
    await page.set_content(html)
    await _axe(page, name)
    await context.close()


async def _axe(page: Any, name: str) -> None:
    await page.add_script_tag(content=_AXE_SOURCE)
    violations = await page.evaluate("""async () => (await axe.run(document, {resultTypes: ['violations']}))
        .violations.map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' '))}))""")
    bad = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert bad == [], f"{name}: {bad}"


async def shot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        await asyncio.to_thread(Path(SCREENSHOTS).mkdir, parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


async def _tab_to(page: Any, element_id: str) -> None:
    for _ in range(40):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
    raise AssertionError(f"#{element_id} cannot be reached with the keyboard")


async def _tab_to_text(page: Any, text: str) -> None:
    for _ in range(40):
        await page.keyboard.press("Tab")
        if (await page.evaluate("document.activeElement && document.activeElement.textContent") or "").strip() == text:
            return
    raise AssertionError(f"{text!r} cannot be reached with the keyboard")


async def _created(request: Any) -> dict[str, Any]:
    response = await request
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


async def _one_contact(api: httpx.AsyncClient, email: str) -> dict[str, Any]:
    found = (await api.get("/v1/contacts", params={"email": email})).json()["data"]
    assert len(found) == 1, found
    return found[0]  # type: ignore[no-any-return]


async def _status(api: httpx.AsyncClient, list_id: str, contact_id: str) -> str | None:
    members = (await api.get(f"/v1/lists/{list_id}/members", params={"limit": 1000})).json()["data"]
    return next((m["status"] for m in members if m["contact_id"] == contact_id), None)


async def _webhook(receiver: FakeWebhookReceiver, topic: str, contact_id: str) -> dict[str, Any]:
    """The shop's mailer gets the message (the worker inside `carnet serve` delivers it)."""
    async with asyncio.timeout(30):
        while True:
            for delivery in receiver.deliveries:
                payload = delivery.payload
                if delivery.valid and payload["type"] == topic and payload["data"]["contact_id"] == contact_id:
                    return payload["data"]  # type: ignore[no-any-return]
            await asyncio.sleep(0.1)


_SHOP_PAGE = """<!doctype html>
<html lang="fr">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Maison Lumière — la lettre</title>
<style>
body { font: 1rem/1.5 Georgia, serif; margin: 0; background: #faf7f2; color: #222; }
header { background: #0b7a75; color: #fff; padding: 1rem 2rem; font-size: 1.4rem; }
main { max-width: 34rem; margin: 2rem auto; background: #fff; padding: 1.5rem 2rem; border-radius: 10px; }
label { display: block; margin: .8rem 0 .2rem; font-weight: bold; }
input[type=email], input[type=text] { width: 100%; padding: .5rem; font: inherit; }
.consent { display: flex; gap: .5rem; margin-top: 1rem; } .consent label { font-weight: normal; margin: 0; }
.hp { position: absolute; left: -9999px; }
button { margin-top: 1rem; background: #0b7a75; color: #fff; border: 0; padding: .7rem 1.4rem; font: inherit;
         border-radius: 6px; }
</style></head>
<body><header>Maison Lumière</header>
<main><h1>La lettre de Maison Lumière</h1>
<p>Nouveautés, ateliers et ventes privées, une fois par mois.</p>
<form id="newsletter" method="post" action="{action}">
<label for="email">Votre e-mail</label><input id="email" name="email" type="email" required autocomplete="email">
<label for="first_name">Prénom (facultatif)</label>
<input id="first_name" name="first_name" type="text" autocomplete="given-name">
<div class="hp" aria-hidden="true"><label for="website">Site web</label>
<input id="website" name="website" type="text" tabindex="-1" autocomplete="off"></div>
<div class="consent"><input type="checkbox" id="consent" name="consent" value="on" required>
<label for="consent">{wording}</label></div>
<button type="submit">Je m'inscris</button>
<p id="result" role="status"></p>
</form></main>
<script>
document.getElementById('newsletter').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = {email: form.email.value, first_name: form.first_name.value || null, consent: form.consent.checked,
                website: form.website.value || null};
  const result = document.getElementById('result');
  try {
    const answer = await fetch(form.action, {method: 'POST', body: JSON.stringify(body),
      headers: {'content-type': 'application/json', 'accept': 'application/json', 'accept-language': 'fr'}});
    result.textContent = (await answer.json()).detail;
  } catch (error) {
    result.textContent = 'refused';
  }
});
</script>
</body></html>
"""
