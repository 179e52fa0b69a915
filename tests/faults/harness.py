"""Live processes for fault drills: a private PostgreSQL cluster, a real `carnet serve` on a free port, workers.

Nothing here touches the machine's shared PostgreSQL (:5432): the cluster is initdb'ed into a temporary
directory, listens on its own port, and is stopped and removed by its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx

from tests.auth import TEST_SECRET

__all__ = ["LiveServer", "PgCluster", "WorkerProcess", "free_port", "rss_kib"]

ROOT = Path(__file__).resolve().parents[2]
CARNET = Path(sys.executable).with_name("carnet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (VmRSS, in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _postgres_bindir() -> Path:
    """The machine's PostgreSQL binaries (newest version), else the ones the pgserver wheel ships."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    from pgserver._commands import POSTGRES_BIN_PATH  # the embedded mode's own binaries

    return Path(POSTGRES_BIN_PATH)


class PgCluster:
    """A throw-away PostgreSQL cluster; `stop("fast")` / `start()` simulate an outage and a recovery."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = free_port()
        self.bindir = _postgres_bindir()
        # initdb and postgres refuse to run as root: run them as the `postgres` system user then.
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("as root, a `postgres` system user must own the drill's cluster") from None
            os.chown(root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(  # noqa: S603 (our own binaries and arguments)
            [*self._as, *args], timeout=timeout, capture_output=True, cwd=self.root, check=False)
        if done.returncode != 0:
            error = done.stderr.decode(errors="replace")
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {error}")

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync", timeout=120)

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c max_connections=100")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options, "start", timeout=90)

    def stop(self, mode: str = "fast") -> None:
        """`fast`: open sessions are terminated (rolled back), as an orderly failover or a restart does."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-m", mode, "stop", timeout=90)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class LiveServer:
    """`carnet serve` (migrate, then uvicorn) in its own process, logging to a file."""

    def __init__(self, workdir: Path, database_url: str, jwt_secret: str, **env: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / f"carnet-{self.port}.log"
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "JWT_", "TEST_"))},
            "DATABASE_URL": database_url,
            "JWT_SECRET": jwt_secret,
            "DATA_DIR": str(workdir / "data"),
            "LIFECYCLE_REFRESH_SECONDS": "0",
            "RATE_LIMIT_PER_SECOND": "100000",  # one token drives all the load
            "RATE_LIMIT_BURST": "100000",
            "COSTLY_READS_PER_TOKEN": "1000",   # its concurrent segment counts too
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, timeout: float = 60) -> None:
        with self.log.open("ab") as handle:  # the child keeps its own descriptor
            # cwd = workdir: no developer's .env is read by the settings.
            command = [str(CARNET), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
            self.proc = subprocess.Popen(command, cwd=self.workdir, env=self.env,  # noqa: S603 (our own command)
                                         stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"carnet serve exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"carnet serve not ready after {timeout}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_lines(self, event: str) -> list[str]:
        """The server's JSON log lines for one event (e.g. `request.crashed`, which names the frames)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if f'"event": "{event}"' in line]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> LiveServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess:
    """`carnet worker` in its own process, so it can be SIGKILLed like a crashed machine."""

    def __init__(self, workdir: Path, database_url: str, jwt_secret: str = TEST_SECRET, **env: str) -> None:
        self.log = workdir / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "JWT_", "TEST_"))},
            "DATABASE_URL": database_url, "JWT_SECRET": jwt_secret, "SYNC_ALLOW_PRIVATE_NETWORKS": "true",
            "DELIVERY_LEASE_SECONDS": "15", "LIFECYCLE_REFRESH_SECONDS": "0",
            **env,
        }
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log.open("ab") as handle:
            self.proc = subprocess.Popen([str(CARNET), "worker"], cwd=self.workdir, env=self.env,  # noqa: S603
                                         stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_lines(self, event: str) -> list[str]:
        """The worker's JSON log lines for one event."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if f'"event": "{event}"' in line]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def private_cluster(prefix: str, *databases: str) -> Iterator[PgCluster]:
    """A started throw-away cluster holding `databases`, destroyed afterwards (never the machine's server)."""
    pg = PgCluster(Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        pg.init()
        pg.start()
        asyncio.run(_create_databases(pg.url, databases))
        yield pg
    finally:
        pg.destroy()


async def _create_databases(url: str, names: tuple[str, ...]) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for name in names:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
