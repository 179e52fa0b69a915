"""`carnet serve` as a new user meets it: run for real (a subprocess, a fresh database, real HTTP)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.security.tokens import verify_access_token

ROOT = Path(__file__).resolve().parents[1]
SECRET = "serve-secret-" + "s" * 40
READY_SECONDS = 90  # a shared, busy 2-core machine


def _env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "JWT_", "PUBLIC_BASE_URL", "TEST_"))}
    env.update(PYTHONPATH=str(ROOT), DATABASE_URL=database_url, JWT_SECRET=SECRET, DATA_DIR=str(data_dir),
               LOG_LEVEL="WARNING", LIFECYCLE_REFRESH_SECONDS="0", **extra)
    return env


@contextmanager
def _serving(env: dict[str, str], cwd: Path, *args: str) -> Iterator[tuple[str, Path]]:
    """`carnet serve --port 0 ARGS` until it says where it serves: (that address, its stderr file)."""
    err = cwd / f"serve-{time.monotonic_ns()}.err"
    with err.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", "0", *args],  # noqa: S603
                                cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + READY_SECONDS
        while not (found := re.search(r"^carnet: serving (http://\S+) ", err.read_text(), re.M)):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"carnet serve did not say where it serves ({proc.poll()}):\n{err.read_text()[-3000:]}")
            time.sleep(0.2)
        yield found[1], err
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        proc.kill()  # a no-op once it has stopped
        proc.wait()


def _printed_token(stderr: str) -> str | None:
    found = re.search(r"^First run on this database.*\n\n  (\S+)\n", stderr, re.M)
    return found[1] if found else None


def test_a_database_without_an_admin_token_gets_one_whatever_the_checkout(fresh_database: str, tmp_path: Path) -> None:
    # This data directory already printed a token for another database (the embedded one, say): the marker that
    # used to live here must not stop the new database from getting its own.
    tried = tmp_path / "tried-embedded-first"
    tried.mkdir()
    (tried / "bootstrap_token_issued").write_text("2026-01-01T00:00:00+00:00\n")
    with _serving(_env(fresh_database, tried), tmp_path) as (base, err):
        token = _printed_token(err.read_text())
        assert token, err.read_text()
        assert verify_access_token(token, SECRET).role.value == "admin"
        assert httpx.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {token}"}).json()["role"] == "admin"
        assert f"curl -H 'Authorization: Bearer <the token>' {base}/v1/contacts" in err.read_text()

    # Served again, from another checkout: the database had its admin token; a hint instead of a second one.
    other = tmp_path / "other-checkout"
    other.mkdir()
    with _serving(_env(fresh_database, other), tmp_path) as (_, err):
        assert _printed_token(err.read_text()) is None
        assert "carnet token create --role admin" in err.read_text()


def test_the_address_printed_is_the_one_served_and_links_follow_it(fresh_database: str, tmp_path: Path) -> None:
    with _serving(_env(fresh_database, tmp_path), tmp_path) as (base, err):
        port = int(base.rsplit(":", 1)[1])
        assert base == f"http://127.0.0.1:{port}" and port != 8000  # --port 0: the port really bound, not a template
        assert "HOST:PORT" not in err.read_text()
        token = _printed_token(err.read_text())
        assert httpx.get(f"{base}/readyz").status_code == 200
        created = httpx.post(f"{base}/v1/destinations", headers={"Authorization": f"Bearer {token}"}, json={
            "name": "brevo", "kind": "brevo", "config": {"api_key": "xkeysib-0123456789abcdef0123456789abcdef"}})
        assert created.status_code == 201, created.text
        assert created.json()["inbound_url"].startswith(f"{base}/v1/inbound/brevo/")  # PUBLIC_BASE_URL unset

    env = _env(fresh_database, tmp_path, PUBLIC_BASE_URL="https://crm.shop.example")
    with _serving(env, tmp_path) as (base, err):  # set: it wins, and the banner says where links point
        # The database's admin token was printed by the first serve: mint another through the CLI.
        assert "links in emails point at https://crm.shop.example" in err.read_text()
        minted = subprocess.run([sys.executable, "-m", "app", "token", "create", "--role", "admin",
                                 "--subject", "t@shop.example"], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=60, check=True).stdout.split()[-1]
        listed = httpx.get(f"{base}/v1/destinations", headers={"Authorization": f"Bearer {minted}"}).json()
        assert listed["data"][0]["inbound_url"].startswith("https://crm.shop.example/v1/inbound/brevo/")


def test_a_busy_port_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "app", "serve", "--port", str(port)],  # noqa: S603
                              env=_env("postgresql://postgres@127.0.0.1:9/never", tmp_path), cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"carnet: 127.0.0.1:{port} is already in use (another `carnet serve`?): stop that process, or serve on "
        f"another port with --port {port + 1}"]
    assert time.monotonic() - started < 30  # said before any database is waited for (that one never answers)
