"""Contact reads while a crowd of viewers runs worst-case previews (issue 15, class 3): p99 ratio, 503s.

    .venv/bin/python bench/bench_costly.py                        # ~6 min: 300k contacts, 20 attackers, 3 rounds
    .venv/bin/python bench/bench_costly.py --reuse-db --keep-db   # iterate without reloading the contacts

What it does, in one run:

- a database `carnet_costly_bench` on --pg with --contacts contacts (COPY, as bench/load_mixed.py seeds them), each
  with a company name that all the attack's conditions match; a fresh `carnet serve` (one uvicorn process, default
  settings: rate limit, costly-read caps, timeouts);
- the victim: another viewer token reading `GET /v1/contacts/{id}` at a fixed rate (--rate per second, open loop:
  each latency counts from the moment the request was due, so a stalled server shows, it is not hidden by a client
  that waits);
- the attack: --attackers viewer tokens, each sending --per-attacker previews at a time in a loop, each preview 100
  `company contains` conditions (the issue's 4 KB body that ran 37.7 s on 300k contacts without a timeout), from a
  process in a session of its own (see `attack`); an attack window opens 5 s after the server first answered it;
- quiet and attack windows of --seconds each, in ABBA order over --rounds rounds (drift and neighbours hit both
  alike); between an attack window and the next quiet one, the previews still running server-side are waited for.

Reported: the victim's p50/p99 and 503s in each window kind (and the p99 of the same reads inside the server, from its
latency histogram: what the client saw beyond it was spent outside the server), the ratio of the p99s (bar: <= 3x,
and no 503), the cores used by the server and the whole machine, and the attackers' outcomes (200, 429
costly-reads-per-token, 503 costly-reads-busy, 503 statement-timeout). Exit 1 when the bar is missed.
The bench runs in a session of its own (`in_own_session`; `--shared-sessions`: as before). Results go to
bench/out/costly.json. Other settings: `--server-env COSTLY_READS_PER_PROCESS=2`; the caps
lifted (the pre-fix behaviour, minus the timeout): `--server-env COSTLY_READS_PER_TOKEN=1000
--server-env COSTLY_READS_PER_PROCESS=19`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from load_mixed import recreate_database, run_context, seed_contacts, start_server, with_database  # noqa: E402

from app.db import plain_dsn  # noqa: E402
from app.security import Role  # noqa: E402
from app.security.tokens import issue_access_token  # noqa: E402

OUT = ROOT / "bench" / "out"
COMPANY = ("the quick brown fox jumps over the lazy dog while five boxing wizards jump quickly past "
           "sphinx of black quartz")
# 100 distinct needles every company holds: an `all` of them tests each one on every row.
NEEDLES = list(dict.fromkeys(COMPANY[i:i + 4] for i in range(len(COMPANY) - 3)))[:100]
# Below uvicorn's 5 s keep-alive: a connection the server is closing is never reused (no spurious ReadError).
KEEPALIVE = 2.0
WORST_PREVIEW = {"filter": {"all": [{"field": "company", "op": "contains", "value": n} for n in NEEDLES]}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contacts", type=int, default=300_000)
    p.add_argument("--attackers", type=int, default=20, help="viewer tokens running previews (default 20)")
    p.add_argument("--per-attacker", type=int, default=3, help="previews in flight per attacker token (default 3)")
    p.add_argument("--rate", type=float, default=50, help="victim reads per second (default 50)")
    p.add_argument("--seconds", type=float, default=20, help="length of each measured window (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="ABBA rounds: quiet, attack, attack, quiet (default 3)")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--db", default="carnet_costly_bench")
    p.add_argument("--reuse-db", action="store_true", help="keep the database if it already has --contacts contacts")
    p.add_argument("--keep-db", action="store_true", help="do not drop the database at the end")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="extra server setting")
    p.add_argument("--out", type=Path, default=OUT / "costly.json")
    p.add_argument("--shared-sessions", action="store_true",
                   help="run the victim's client and the crowd in the session of the shell that started the bench, "
                        "as before (the crowd's CPU, and the shell's other jobs, then delay the victim's client)")
    p.add_argument("--timeline", action="store_true",
                   help="also write every victim read, attacker answer and CPU sample with its time (diagnosis)")
    return p.parse_args()


async def prepare_database(args: argparse.Namespace, url: str) -> list[str]:
    """The contacts' ids, loading them first unless --reuse-db finds them there."""
    if args.reuse_db:
        try:
            conn = await asyncpg.connect(plain_dsn(url), timeout=10)
        except (OSError, asyncpg.PostgresError):
            conn = None
        if conn is not None:
            try:
                ids = [str(r["id"]) for r in await conn.fetch("SELECT id FROM contact WHERE company IS NOT NULL")]
            finally:
                await conn.close()
            if len(ids) == args.contacts:
                return ids
    await recreate_database(args.pg, args.db)
    from app.migrations import upgrade

    await asyncio.to_thread(upgrade, url)
    contacts = await seed_contacts(url, args.contacts)
    conn = await asyncpg.connect(plain_dsn(url), timeout=10)
    try:
        await conn.execute("UPDATE contact SET company = $1 || ' ' || external_id", COMPANY)
        await conn.execute("VACUUM ANALYZE contact")
    finally:
        await conn.close()
    return [c.id for c in contacts]


