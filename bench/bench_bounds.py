"""5 MB bodies of bad items against a valid request of the same size, side by side (issue 15, class 2).

    .venv/bin/python bench/bench_bounds.py              # ~2 min; results in bench/out/bounds.json
    .venv/bin/python bench/bench_bounds.py --rounds 9

One fresh database and one `carnet serve` with its default body limit (5 MB); every request is just under it. In
each round, in an order shuffled per round (drift and neighbours hit every kind alike), one request of each kind:

- `valid batch` (the reference): `POST /v1/contacts/batch` of 1,000 new contacts (the most a batch takes), each
  with two 2,000-character text attributes and five tags: a real 5 MB request, parsed, validated and stored;
- `valid preview, padded`: a one-condition preview padded with JSON whitespace to 5 MB (same route as the first
  attack: what reading and parsing 5 MB of bytes costs when they hold almost no JSON values);
- the attacks, 5 MB each: a viewer's preview `{"filter": {"all": [{}, {}, ...]}}` (1.7M members), `POST /v1/tokens`
  with 330k `scopes`, `/v1/lists/{id}/members/batch` with 130k ids in `add`, `POST /v1/contacts/batch` with 300k
  items, `PUT /v1/orders/{id}` with 1,000 lines of three faulty fields padded to 5 MB (3,000 errors found), and
  `POST /v1/events` with 1.2M values in `properties`.

Reported per kind: status, answer size, median time; its median over the valid batch's (the bar: under 3x, and
every answer under 64 KB; exit 1 when missed), and over the padded preview's (for information: what a refusal
costs beyond reading 5 MB, i.e. mostly building the body's JSON values, which Python's parser does before any
validator can look).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from load_mixed import recreate_database, run_context, start_server, with_database  # noqa: E402

from app.security import Role  # noqa: E402
from app.security.tokens import issue_access_token  # noqa: E402

OUT = ROOT / "bench" / "out"
LIMIT = 5 * 1024 * 1024  # the server's default MAX_BODY_BYTES
SIZE = LIMIT - 4096       # every body: just under it
BAR_RATIO, BAR_BYTES = 3.0, 64 * 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="rounds of one request of each kind (default 5)")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--db", default="carnet_bounds_bench")
    p.add_argument("--out", type=Path, default=OUT / "bounds.json")
    return p.parse_args()


def _pad(body: str, closing: str) -> bytes:
    """`body` + spaces + `closing`, SIZE bytes in all (JSON whitespace: the same document)."""
    return (body + " " * (SIZE - len(body) - len(closing)) + closing).encode()


def _repeat(opening: str, item: str, closing: str) -> bytes:
    """opening + item,item,... + closing, as close to SIZE as whole items allow, then padded."""
    count = (SIZE - len(opening) - len(closing)) // (len(item) + 1)
    return _pad(opening + ",".join([item] * count), closing)


def _valid_batch(round_: int) -> bytes:
    note = "n" * 2000
    items = [{"email": f"bench-{round_}-{i}-{uuid.uuid4().hex[:6]}@shop.example", "first_name": "Claire",
              "last_name": "Martin", "company": "Atelier", "address": {"city": "Lyon", "country": "FR"},
              "tags": ["newsletter", "vip", "lyon", "bench", f"round-{round_}"],
              "attributes": {"notes": note, "story": note}} for i in range(1000)]
    body = json.dumps({"items": items})
    assert len(body) <= SIZE, len(body)
    return _pad(body[:-1], "}")


def _bad_order_lines() -> bytes:
    line = {"sku": "", "quantity": 0, "unit_price": "-1", "name": "x" * 4000}
    order = {"contact": {"email": "a@shop.example"}, "placed_at": "2026-01-01T00:00:00Z", "status": "paid",
             "currency": "EUR", "total_amount": "1", "items": [line] * 1000}
    body = json.dumps(order)
    assert len(body) <= SIZE, len(body)
    return _pad(body[:-1], "}")


def bodies(list_id: str) -> dict[str, tuple[str, str, str, Any]]:
    """kind → (method, path, token role, body or a body factory taking the round)."""
    preview = '{"filter": {"field": "kind", "op": "eq", "value": "customer"}'
    return {
        "valid batch": ("POST", "/v1/contacts/batch", "admin", _valid_batch),
        "valid preview, padded": ("POST", "/v1/segments/preview", "viewer", _pad(preview, "}")),
        "preview of 1.7M {}": ("POST", "/v1/segments/preview", "viewer", _repeat('{"filter": {"all": [', "{}", "]}}")),
        "token with 330k scopes": ("POST", "/v1/tokens", "admin", _repeat(
            '{"subject": "x@shop.example", "role": "viewer", "scopes": [', '"contacts:read"', "]}")),
        "member batch of 130k ids": ("POST", f"/v1/lists/{list_id}/members/batch", "admin", _repeat(
            '{"add": [', f'"{uuid.uuid4()}"', "]}")),
        "contact batch of 300k items": ("POST", "/v1/contacts/batch", "admin", _repeat(
            '{"items": [', '{"email": "x"}', "]}")),
        "order of 3,000 faulty fields": ("PUT", "/v1/orders/bench-bad", "admin", _bad_order_lines()),
        "event with 1.2M property values": ("POST", "/v1/events", "admin", _repeat(
            '{"contact": {"email": "a@shop.example"}, "type": "page_view", "occurred_at": "2026-01-01T00:00:00Z", '
            '"properties": {"items": [', "1", "]}}")),
    }


def run(base_url: str, secret: str, rounds: int) -> dict[str, Any]:
    tokens = {role: issue_access_token(secret, subject=f"{role}@bench.example", role=Role(role),
                                       ttl_seconds=3600).token for role in ("admin", "viewer")}
    with httpx.Client(base_url=base_url, timeout=120) as client:
        admin = {"Authorization": f"Bearer {tokens['admin']}"}
        for name in ("notes", "story"):
            client.post("/v1/attributes", headers=admin, json={"name": name, "type": "text"}).raise_for_status()
        list_id = client.post("/v1/lists", headers=admin, json={"name": "bench"}).json()["id"]
        kinds = bodies(list_id)
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        answers: dict[str, dict[str, Any]] = {}
        order = list(kinds)
        for round_ in range(rounds + 1):  # round 0 warms up (connections, caches); not counted
            random.Random(round_).shuffle(order)
            for kind in order:
                method, path, role, body = kinds[kind]
                content = body(round_) if callable(body) else body
                assert len(content) <= LIMIT
                headers = {"Authorization": f"Bearer {tokens[role]}", "Content-Type": "application/json"}
                started = time.perf_counter()
                answer = client.request(method, path, content=content, headers=headers)
                elapsed = time.perf_counter() - started
                if round_:
                    samples[kind].append(elapsed)
                answers[kind] = {"status": answer.status_code, "bytes": len(answer.content),
                                 "body_bytes": len(content),
                                 "first_error": (answer.json().get("errors") or [{}])[0]
                                 if answer.status_code >= 400 else None}
    reference = statistics.median(samples["valid batch"])
    floor = statistics.median(samples["valid preview, padded"])
    result: dict[str, Any] = {"kinds": {}}
    for kind, times in samples.items():
        median = statistics.median(times)
        result["kinds"][kind] = {**answers[kind], "median_ms": round(median * 1000, 1),
                                 "ratio_to_valid_batch": round(median / reference, 3),
                                 "ratio_to_padded_preview": round(median / floor, 2)}
    return result


def main() -> int:
    args = parse_args()
    url = with_database(args.pg, args.db)
    context = run_context(args)
    asyncio.run(recreate_database(args.pg, args.db))
    from app.migrations import upgrade

    upgrade(url)
    secret = secrets.token_urlsafe(40)
    workdir = Path(tempfile.mkdtemp(prefix="carnet-bounds-"))
    server = start_server(url, secret, workdir, None)  # default body limit; rate limits lifted for one token
    try:
        result = run(server.base_url, secret, args.rounds)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        asyncio.run(recreate_database(args.pg, args.db, drop_only=True))
    context["loadavg_after"] = os.getloadavg()
    result["context"] = context
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| request (5 MB) | status | answer bytes | median ms | x valid batch | x padded preview |\n"
          "|---|---:|---:|---:|---:|---:|")
    missed = []
    for kind, row in result["kinds"].items():
        print(f"| {kind} | {row['status']} | {row['bytes']:,} | {row['median_ms']} | {row['ratio_to_valid_batch']} | "
              f"{row['ratio_to_padded_preview']} |")
        if not kind.startswith("valid") and (row["status"] < 400 or row["bytes"] >= BAR_BYTES
                                             or row["ratio_to_valid_batch"] >= BAR_RATIO):
            missed.append(kind)
    print(f"\nbar: every attack refused (4xx) with an answer < 64 KB in < {BAR_RATIO}x the valid batch's time; "
          f"missed: {missed or 'none'}; load average before {context['loadavg_before']}, "
          f"after {context['loadavg_after']}; written to {args.out}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
