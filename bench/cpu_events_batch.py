"""The API's own CPU per event in `POST /v1/events/batch`, in-process: no HTTP server, no other process on the path.

    .venv/bin/python bench/cpu_events_batch.py [--batches 20] [--contacts 20000] [--db carnet_cpu_events] [--profile]

The app (its real lifespan and pools) is driven through httpx's ASGI transport with the batches of bench_events.py
(1,000 events each, contacts named by external_id), built before timing; the first batch warms up. Prints this
process's CPU microseconds per event (the app, plus httpx's small share: the bodies are ready-made and the answers
are not parsed), which is what the API processes spend per event in bench_events.py without uvicorn's HTTP parsing.
Run it on two checkouts one after the other (alternated: the machine is shared) to compare them; `--profile` shows
where the time goes with cProfile (slower: compare the shares, not the totals). The database is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import secrets
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_events import BATCH, events, recreate, setup  # noqa: E402

from app.main import create_app  # noqa: E402
from app.migrations import upgrade  # noqa: E402
from app.security import Role  # noqa: E402
from app.security.tokens import issue_access_token  # noqa: E402
from app.settings import Settings  # noqa: E402


async def measure(url: str, args: argparse.Namespace) -> float:
    secret = secrets.token_urlsafe(40)
    app = create_app(Settings(database_url=url, jwt_secret=secret, log_level="WARNING",  # type: ignore[arg-type]
                              rate_limit_per_second=1e6, rate_limit_burst=10**6, run_worker_in_api=False,
                              _env_file=None))  # type: ignore[call-arg]
    token = issue_access_token(secret, subject="bench", role=Role.INTEGRATION, ttl_seconds=3600).token
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    tag = time.time_ns()
    items = [{"contact": {"external_id": external_id}, "type": type_, "occurred_at": at.isoformat(),
              "event_id": f"cpu-{tag}-{n}", "properties": json.loads(props)}
             for n, external_id, type_, at, props in events((args.batches + 1) * BATCH, args.contacts, 12,
                                                            datetime.now(UTC))]
    bodies = [json.dumps({"items": items[i:i + BATCH]}).encode() for i in range(0, len(items), BATCH)]
    profile = cProfile.Profile()
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench") as http:

        async def post(body: bytes) -> None:
            response = await http.post("/v1/events/batch", content=body, headers=headers)
            if response.status_code != 200 or b'"errors":0' not in response.content:
                raise SystemExit(f"batch answered {response.status_code}: {response.text[:300]}")

        await post(bodies[0])  # warm-up: statement caches, first imports
        started = time.process_time()
        if args.profile:
            profile.enable()
        for body in bodies[1:]:
            await post(body)
        profile.disable()
        spent = time.process_time() - started
    if args.profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
    return spent / (args.batches * BATCH) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--contacts", type=int, default=20_000)
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--db", default="carnet_cpu_events")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    url = asyncio.run(recreate(args.server, args.db))
    try:
        upgrade(url)
        asyncio.run(setup(url, SimpleNamespace(contacts=args.contacts, months=12)))  # type: ignore[arg-type]
        per_event = asyncio.run(measure(url, args))
        print(f"{args.batches * BATCH} events: {per_event:.1f} us of this process's CPU per event "
              f"(load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    finally:
        asyncio.run(recreate(args.server, args.db, drop_only=True))


if __name__ == "__main__":
    main()
