"""Known vulnerabilities in the installed Python set: what `pip-audit` does, with the data this machine reaches.

    .venv/bin/python bin/audit.py [--index https://pypi.org/pypi] [--strict]

pip-audit asks PyPI per version (`/pypi/<name>/<version>/json`) or OSV (api.osv.dev); from here the first
answers 404 for every package and the second does not resolve. PyPI's per-project document
(`/pypi/<name>/json`), which is reachable, carries the same OSV-fed `vulnerabilities`, but for the project's
latest release only. So:

- a distribution installed at its latest release is checked exactly: every vulnerability PyPI lists for it
  fails the audit, unless `[tool.carnet.audit] ignore` in pyproject.toml names its id with a reason;
- a distribution older than its latest release cannot be checked from here: it is listed as unchecked, and
  fails the audit only with --strict (the local package mirror can lag PyPI by a release; a new upstream
  release must not turn CI red on its own);
- PyPI unreachable fails the audit: "no data" is never reported as "no vulnerability".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
INDEX = "https://pypi.org/pypi"
OWN = {"carnet"}  # this project: not on PyPI


@dataclass
class Finding:
    name: str
    installed: str
    latest: str | None = None
    vulnerabilities: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def checked(self) -> bool:
        return self.latest is not None and _same(self.installed, self.latest)


def installed() -> dict[str, str]:
    """name → version of every distribution in this interpreter's environment, this project excepted."""
    out = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in OWN:
            out[name] = dist.version
    return out


def ignored(pyproject: Path) -> dict[tuple[str, str], str]:
    """(package, vulnerability id or alias) → why it does not apply (pyproject.toml, [tool.carnet.audit] ignore)."""
    config = tomllib.loads(pyproject.read_text()).get("tool", {}).get("carnet", {}).get("audit", {})
    out = {}
    for entry in config.get("ignore", []):
        if not (str(entry.get("reason", "")).strip() and entry.get("package") and entry.get("id")):
            raise SystemExit(f"audit: ignoring {entry.get('id')} needs a package and a reason (pyproject.toml)")
        out[(canonicalize_name(entry["package"]), entry["id"])] = entry["reason"]
    return out


def check(packages: dict[str, str], *, index: str = INDEX, client: httpx.Client | None = None) -> list[Finding]:
    own_client = client is None
    client = client or httpx.Client(timeout=20.0, follow_redirects=False)
    try:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda item: _one(client, index, *item), sorted(packages.items())))
    finally:
        if own_client:
            client.close()


def _one(client: httpx.Client, index: str, name: str, version: str) -> Finding:
    finding = Finding(name, version)
    for attempt in range(3):
        try:
            response = client.get(f"{index}/{name}/json")
        except httpx.HTTPError as exc:
            finding.error = type(exc).__name__
        else:
            if response.status_code == 200:
                document = response.json()
                finding.latest, finding.error = document["info"]["version"], None
                finding.vulnerabilities = [v for v in document.get("vulnerabilities") or [] if not v.get("withdrawn")]
                return finding
            finding.error = f"HTTP {response.status_code}"
            if response.status_code == 404:
                return finding  # not on PyPI (a private package): unchecked, not retried
        time.sleep(0.5 * (attempt + 1))
    return finding


def report(findings: list[Finding], ignore: dict[tuple[str, str], str], *, strict: bool) -> int:
    """Prints the audit; the exit status: 0 clean, 1 a known vulnerability (or, --strict, an unchecked package),
    2 PyPI could not be asked."""
    unreachable = [f for f in findings if f.error and f.error != "HTTP 404"]
    unchecked = [f for f in findings if not f.checked and f not in unreachable]
    vulnerable, waived = [], []
    for f in findings:
        if not f.checked:
            continue
        for v in f.vulnerabilities:
            ids = {v["id"], *(v.get("aliases") or ())}
            reason = next((ignore[(f.name, i)] for i in sorted(ids) if (f.name, i) in ignore), None)
            (waived if reason else vulnerable).append((f, v, reason))
    for f, v, _ in vulnerable:
        print(f"VULNERABLE {f.name} {f.installed}: {v['id']} ({', '.join(v.get('aliases') or ())}) "
              f"fixed in {', '.join(v.get('fixed_in') or ()) or 'no release'}; {v.get('link', '')}")
    for f, v, reason in waived:
        print(f"ignored    {f.name} {f.installed}: {v['id']}: {reason}")
    for f in unchecked:
        why = f.error or f"{f.installed} installed, PyPI lists vulnerabilities of {f.latest} only"
        print(f"unchecked  {f.name}: {why}")
    for f in unreachable:
        print(f"ERROR      {f.name}: PyPI could not be asked ({f.error})")
    checked = sum(1 for f in findings if f.checked)
    print(f"audit: {len(findings)} distributions, {checked} checked at their latest release, {len(unchecked)} "
          f"unchecked, {len(vulnerable)} known vulnerabilities, {len(waived)} ignored with a reason")
    if unreachable:
        return 2
    if vulnerable or (strict and unchecked):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=INDEX, help="PyPI's JSON API root (default %(default)s)")
    parser.add_argument("--strict", action="store_true", help="an installed release older than the latest fails")
    args = parser.parse_args(argv)
    return report(check(installed(), index=args.index), ignored(ROOT / "pyproject.toml"), strict=args.strict)


def _same(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


if __name__ == "__main__":
    sys.exit(main())