@dataclass
class Window:
    kind: str  # quiet | attack
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    reads: list[tuple[float, float]] = field(default_factory=list)  # (wall time when due, latency s), for --timeline
    server_p99: str | None = None  # the same reads as the server timed them (its histogram's bucket)
    cpu: list[tuple[float, float, float]] = field(default_factory=list)  # (wall time, server cores, machine cores)


def _cpu_seconds(group: int) -> tuple[float, float]:
    """CPU seconds used so far by the server's process group, and by the whole machine (busy, not idle)."""
    tick = os.sysconf("SC_CLK_TCK")
    server = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group:  # pgrp: `carnet serve` runs in a session of its own
                server += int(fields[11]) + int(fields[12])
    total = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return server / tick, (sum(total) - total[3] - total[4]) / tick


_READ_BUCKETS = 'carnet_http_request_duration_seconds_bucket{le="'


async def server_read_buckets(base_url: str) -> dict[str, float]:
    """The server's own latency histogram of contact reads (cumulative counts by bucket bound, seconds)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        text = (await http.get("/metrics")).text
    counts = {}
    for line in text.splitlines():
        if line.startswith(_READ_BUCKETS) and 'method="GET",route="/v1/contacts/{contact_id}",status="200"' in line:
            counts[line[len(_READ_BUCKETS):].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def server_p99(before: dict[str, float], after: dict[str, float]) -> str | None:
    """The bucket bound under which 99% of the window's contact reads were handled inside the server."""
    diff = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    total = diff.get("+Inf", 0)
    for le in sorted(diff, key=lambda b: float(b)):
        if total and diff[le] >= 0.99 * total:
            return f"<= {float(le) * 1000:g} ms"
    return None


async def sample_cpu(group: int, window: Window, every: float = 0.5) -> None:
    """Cores used by the server and by the whole machine, every `every` s (what else was running shows)."""
    before, at = await asyncio.to_thread(_cpu_seconds, group), time.time()  # a thread: the victim's loop stays free
    while True:
        await asyncio.sleep(every)
        now, t = await asyncio.to_thread(_cpu_seconds, group), time.time()
        window.cpu.append((t, (now[0] - before[0]) / (t - at), (now[1] - before[1]) / (t - at)))
        before, at = now, t


async def victim(http: httpx.AsyncClient, ids: list[str], rate: float, seconds: float, window: Window) -> None:
    """Open loop: one read due every 1/rate s; latency from the due time (no coordinated omission)."""
    rng = random.Random(len(window.latencies))
    start, wall = time.perf_counter(), time.time()
    interval = 1 / rate
    tasks = []

    async def one(due: float) -> None:
        try:
            status = (await http.get(f"/v1/contacts/{rng.choice(ids)}")).status_code
        except httpx.TransportError:
            status = 0  # counted: the victim got no answer
        window.latencies.append(time.perf_counter() - due)
        window.reads.append((wall + (due - start), window.latencies[-1]))
        window.statuses[status] += 1

    n = 0
    while (due := start + n * interval) < start + seconds:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
        n += 1
    await asyncio.gather(*tasks)


