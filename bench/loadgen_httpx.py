"""Fallback load generator for bench_api.py (`--client httpx`), for machines without wrk.

Closed loop like wrk: CONCURRENCY workers, each sending its next request as soon as the previous one
answers, for SECONDS. Prints the same `BENCH_JSON {...}` line as bench/wrk_bench.lua.
It costs far more CPU per request than wrk, and on a small machine it competes with the servers.

    python bench/loadgen_httpx.py CONFIG_JSON
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx


async def run(cfg: dict) -> dict:
    keys = [line for line in Path(cfg["keys_file"]).read_text().splitlines() if line]  # noqa: ASYNC240
    headers = {"Authorization": f"Bearer {cfg['token']}"} if cfg.get("token") else {}
    concurrency = cfg["concurrency"]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    hist: Counter[int] = Counter()
    statuses: Counter[int] = Counter()
    errors = Counter({"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0})
    sent_bytes = 0

    async with httpx.AsyncClient(base_url=cfg["base_url"], headers=headers, limits=limits, timeout=10) as client:
        started = time.perf_counter()
        deadline = started + cfg["seconds"]

        async def worker(wid: int) -> None:
            nonlocal sent_bytes
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                if cfg["mode"] == "read":
                    method, url, body = "GET", cfg["target"] + random.choice(keys), None
                else:
                    method, url = "POST", cfg["target"]
                    if random.random() < cfg["repeat_ratio"]:
                        ext, email = random.choice(keys).split(" ")
                        first = f"Again{wid}x{n}"
                    else:
                        ext = f"{cfg['tag']}-{wid}-{n}"
                        email, first = f"{ext}@new.bench-mail.com", "New"
                    body = {"external_id": ext, "email": email, "first_name": first, "last_name": "Bench",
                            "phone": "06 12 34 56 78"}
                t0 = time.perf_counter()
                try:
                    response = await client.request(method, url, json=body)
                except httpx.TimeoutException:
                    errors["timeout"] += 1
                    continue
                except httpx.ConnectError:
                    errors["connect"] += 1
                    continue
                except httpx.HTTPError:
                    errors["read"] += 1
                    continue
                hist[int((time.perf_counter() - t0) * 1e6)] += 1
                statuses[response.status_code] += 1
                sent_bytes += len(response.content)
                if response.status_code > 399:
                    errors["status"] += 1

        await asyncio.gather(*(worker(i + 1) for i in range(concurrency)))
        duration = time.perf_counter() - started
    return {
        "requests": sum(statuses.values()),
        "duration_us": int(duration * 1e6),
        "bytes": sent_bytes,
        "errors": dict(errors),
        "statuses": {str(k): v for k, v in statuses.items()},
        "hist": sorted(hist.items()),
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(cfg))
    else:
        result = uvloop.run(run(cfg))
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
