"""API keys the fake vendors of the end-to-end sync tests accept (made up per run)."""

import uuid

MC_KEY = f"{uuid.uuid4().hex}-us6"
BREVO_KEY = "xkeysib-" + uuid.uuid4().hex
