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
  `company contains` conditions (the issue's 4 KB body that ran 37.7 s on 300k contacts without a timeout);
- quiet and attack windows of --seconds each, in ABBA order over --rounds rounds (drift and neighbours hit both
  alike); between an attack window and the next quiet one, the previews still running server-side are waited for.

Reported: the victim's p50/p99 and 503s in each window kind, the ratio of the p99s (bar: <= 3x, and no 503), and the
attackers' outcomes (200, 429 costly-reads-per-token, 503 costly-reads-busy, 503 statement-timeout). Exit 1 when the
bar is missed. Results go to bench/out/costly.json. Other settings: `--server-env COSTLY_READS_PER_PROCESS=2`; the caps
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


async def victim(http: httpx.AsyncClient, ids: list[str], rate: float, seconds: float, window: Window) -> None:
    """Open loop: one read due every 1/rate s; latency from the due time (no coordinated omission)."""
    rng = random.Random(len(window.latencies))
    start = time.perf_counter()
    interval = 1 / rate
    tasks = []

    async def one(due: float) -> None:
        try:
            status = (await http.get(f"/v1/contacts/{rng.choice(ids)}")).status_code
        except httpx.TransportError:
            status = 0  # counted: the victim got no answer
        window.latencies.append(time.perf_counter() - due)
        window.statuses[status] += 1

    n = 0
    while (due := start + n * interval) < start + seconds:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
        n += 1
    await asyncio.gather(*tasks)


def attack(base_url: str, tokens: list[str], per_attacker: int, stop: Any, results: Any) -> None:
    """The crowd, in a process of its own: its client work must not slow the victim's client down."""

    async def crowd() -> Counter[str]:
        outcomes: Counter[str] = Counter()

        async def attacker(token: str) -> None:
            async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                                         timeout=120, limits=httpx.Limits(keepalive_expiry=KEEPALIVE)) as http:
                while not stop.is_set():
                    try:
                        response = await http.post("/v1/segments/preview", json=WORST_PREVIEW)
                    except httpx.TransportError as exc:
                        outcomes[type(exc).__name__] += 1
                        continue
                    slug = response.json().get("type", "").rsplit("/", 1)[-1] if response.status_code != 200 else ""
                    outcomes[f"{response.status_code} {slug}".strip()] += 1
                    if response.status_code != 200:  # honours Retry-After (a hostile client is refused anyway)
                        await asyncio.sleep(min(float(response.headers.get("retry-after", "1")), 2))

        await asyncio.gather(*[attacker(t) for t in tokens for _ in range(per_attacker)])
        return outcomes

    results.put(dict(asyncio.run(crowd())))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000, 2)


async def run(args: argparse.Namespace, base_url: str, ids: list[str], secret: str) -> dict[str, Any]:
    def token(subject: str) -> str:
        return issue_access_token(secret, subject=subject, role=Role.VIEWER, ttl_seconds=3600).token

    attackers = [token(f"attacker-{i}@bench") for i in range(args.attackers)]
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=KEEPALIVE)
    windows: list[Window] = []
    outcomes: Counter[str] = Counter()
    spawn = multiprocessing.get_context("spawn")
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token('victim@bench')}"},
                                 timeout=60, limits=limits) as http:
        await victim(http, ids, args.rate, 3, Window("warm-up"))
        order = [k for r in range(args.rounds) for k in (("quiet", "attack") if r % 2 == 0 else ("attack", "quiet"))]
        for kind in order:
            window = Window(kind)
            if kind == "quiet":
                await victim(http, ids, args.rate, args.seconds, window)
            else:
                stop, results = spawn.Event(), spawn.Queue()
                crowd = spawn.Process(target=attack, args=(base_url, attackers, args.per_attacker, stop, results))
                crowd.start()
                await asyncio.sleep(5)  # the previews are running when the window opens
                await victim(http, ids, args.rate, args.seconds, window)
                stop.set()  # what still runs server-side ends before the next window
                outcomes.update(await asyncio.to_thread(results.get))
                crowd.join()
            windows.append(window)
            print(f"  {kind:6} p50 {pct(window.latencies, 50)} ms  p99 {pct(window.latencies, 99)} ms  "
                  f"statuses {dict(window.statuses)}", file=sys.stderr)
    by_kind = {k: [lat for w in windows if w.kind == k for lat in w.latencies] for k in ("quiet", "attack")}
    statuses = {k: sum((w.statuses for w in windows if w.kind == k), Counter()) for k in ("quiet", "attack")}
    p99 = {k: pct(v, 99) for k, v in by_kind.items()}
    ratio = round(p99["attack"] / p99["quiet"], 2) if p99["quiet"] and p99["attack"] else None
    return {
        "victim": {k: {"reads": len(v), "p50_ms": pct(v, 50), "p99_ms": p99[k], "max_ms": pct(v, 100),
                       "statuses": {str(s): n for s, n in statuses[k].items()},
                       "rounds_p99_ms": [pct(w.latencies, 99) for w in windows if w.kind == k]}
                   for k, v in by_kind.items()},
        "p99_ratio_attack_over_quiet": ratio,
        "victim_503s": statuses["attack"][503] + statuses["quiet"][503],
        "attackers": dict(outcomes),
    }


def main() -> int:
    args = parse_args()
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
        result = asyncio.run(run(args, server.base_url, ids, secret))
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
    print(f"\np99 under attack / quiet: {result['p99_ratio_attack_over_quiet']}x (bar <= 3x); "
          f"victim 503s: {result['victim_503s']} (bar 0); attackers: {result['attackers']}")
    print(f"written to {args.out}; load average before {context['loadavg_before']}, after {context['loadavg_after']}")
    ratio = result["p99_ratio_attack_over_quiet"]
    return 0 if ratio is not None and ratio <= 3 and result["victim_503s"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
