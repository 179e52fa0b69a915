"""bin/audit: the known-vulnerability check of the installed set, and the proof behind its one waiver.

The audit's logic is checked against a fake PyPI (the JSON API's documents, as PyPI serves them); the real
PyPI is asked by `bin/audit` itself, in CI.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bin"))
import audit  # noqa: E402

VULN = {"id": "PYSEC-2099-1", "aliases": ["CVE-2099-1", "GHSA-aaaa-bbbb-cccc"], "fixed_in": ["2.0.1"],
        "link": "https://osv.dev/vulnerability/PYSEC-2099-1", "details": "...", "withdrawn": None}


def fake_pypi(projects: dict[str, tuple[str, list[dict[str, Any]]]], *, down: bool = False) -> httpx.Client:
    """PyPI's per-project JSON document (`/pypi/<name>/json`): `info.version` is the latest release and
    `vulnerabilities` are that release's."""

    def handle(request: httpx.Request) -> httpx.Response:
        if down:
            raise httpx.ConnectError("unreachable", request=request)
        assert request.method == "GET"
        _, pypi, name, tail = request.url.path.split("/")
        assert (pypi, tail) == ("pypi", "json")
        if name not in projects:
            return httpx.Response(404)
        latest, vulns = projects[name]
        return httpx.Response(200, json={"info": {"name": name, "version": latest}, "releases": {},
                                         "urls": [], "vulnerabilities": vulns})

    return httpx.Client(transport=httpx.MockTransport(handle))


def run(packages: dict[str, str], client: httpx.Client, capsys: pytest.CaptureFixture[str], *,
        ignore: dict[tuple[str, str], str] | None = None, strict: bool = False) -> tuple[int, str]:
    findings = audit.check(packages, index="https://pypi.test/pypi", client=client)
    status = audit.report(findings, ignore or {}, strict=strict)
    return status, capsys.readouterr().out


def test_a_vulnerability_of_the_installed_latest_release_fails(capsys: pytest.CaptureFixture[str]) -> None:
    client = fake_pypi({"clean": ("1.2", []), "holed": ("2.0", [VULN])})
    status, out = run({"clean": "1.2", "holed": "2.0"}, client, capsys)
    assert status == 1
    assert "VULNERABLE holed 2.0: PYSEC-2099-1 (CVE-2099-1, GHSA-aaaa-bbbb-cccc) fixed in 2.0.1" in out
    assert "2 checked at their latest release, 0 unchecked, 1 known vulnerabilities" in out


def test_a_waiver_names_the_package_and_any_alias(capsys: pytest.CaptureFixture[str]) -> None:
    client = fake_pypi({"holed": ("2.0", [VULN]), "other": ("1.0", [VULN])})
    status, out = run({"holed": "2.0", "other": "1.0"}, client, capsys,
                      ignore={("holed", "CVE-2099-1"): "never imported"})
    assert status == 1  # the same id in another package is not waived
    assert "ignored    holed 2.0: PYSEC-2099-1: never imported" in out
    assert "VULNERABLE other 1.0" in out


def test_an_older_release_is_unchecked_not_clean(capsys: pytest.CaptureFixture[str]) -> None:
    client = fake_pypi({"old": ("3.0", [])})
    assert run({"old": "2.9"}, client, capsys)[0] == 0
    status, out = run({"old": "2.9"}, client, capsys, strict=True)
    assert status == 1
    assert "unchecked  old: 2.9 installed, PyPI lists vulnerabilities of 3.0 only" in out


def test_withdrawn_advisories_do_not_count(capsys: pytest.CaptureFixture[str]) -> None:
    client = fake_pypi({"pkg": ("1.0", [{**VULN, "withdrawn": "2099-01-01T00:00:00Z"}])})
    assert run({"pkg": "1.0"}, client, capsys)[0] == 0


def test_pypi_unreachable_is_an_error_never_a_clean_report(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit.time, "sleep", lambda _s: None)
    status, out = run({"pkg": "1.0"}, fake_pypi({}, down=True), capsys)
    assert status == 2
    assert "ERROR      pkg: PyPI could not be asked (ConnectError)" in out


def test_a_waiver_without_a_reason_is_refused(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[[tool.carnet.audit.ignore]]\nid = "CVE-2099-1"\npackage = "x"\nreason = " "\n')
    with pytest.raises(SystemExit, match="needs a package and a reason"):
        audit.ignored(pyproject)


def test_the_ecdsa_waiver_holds_ecdsa_is_never_imported() -> None:
    """pyproject.toml waives CVE-2024-23342 (ecdsa, no fixed release) because Carnet never runs ecdsa: python-jose
    requires the package but, with `cryptography` installed, uses that backend. Signing and verifying a token in
    each of the deployment's algorithms, and starting the app, must leave ecdsa unimported."""
    assert ("ecdsa", "CVE-2024-23342") in audit.ignored(ROOT / "pyproject.toml")
    script = textwrap.dedent("""
        import sys
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
        import app.main
        from app.security import Role
        from app.security.tokens import TokenSigner

        def pems(key):
            private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
            public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            return private, public

        app.main.create_app()
        signers = [TokenSigner(secret="s" * 40)]
        for algorithm, key in (("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                               ("EdDSA", ed25519.Ed25519PrivateKey.generate())):
            private, public = pems(key)
            signers.append(TokenSigner(secret="s" * 40, algorithm=algorithm, private_key=private, signing_kid="k",
                                       public_keys={"k": public}))
        for signer in signers:
            token = signer.issue(subject="audit", role=Role.ADMIN, scopes=None, ttl_seconds=60).token
            assert signer.verify(token).subject == "audit"
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ecdsa", "jose"))
        assert not any(m.startswith("ecdsa") or m == "jose.backends.ecdsa_backend" for m in loaded), loaded
        print("ok", len(loaded))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,  # noqa: S603
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
