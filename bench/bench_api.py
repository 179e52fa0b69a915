"""Carnet vs a raw asyncpg "floor", side by side, in one run.

    .venv/bin/python bench/bench_api.py [--seconds N] [--concurrency C] [--rounds R] [--client wrk|httpx]
    .venv/bin/python bench/bench_api.py --baseline-env JOURNAL_ENABLED=false   # the access journal's cost

With --baseline-env, the "floor" is Carnet itself with those settings (same code, same flags), and the bars are
the journal's (docs/performance.md "Access journal"): read >= 0.8x, upsert >= 0.9x of the journal-off build.

What it does:
  1. (Re)creates the database `carnet_bench` on 127.0.0.1:5432, runs Carnet's migrations, seeds 20k
     contacts with COPY.
  2. Starts two uvicorn processes, one worker each, same flags: Carnet (`app.main:create_app`) and the
     floor (`bench/floor_app.py`: FastAPI + a raw asyncpg pool, one SQL statement per request).
  3. For each scenario (GET a contact by id; upsert with REPEAT_RATIO of existing keys), warms both up,
     then measures them alternately in ABBA order (floor, carnet, carnet, floor, ...) so that drift and
     noise of this shared machine hit both alike. The load generator is another process: wrk by
     default (closed loop, C connections), or bench/loadgen_httpx.py.
  4. Prints a table (req/s, p50, p99, server and database CPU per request, ratios vs the targets) and
     writes everything, per round too, to bench/out/api.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OUT = BENCH / "out"
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = {
    "read": {"throughput_ratio": 0.7, "p99_ratio": 2.0},
    "upsert": {"throughput_ratio": 0.75, "p99_ratio": None},  # issue 18 (was 0.5)
}
BASELINE_TARGETS = {  # Carnet against Carnet with --baseline-env (ARCHITECTURE.md: the journal's bars)
    "read": {"throughput_ratio": 0.8, "p99_ratio": None},
    "upsert": {"throughput_ratio": 0.9, "p99_ratio": None},
}
PATHS = {
    ("floor", "read"): "/floor/contacts/",
    ("carnet", "read"): "/v1/contacts/",
    ("floor", "upsert"): "/floor/contacts/upsert",
    ("carnet", "upsert"): "/v1/contacts/upsert",
}


# ---- setup ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=5, help="length of one measurement slice (default 5)")
    p.add_argument("--rounds", type=int, default=6, help="slices per system and scenario (default 6, ABBA order)")
    p.add_argument("--concurrency", type=int, default=32, help="open connections / in-flight requests (default 32)")
    p.add_argument("--warmup", type=int, default=3, help="unrecorded warm-up seconds per system and scenario")
    p.add_argument("--client", choices=("wrk", "httpx"), default="wrk", help="load generator (default wrk)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1: it is not the bottleneck)")
    p.add_argument("--seed-rows", type=int, default=20_000)
    p.add_argument("--repeat-ratio", type=float, default=0.2, help="share of upserts hitting an existing key")
    p.add_argument("--scenarios", default="read,upsert", help="comma-separated subset of read,upsert")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="server URL, without database")
    p.add_argument("--db", default="carnet_bench")
    p.add_argument("--keep-db", action="store_true", help="do not drop the database at the end")
    p.add_argument("--out", type=Path, default=OUT / "api.json")
    p.add_argument("--carnet-app", default="app.main:create_app",
                   help="uvicorn factory for Carnet (to try a patched variant; default app.main:create_app)")
    p.add_argument("--carnet-app-dir", default=None, help="directory to import --carnet-app from")
    p.add_argument("--carnet-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for Carnet, e.g. DATABASE_POOL_SIZE=20 (repeatable)")
    p.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                   help="instead of the raw floor, compare with Carnet run with these settings "
                        "(e.g. JOURNAL_ENABLED=false); repeatable")
    p.add_argument("--profile", action="store_true",
                   help="after the measurements, one extra Carnet slice per scenario under py-spy "
                        "(bench/out/profile_<scenario>.txt, collapsed stacks); not counted in the numbers")
    args = p.parse_args()
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if not set(args.scenarios) <= {"read", "upsert"}:
        p.error("--scenarios takes read and/or upsert")
    return args


def check_tools(args: argparse.Namespace) -> None:
    if args.client == "wrk" and shutil.which("wrk") is None:
        sys.exit("bench_api: `wrk` is not installed. Install it (Debian: `apt-get install -y wrk`) "
                 "or run with `--client httpx` (a Python load generator, heavier on this machine's CPU).")
    if args.profile and shutil.which("py-spy", path=f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}") is None:
        sys.exit("bench_api: --profile needs py-spy: `.venv/bin/pip install py-spy`.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def create_database(pg: str, db: str) -> None:
    conn = await asyncpg.connect(f"{pg}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{db}"')
    finally:
        await conn.close()


async def drop_database(pg: str, db: str) -> None:
    conn = await asyncpg.connect(f"{pg}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    finally:
        await conn.close()


async def seed(url: str, rows: int) -> list[tuple[str, str, str]]:
    """COPY `rows` contacts shaped like Carnet's own (normalized email and phone); returns (id, external_id, email)."""
    rng = random.Random(42)
    now = dt.datetime.now(dt.UTC)
    firsts = ["Claire", "Louis", "Emma", "Hugo", "Léa", "Jules", "Chloé", "Noah", "Inès", "Paul"]
    lasts = ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau"]
    cities = [("Paris", "75011"), ("Lyon", "69003"), ("Nantes", "44000"), ("Lille", "59000"), ("Bordeaux", "33000")]
    records, keys = [], []
    for i in range(rows):
        cid = uuid.uuid4()
        ext, email = f"seed-{i:06d}", f"seed{i:06d}@bench-mail.com"
        city, postal = rng.choice(cities)
        created = now - dt.timedelta(days=rng.randint(0, 900), seconds=rng.randint(0, 86_400))
        tags = ["newsletter"] if i % 3 == 0 else []
        records.append((cid, ext, email, "unverified", f"+336{rng.randint(10_000_000, 99_999_999)}",
                        rng.choice(firsts), rng.choice(lasts), f"{rng.randint(1, 200)} rue de la Paix", postal, city,
                        "FR", "fr", "import", "prospect", "prospect", tags, created, created, 1))
        keys.append((str(cid), ext, email))
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table("contact", records=records, columns=[
            "id", "external_id", "email", "email_status", "phone", "first_name", "last_name", "address_line1",
            "postal_code", "city", "country", "language", "source", "kind", "lifecycle_stage", "tags",
            "created_at", "updated_at", "version"])
        await conn.execute("VACUUM ANALYZE contact")
    finally:
        await conn.close()
    return keys


