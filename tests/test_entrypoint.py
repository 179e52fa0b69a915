"""The container entrypoint (docker/entrypoint.sh), run here with the same commands the image runs.

No container engine on this machine: the script runs directly, with the virtualenv's `carnet` and `python`
first on PATH as they are in the image.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
SECRET = "entrypoint-secret-" + "e" * 32


def _env(database_url: str | None, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "JWT_", "TEST_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", DATA_DIR=str(tmp / "data"),
               LIFECYCLE_REFRESH_SECONDS="0", DB_WAIT_SECONDS="5", **extra)
    if database_url:
        env.update(DATABASE_URL=database_url, JWT_SECRET=SECRET)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_missing_configuration_is_refused_clearly(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(ENTRYPOINT), "api"], env=_env(None, tmp_path), capture_output=True,  # noqa: S603, S607
                          text=True, timeout=30, check=False)
    assert done.returncode == 78
    assert "DATABASE_URL" in done.stderr and "JWT_SECRET" in done.stderr


def test_migrate_then_api_then_worker(tmp_path: Path, database_url: str) -> None:
    migrate = subprocess.run(["bash", str(ENTRYPOINT), "migrate"], env=_env(database_url, tmp_path),  # noqa: S603, S607
                             capture_output=True, text=True, timeout=120, check=False)
    assert migrate.returncode == 0, migrate.stderr

    port = _free_port()
    api = subprocess.Popen(["bash", str(ENTRYPOINT), "api"], env=_env(database_url, tmp_path, PORT=str(port),  # noqa: S603, S607
                                                                    HOST="127.0.0.1"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = subprocess.Popen(["bash", str(ENTRYPOINT), "worker"], env=_env(database_url, tmp_path),  # noqa: S603, S607
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and not ready:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.3)
        assert ready, "the api did not become ready"
        assert worker.poll() is None, "the worker exited"
    finally:
        for process in (api, worker):
            os.killpg(process.pid, signal.SIGTERM)
        # exec: the signal reaches carnet itself, which stops cleanly.
        assert api.wait(30) in (0, -signal.SIGTERM)
        assert worker.wait(30) == 0