def attack(base_url: str, tokens: list[str], per_attacker: int, stop: Any, started: Any, results: Any,
           own_session: bool) -> None:
    """The crowd, in a process of its own: its client work must not slow the victim's client down.

    And in a session of its own: Linux (autogroup, on by default) shares the CPU fairly between sessions, then
    between the processes of a session. In the bench's session, each burst of the crowd's client work (twenty
    refused tokens retrying at once) took the victim's client off the CPU on a busy machine, and every read
    due meanwhile completed late, together: stalls of 0.3-20 s that the server's own timings did not show
    (docs/security.md, class 3). Real attackers do not share the victim's machine, let alone its session.
    """
    if own_session:
        os.setsid()
    parent = os.getppid()

    answered: list[tuple[float, str]] = []  # (wall time, outcome): when the server answered, for --timeline

    async def crowd() -> Counter[str]:
        outcomes: Counter[str] = Counter()

        async def attacker(token: str) -> None:
            async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                                         timeout=120, limits=httpx.Limits(keepalive_expiry=KEEPALIVE)) as http:
                while not stop.is_set() and os.getppid() == parent:  # the bench gone: stop too
                    try:
                        response = await http.post("/v1/segments/preview", json=WORST_PREVIEW)
                    except httpx.TransportError as exc:
                        outcomes[type(exc).__name__] += 1
                        continue
                    slug = response.json().get("type", "").rsplit("/", 1)[-1] if response.status_code != 200 else ""
                    outcomes[f"{response.status_code} {slug}".strip()] += 1
                    started.set()  # the server is answering the crowd: the attack is under way
                    answered.append((time.time(), f"{response.status_code} {slug}".strip()))
                    if response.status_code != 200:  # honours Retry-After (a hostile client is refused anyway)
                        await asyncio.sleep(min(float(response.headers.get("retry-after", "1")), 2))

        await asyncio.gather(*[attacker(t) for t in tokens for _ in range(per_attacker)])
        return outcomes

    outcomes = dict(asyncio.run(crowd()))
    results.put((outcomes, answered))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000, 2)


async def run(args: argparse.Namespace, base_url: str, ids: list[str], secret: str, group: int) -> dict[str, Any]:
    def token(subject: str) -> str:
        return issue_access_token(secret, subject=subject, role=Role.VIEWER, ttl_seconds=3600).token

    attackers = [token(f"attacker-{i}@bench") for i in range(args.attackers)]
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=KEEPALIVE)
    windows: list[Window] = []
    outcomes: Counter[str] = Counter()
    attacks: list[list[tuple[float, str]]] = []
    spawn = multiprocessing.get_context("spawn")
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token('victim@bench')}"},
                                 timeout=60, limits=limits) as http:
        await victim(http, ids, args.rate, 3, Window("warm-up"))
        order = [k for r in range(args.rounds) for k in (("quiet", "attack") if r % 2 == 0 else ("attack", "quiet"))]
        for kind in order:
            window = Window(kind)
            histogram = await server_read_buckets(base_url)
            if kind == "quiet":
                sampler = asyncio.create_task(sample_cpu(group, window))
                await victim(http, ids, args.rate, args.seconds, window)
            else:
                stop, started, results = spawn.Event(), spawn.Event(), spawn.Queue()
                crowd = spawn.Process(target=attack, args=(base_url, attackers, args.per_attacker, stop, started,
                                                           results, not args.shared_sessions))
                crowd.start()
                # The previews are running when the window opens. Timed from the crowd's first answer, not from its
                # start: on a busy machine the crowd's process took over 12 s to start, and the window then
                # measured its start-up instead of the attack.
                if not await asyncio.to_thread(started.wait, 300):
                    sys.exit("bench_costly: the crowd got no answer in 300 s")
                await asyncio.sleep(5)
                sampler = asyncio.create_task(sample_cpu(group, window))
                await victim(http, ids, args.rate, args.seconds, window)
                sampler.cancel()
                stop.set()  # what still runs server-side ends before the next window
                crowd_outcomes, answered = await asyncio.to_thread(results.get)
                outcomes.update(crowd_outcomes)
                attacks.append(answered)
                crowd.join()
            sampler.cancel()
            window.server_p99 = server_p99(histogram, await server_read_buckets(base_url))
            windows.append(window)
            print(f"  {kind:6} p50 {pct(window.latencies, 50)} ms  p99 {pct(window.latencies, 99)} ms  "
                  f"(in the server: p99 {window.server_p99})  statuses {dict(window.statuses)}", file=sys.stderr)
    by_kind = {k: [lat for w in windows if w.kind == k for lat in w.latencies] for k in ("quiet", "attack")}
    statuses = {k: sum((w.statuses for w in windows if w.kind == k), Counter()) for k in ("quiet", "attack")}
    p99 = {k: pct(v, 99) for k, v in by_kind.items()}
    ratio = round(p99["attack"] / p99["quiet"], 2) if p99["quiet"] and p99["attack"] else None
    return {
        "victim": {k: {"reads": len(v), "p50_ms": pct(v, 50), "p99_ms": p99[k], "max_ms": pct(v, 100),
                       "statuses": {str(s): n for s, n in statuses[k].items()},
                       "rounds_p99_ms": [pct(w.latencies, 99) for w in windows if w.kind == k],
                       "rounds_server_p99": [w.server_p99 for w in windows if w.kind == k]}
                   for k, v in by_kind.items()},
        "p99_ratio_attack_over_quiet": ratio,
        "victim_503s": statuses["attack"][503] + statuses["quiet"][503],
        "attackers": dict(outcomes),
        # Mean cores used while the victim was measured: by the API server, and by the whole machine (the rest is
        # the bench's clients, PostgreSQL and whatever else runs on it).
        "cores": {k: {"server": _mean([c[1] for w in windows if w.kind == k for c in w.cpu]),
                      "machine": _mean([c[2] for w in windows if w.kind == k for c in w.cpu])}
                  for k in ("quiet", "attack")},
        **({"timeline": {"windows": [{"kind": w.kind, "reads": w.reads, "cpu": w.cpu} for w in windows],
                         "attacks": attacks}} if args.timeline else {}),
    }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def in_own_session() -> None:
    """Go on in a session of our own (forking first if this process leads its process group, as under a shell).

    Linux (autogroup, on by default) shares the CPU fairly between sessions first. The server and PostgreSQL have
    theirs; the victim's client, left in the shell's session, shared one with everything else started from it (on
    the shared machine these runs were made on: other test suites), and was starved for seconds in quiet and attack
    windows alike while the server's own timings stayed low.
    """
    try:
        os.setsid()
        return
    except PermissionError:
        pass
    child = os.fork()  # before any thread or event loop exists
    if child == 0:
        os.setsid()
        return
    while True:
        try:
            _, status = os.waitpid(child, 0)
            sys.exit(os.waitstatus_to_exitcode(status))
        except KeyboardInterrupt:  # the terminal's Ctrl-C reaches only this process now: pass it on
            os.kill(child, signal.SIGINT)