# ---- servers -------------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        return _proc_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _proc_cpu(pid: int, *, children: bool = False) -> float:
    """utime + stime of a process (+ its reaped children's when asked), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def db_cpu_seconds(db: str) -> float | None:
    """CPU of the PostgreSQL backends serving `db`, plus backends already gone (counted by the postmaster).

    The postmaster's reaped-children total also takes other databases' ended sessions and autovacuum
    workers: on a shared server this is an approximation, good for comparing the two systems.
    """
    total, found = 0.0, False
    marker = f" {db} "
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if _comm(ppid) != "postgres":  # the postmaster
                total += _proc_cpu(int(entry.name), children=True) - _proc_cpu(int(entry.name))
                found = True
            elif marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                total += _proc_cpu(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return total if found else None


def db_sessions(pg: str, db: str) -> int | None:
    """Connections ever opened to `db` (pg_stat_database.sessions, PostgreSQL 14+), read from another database."""

    async def read() -> int | None:
        conn = await asyncpg.connect(f"{pg}/postgres")
        try:
            return await conn.fetchval("SELECT sessions FROM pg_stat_database WHERE datname = $1", db)
        except asyncpg.UndefinedColumnError:
            return None
        finally:
            await conn.close()

    return asyncio.run(read())


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def start_server(name: str, app_args: list[str], env: dict[str, str]) -> Server:
    port = free_port()
    log = OUT / f"server_{name}.log"
    cmd = [PYTHON, "-m", "uvicorn", *app_args, "--host", "127.0.0.1", "--port", str(port),
           "--no-access-log", "--log-level", "warning"]
    handle = log.open("wb")
    # cwd=bench/out: no stray .env of a developer is read by Carnet's settings.
    proc = subprocess.Popen(cmd, cwd=OUT, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return Server(name, port, proc, log)


def wait_ready(server: Server, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            sys.exit(f"bench_api: {server.name} exited ({server.proc.returncode}); see {server.log}:\n"
                     + server.log.read_text()[-3000:])
        try:
            if httpx.get(server.base_url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"bench_api: {server.name} not ready after {timeout}s; see {server.log}")


def sanity_check(floor: Server, carnet: Server, token: str, contact_id: str) -> None:
    """Both answer the same row, Carnet refuses a missing token, both upsert: else the numbers mean nothing."""
    auth = {"Authorization": f"Bearer {token}"}
    f = httpx.get(f"{floor.base_url}/floor/contacts/{contact_id}", timeout=10)
    c = httpx.get(f"{carnet.base_url}/v1/contacts/{contact_id}", headers=auth, timeout=10)
    anon = httpx.get(f"{carnet.base_url}/v1/contacts/{contact_id}", timeout=10)
    problems = []
    if f.status_code != 200 or f.json()["id"] != contact_id:
        problems.append(f"floor GET: {f.status_code} {f.text[:200]}")
    if c.status_code != 200 or c.json()["id"] != contact_id or c.json()["pii_masked"]:
        problems.append(f"carnet GET: {c.status_code} {c.text[:200]}")
    if anon.status_code != 401:
        problems.append(f"carnet GET without token: {anon.status_code}, expected 401")
    body = {"external_id": "sanity-1", "email": "sanity-1@new.bench-mail.com", "first_name": "S", "last_name": "B",
            "phone": "06 12 34 56 78"}
    f = httpx.post(f"{floor.base_url}/floor/contacts/upsert", json=body, timeout=10)
    c = httpx.post(f"{carnet.base_url}/v1/contacts/upsert", json={**body, "external_id": "sanity-2",
                   "email": "sanity-2@new.bench-mail.com"}, headers=auth, timeout=10)
    if f.status_code != 201:
        problems.append(f"floor upsert: {f.status_code} {f.text[:200]}")
    if c.status_code != 201:
        problems.append(f"carnet upsert: {c.status_code} {c.text[:200]}")
    if problems:
        sys.exit("bench_api: sanity check failed:\n  " + "\n  ".join(problems))


# ---- load ----------------------------------------------------------------------------------------------


@dataclass
class Slice:
    """One measurement: one system, one scenario, `seconds` long."""

    system: str
    scenario: str
    round: int
    requests: int
    duration_s: float
    errors: dict[str, int]
    statuses: dict[str, int]
    hist: list[tuple[int, int]]
    server_cpu_s: float
    db_cpu_s: float | None
    loadavg_1m: float
    new_db_connections: int | None

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    def summary(self) -> dict[str, Any]:
        return {
            "round": self.round, "requests": self.requests, "duration_s": round(self.duration_s, 3),
            "rps": round(self.rps, 1), "p50_ms": pct_ms(self.hist, 50), "p99_ms": pct_ms(self.hist, 99),
            "server_cpu_ms_per_req": _per_req_ms(self.server_cpu_s, self.requests),
            "db_cpu_ms_per_req": _per_req_ms(self.db_cpu_s, self.requests),
            "new_db_connections": self.new_db_connections,
            "errors": self.errors, "statuses": self.statuses, "loadavg_1m": self.loadavg_1m,
        }


def _per_req_ms(seconds: float | None, requests: int) -> float | None:
    return None if seconds is None or not requests else round(seconds * 1000 / requests, 3)


def pct_ms(hist: list[tuple[int, int]], p: float) -> float | None:
    total = sum(c for _, c in hist)
    if not total:
        return None
    rank, seen = p / 100 * total, 0
    for value, count in sorted(hist):
        seen += count
        if seen >= rank:
            return round(value / 1000, 2)
    return round(max(v for v, _ in hist) / 1000, 2)


def run_load(args: argparse.Namespace, server: Server, scenario: str, seconds: float, tag: str,
             keys_file: Path, token: str | None) -> dict[str, Any]:
    target = PATHS[(server.name, scenario)]
    if args.client == "wrk":
        cmd = ["wrk", "-t", str(args.wrk_threads), "-c", str(args.concurrency), "-d", f"{int(seconds)}s",
               "--timeout", "10s", "-s", str(BENCH / "wrk_bench.lua"), server.base_url, "--",
               scenario, str(keys_file), target, token or "-"]
        if scenario == "upsert":
            cmd += [tag, str(args.repeat_ratio)]
    else:
        cfg = {"mode": scenario, "keys_file": str(keys_file), "base_url": server.base_url, "target": target,
               "token": token, "tag": tag, "repeat_ratio": args.repeat_ratio, "concurrency": args.concurrency,
               "seconds": seconds}
        cmd = [PYTHON, str(BENCH / "loadgen_httpx.py"), json.dumps(cfg)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        sys.exit(f"bench_api: load generator failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(line.removeprefix("BENCH_JSON "))


def measure(args: argparse.Namespace, server: Server, scenario: str, rnd: int, tag: str, keys_file: Path,
            token: str | None, seconds: float) -> Slice:
    sessions0 = db_sessions(args.pg, args.db)
    cpu0, db0 = server.cpu_seconds(), db_cpu_seconds(args.db)
    raw = run_load(args, server, scenario, seconds, tag, keys_file, token)
    cpu1, db1 = server.cpu_seconds(), db_cpu_seconds(args.db)
    time.sleep(1.1)  # pg_stat counters are flushed about once a second
    sessions1 = db_sessions(args.pg, args.db)
    if server.proc.poll() is not None:
        sys.exit(f"bench_api: {server.name} died during the run; see {server.log}")
    return Slice(
        system=server.name, scenario=scenario, round=rnd, requests=raw["requests"],
        duration_s=raw["duration_us"] / 1e6, errors=raw["errors"], statuses=raw["statuses"],
        hist=[(int(v), int(c)) for v, c in raw["hist"]], server_cpu_s=cpu1 - cpu0,
        db_cpu_s=None if db0 is None or db1 is None else db1 - db0, loadavg_1m=os.getloadavg()[0],
        new_db_connections=None if sessions0 is None or sessions1 is None else sessions1 - sessions0,
    )


@dataclass
class Aggregate:
    slices: list[Slice] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        hist: Counter[int] = Counter()
        for s in self.slices:
            hist.update(dict(s.hist))
        merged = sorted(hist.items())
        requests = sum(s.requests for s in self.slices)
        duration = sum(s.duration_s for s in self.slices)
        errors = Counter()
        statuses = Counter()
        for s in self.slices:
            errors.update(s.errors)
            statuses.update(s.statuses)
        server_cpu = sum(s.server_cpu_s for s in self.slices)
        db_cpu = None if any(s.db_cpu_s is None for s in self.slices) else sum(s.db_cpu_s or 0 for s in self.slices)
        conns = [s.new_db_connections for s in self.slices]
        new_conns = None if None in conns else sum(c or 0 for c in conns)
        return {
            "requests": requests, "duration_s": round(duration, 3), "rps": round(requests / duration, 1),
            "p50_ms": pct_ms(merged, 50), "p90_ms": pct_ms(merged, 90), "p99_ms": pct_ms(merged, 99),
            "max_ms": round(max(v for v, _ in merged) / 1000, 2) if merged else None,
            "server_cpu_ms_per_req": _per_req_ms(server_cpu, requests),
            "db_cpu_ms_per_req": _per_req_ms(db_cpu, requests),
            "new_db_connections_per_1k_req": None if new_conns is None else round(1000 * new_conns / requests, 2),
            "errors": {k: v for k, v in errors.items() if v}, "statuses": dict(statuses),
            "rounds": [s.summary() for s in self.slices],
        }


# ---- profiling -----------------------------------------------------------------------------------------


def profile(args: argparse.Namespace, server: Server, scenario: str, keys_file: Path, token: str) -> Path:
    out = OUT / f"profile_{scenario}.txt"
    spy = shutil.which("py-spy", path=f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}")
    recorder = subprocess.Popen([spy, "record", "-p", str(server.proc.pid), "-d", str(int(args.seconds) + 1),
                                 "-r", "250", "--gil", "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    time.sleep(0.5)
    run_load(args, server, scenario, args.seconds, f"p{scenario[0]}", keys_file, token)
    recorder.wait(60)
    return out


PROFILE_BUCKETS = {
    "FastAPI dependency resolution (incl. what deps run)": ("solve_dependencies (fastapi/",),
    "FastAPI/Starlette routing (route matching)": ("._match (fastapi/routing", "matches (fastapi/routing"),
    "sync dependency -> threadpool hop": ("run_in_threadpool (starlette/",),
    "token verification (python-jose)": ("verify_access_token (app/",),
    "SQLAlchemy (any frame)": ("(sqlalchemy/",),
    "  statement building + cache key": ("select (sqlalchemy/sql/_selectable", "_generate_cache_key (sqlalchemy/",
                                         "where (<sqlalchemy", "values (<sqlalchemy"),
    "  BEGIN / COMMIT / ROLLBACK": ("Transaction.start (asyncpg/", "Transaction.commit (asyncpg/",
                                    "Transaction.rollback (asyncpg/"),
    "  new connection (pool overflow churn)": ("connect (asyncpg/connection.py",),
    "request body validation (pydantic)": ("request_body_to_args (fastapi/",),
    "  email / phone normalization": ("(email_validator/", "(phonenumbers/"),
    "history rows": ("record (app/services/history.py",),
    "logging (structlog)": ("(structlog/",),
    "metrics (prometheus_client)": ("(prometheus_client/",),
    "response rendering (JSONBody)": ("render (app/routers/deps.py",),
}


def profile_summary(path: Path) -> dict[str, Any]:
    """Share of GIL-holding samples per bucket (a sample counts once per bucket) and the top app/ frames."""
    buckets: Counter[str] = Counter()
    app_frames: Counter[str] = Counter()
    grand = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        grand += count
        frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";")]
        joined = ";".join(frames)
        for name, needles in PROFILE_BUCKETS.items():
            if any(n in joined for n in needles):
                buckets[name] += count
        for frame in {f for f in frames if "(app/" in f}:
            app_frames[frame] += count
    if not grand:
        return {"samples": 0}
    return {
        "samples": grand,
        "buckets_pct": {name: round(100 * buckets[name] / grand, 1) for name in PROFILE_BUCKETS},
        "top_app_frames_pct": [(f, round(100 * n / grand, 1)) for f, n in app_frames.most_common(15)],
    }


# ---- report --------------------------------------------------------------------------------------------


def ratios(
    scenario: str, floor: dict[str, Any], carnet: dict[str, Any], pairs: list[tuple[Slice, Slice]]
) -> dict[str, Any]:
    target = TARGETS[scenario]
    thr = carnet["rps"] / floor["rps"]
    p99 = carnet["p99_ms"] / floor["p99_ms"]
    per_round = [round(c.rps / f.rps, 3) for f, c in pairs]
    out: dict[str, Any] = {
        "throughput_ratio": round(thr, 3),
        "throughput_ratio_per_round": per_round,
        "throughput_ratio_median_of_rounds": round(statistics.median(per_round), 3),
        "p50_ratio": round(carnet["p50_ms"] / floor["p50_ms"], 2),
        "p99_ratio": round(p99, 2),
        "target_throughput_ratio": target["throughput_ratio"],
        "throughput_target_met": thr >= target["throughput_ratio"],
    }
    if target["p99_ratio"] is not None:
        out["target_p99_ratio"] = target["p99_ratio"]
        out["p99_target_met"] = p99 <= target["p99_ratio"]
    if carnet["server_cpu_ms_per_req"] and floor["server_cpu_ms_per_req"]:
        out["server_cpu_ratio"] = round(carnet["server_cpu_ms_per_req"] / floor["server_cpu_ms_per_req"], 2)
    return out


def print_table(results: dict[str, Any]) -> None:
    head = (f"{'scenario':<8} {'system':<7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'srv CPU':>8} "
            f"{'DB CPU':>8} {'conn/1k':>8} {'errors':>6}")
    print("\n" + head)
    print("-" * len(head))
    for scenario, res in results["scenarios"].items():
        for system in ("floor", "carnet"):
            s = res[system]
            def f(v: float | None, nd: int = 2) -> str:
                return "-" if v is None else f"{v:.{nd}f}"
            print(f"{scenario:<8} {system:<7} {s['rps']:>8.0f} {f(s['p50_ms']):>8} {f(s['p99_ms']):>8} "
                  f"{f(s['server_cpu_ms_per_req'], 3):>8} {f(s['db_cpu_ms_per_req'], 3):>8} "
                  f"{f(s['new_db_connections_per_1k_req'], 1):>8} {sum(s['errors'].values()):>6}")
    print("srv CPU / DB CPU: ms of CPU per request in the uvicorn process / in the PostgreSQL backends;\n"
          "conn/1k: new PostgreSQL connections opened per 1000 requests; errors: non-2xx + socket errors\n")
    for scenario, res in results["scenarios"].items():
        r = res["ratios"]
        line = (f"{scenario:<7} throughput carnet/floor = {r['throughput_ratio']:.2f} "
                f"(target >= {r['target_throughput_ratio']}: {'MET' if r['throughput_target_met'] else 'MISSED'}; "
                f"per round {', '.join(f'{x:.2f}' for x in r['throughput_ratio_per_round'])})")
        print(line)
        p99 = f"        p99 carnet/floor = {r['p99_ratio']:.2f}"
        if "target_p99_ratio" in r:
            p99 += f" (target <= {r['target_p99_ratio']}: {'MET' if r['p99_target_met'] else 'MISSED'})"
        print(p99 + f"; p50 ratio {r['p50_ratio']:.2f}; server CPU/request ratio {r.get('server_cpu_ratio', '-')}")


# ---- main ----------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    check_tools(args)
    OUT.mkdir(parents=True, exist_ok=True)
    db_url = f"{args.pg}/{args.db}"
    started_at = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()

    print(f"[setup] database {args.db}: create, migrate, seed {args.seed_rows} contacts", flush=True)
    asyncio.run(create_database(args.pg, args.db))
    sys.path.insert(0, str(ROOT))
    from app.migrations import upgrade
    from app.security import Role
    from app.security.tokens import issue_access_token

    upgrade(db_url)
    keys = asyncio.run(seed(db_url, args.seed_rows))
    ids_file = OUT / "read_ids.txt"
    ids_file.write_text("\n".join(k[0] for k in keys) + "\n")
    # Repeats: disjoint halves of the seeded keys, so that the floor (raw phone) and Carnet never touch the same row.
    seeds_files = {"floor": OUT / "seeds_floor.txt", "carnet": OUT / "seeds_carnet.txt"}
    for i, system in enumerate(("floor", "carnet")):
        seeds_files[system].write_text("\n".join(f"{k[1]} {k[2]}" for k in keys[i::2]) + "\n")

    secret = secrets.token_urlsafe(40)
    token = issue_access_token(secret, subject="bench", role=Role.ADMIN, ttl_seconds=3600).token
    servers: dict[str, Server] = {}
    try:
        app_dir = ["--app-dir", args.carnet_app_dir] if args.carnet_app_dir else []
        carnet_env = {
            "DATABASE_URL": db_url, "JWT_SECRET": secret, "LOG_LEVEL": "WARNING",
            # One token drives all the load: lift its per-token rate limit (the limiter still runs).
            "RATE_LIMIT_PER_SECOND": "1000000", "RATE_LIMIT_BURST": "1000000",
            **dict(kv.split("=", 1) for kv in args.carnet_env),
        }
        if args.baseline_env:  # Carnet against itself: same app, the baseline's settings on the "floor" side
            TARGETS.update(BASELINE_TARGETS)
            for scenario in ("read", "upsert"):
                PATHS[("floor", scenario)] = PATHS[("carnet", scenario)]
            servers["floor"] = start_server("floor", [*app_dir, "--factory", args.carnet_app], {
                **carnet_env, **dict(kv.split("=", 1) for kv in args.baseline_env)})
            wait_ready(servers["floor"], "/readyz")
        else:
            servers["floor"] = start_server("floor", ["--app-dir", str(BENCH), "floor_app:app"],
                                            {"FLOOR_DATABASE_URL": db_url})
            wait_ready(servers["floor"], "/healthz")
        servers["carnet"] = start_server("carnet", [*app_dir, "--factory", args.carnet_app], carnet_env)
        wait_ready(servers["carnet"], "/readyz")
        if not args.baseline_env:
            sanity_check(servers["floor"], servers["carnet"], token, keys[0][0])
        tokens = {"floor": token if args.baseline_env else None, "carnet": token}
        print(f"[setup] ready in {time.monotonic() - t0:.0f}s: floor :{servers['floor'].port}, "
              f"carnet :{servers['carnet'].port}, client {args.client}, concurrency {args.concurrency}", flush=True)

        results: dict[str, Any] = {"scenarios": {}}
        for scenario in args.scenarios:
            def keys_for(system: str, scenario: str = scenario) -> Path:
                return ids_file if scenario == "read" else seeds_files[system]

            for system in ("floor", "carnet"):
                measure(args, servers[system], scenario, 0, f"{system[0]}w", keys_for(system), tokens[system],
                        args.warmup)
            agg = {"floor": Aggregate(), "carnet": Aggregate()}
            pairs: list[tuple[Slice, Slice]] = []
            for rnd in range(1, args.rounds + 1):
                order = ("floor", "carnet") if rnd % 2 else ("carnet", "floor")
                got = {}
                for system in order:
                    got[system] = measure(args, servers[system], scenario, rnd, f"{system[0]}{rnd}",
                                          keys_for(system), tokens[system], args.seconds)
                    agg[system].slices.append(got[system])
                    s = got[system]
                    print(f"  {scenario:<6} round {rnd} {system:<6} {s.rps:8.0f} req/s"
                          f"  p50 {pct_ms(s.hist, 50):7.2f} ms  p99 {pct_ms(s.hist, 99):7.2f} ms"
                          f"  load {s.loadavg_1m:.2f}", flush=True)
                pairs.append((got["floor"], got["carnet"]))
            floor_sum, carnet_sum = agg["floor"].summary(), agg["carnet"].summary()
            results["scenarios"][scenario] = {
                "floor": floor_sum, "carnet": carnet_sum,
                "ratios": ratios(scenario, floor_sum, carnet_sum, pairs),
            }

        if args.profile:
            results["profiles"] = {}
            for scenario in args.scenarios:
                path = profile(args, servers["carnet"], scenario,
                               ids_file if scenario == "read" else seeds_files["carnet"], token)
                summary = profile_summary(path)
                results["profiles"][scenario] = {"file": str(path.relative_to(ROOT)), **summary}
                print(f"\n[profile] Carnet {scenario}: {path.relative_to(ROOT)}, {summary['samples']} samples "
                      "(GIL held); share of samples:")
                for name, share in summary.get("buckets_pct", {}).items():
                    print(f"  {share:5.1f}%  {name}")
                print("  top app/ frames (inclusive):")
                for name, share in summary.get("top_app_frames_pct", []):
                    print(f"  {share:5.1f}%  {name}")
    finally:
        for server in servers.values():
            server.stop()
        if not args.keep_db:
            asyncio.run(drop_database(args.pg, args.db))

    results["meta"] = {
        "date": started_at.isoformat(timespec="seconds"),
        "command": " ".join([Path(PYTHON).relative_to(ROOT).as_posix() if Path(PYTHON).is_relative_to(ROOT) else PYTHON,
                             *sys.argv]),
        "client": args.client, "wrk_threads": args.wrk_threads if args.client == "wrk" else None,
        "concurrency": args.concurrency, "seconds_per_slice": args.seconds, "rounds": args.rounds,
        "warmup_s": args.warmup, "order": "ABBA (floor, carnet, carnet, floor, ...)",
        "seed_rows": args.seed_rows, "upsert_repeat_ratio": args.repeat_ratio,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "servers": "uvicorn, 1 worker each, uvloop + httptools, --no-access-log; Carnet LOG_LEVEL=WARNING",
        "carnet_app": args.carnet_app, "carnet_env": args.carnet_env,
        "baseline": {"carnet_env": args.baseline_env} if args.baseline_env else "raw floor (bench/floor_app.py)",
        "wall_time_s": round(time.monotonic() - t0, 1),
    }
    results["meta"]["code_fingerprint"] = code_fingerprint()
    warnings = [ln for ln in servers["carnet"].log.read_text(errors="replace").splitlines() if ln.strip()]
    results["meta"]["carnet_server_log_lines"] = warnings[-20:]
    failed = {f"{sc}/{sy}": res[sy]["errors"] for sc, res in results["scenarios"].items()
              for sy in ("floor", "carnet") if res[sy]["errors"]}
    results["valid"] = not failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    if warnings:
        print(f"\nnote: Carnet logged {len(warnings)} line(s) at WARNING or above, e.g. {warnings[-1][:200]}")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
          f"in {results['meta']['wall_time_s']}s")
    if failed:
        sys.exit(f"bench_api: INVALID RUN, requests failed: {failed} (429? rate limit; 5xx? see bench/out/*.log)")


def code_fingerprint() -> str:
    """sha256 of app/ and alembic/ sources: which code was measured (the tree moves under our feet)."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("app/**/*.py"), *ROOT.glob("alembic/**/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    main()