def main() -> int:
    args = parse_args()
    if not args.shared_sessions:
        in_own_session()
    url = with_database(args.pg, args.db)
    context = run_context(args)
    t0 = time.monotonic()
    ids = asyncio.run(prepare_database(args, url))
    print(f"bench_costly: {len(ids)} contacts ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    secret = secrets.token_urlsafe(40)
    workdir = Path(tempfile.mkdtemp(prefix="carnet-costly-"))
    for item in args.server_env:  # start_server passes the environment on
        key, _, value = item.partition("=")
        os.environ[key] = value
    server = start_server(url, secret, workdir, None, one_token_load=False)  # every limit at its default
    try:
        result = asyncio.run(run(args, server.base_url, ids, secret, server.proc.pid))
    finally:
        server.stop()
        OUT.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(server.log, OUT / "costly_server.log")
        shutil.rmtree(workdir, ignore_errors=True)
        if not args.keep_db:
            asyncio.run(recreate_database(args.pg, args.db, drop_only=True))
    context["loadavg_after"] = os.getloadavg()
    result["context"] = context
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    quiet, attack = result["victim"]["quiet"], result["victim"]["attack"]
    print("\n| window | reads | p50 ms | p99 ms | 503s |\n|---|---:|---:|---:|---:|")
    for name, row in (("quiet", quiet), ("attack", attack)):
        print(f"| {name} | {row['reads']} | {row['p50_ms']} | {row['p99_ms']} | {row['statuses'].get('503', 0)} |")
    print(f"\ncores used, quiet / attack: server {result['cores']['quiet']['server']} / "
          f"{result['cores']['attack']['server']}, machine {result['cores']['quiet']['machine']} / "
          f"{result['cores']['attack']['machine']} (of {os.cpu_count()})")
    print(f"\np99 under attack / quiet: {result['p99_ratio_attack_over_quiet']}x (bar <= 3x); "
          f"victim 503s: {result['victim_503s']} (bar 0); attackers: {result['attackers']}")
    print(f"written to {args.out}; load average before {context['loadavg_before']}, after {context['loadavg_after']}")
    ratio = result["p99_ratio_attack_over_quiet"]
    return 0 if ratio is not None and ratio <= 3 and result["victim_503s"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
