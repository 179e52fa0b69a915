"""A count among other conditions, counted per contact and grouped from the rows, on the segment bench's database.

    .venv/bin/python bench/segment_forms.py --db carnet_bench_seg [--runs 3]

For a filter "N orders or more within D days" with another condition that leaves many or few contacts, both
forms of `segments._compile` (counting "per_contact" and "grouped") run alternately on one connection; it prints
the medians, the planner's costs the choice reads (`segments._groups_better`) and the form chosen. Run it after
`bench/bench_segments.py --keep-db` (1M contacts, 3M orders). The same counts in both forms are checked.
`--members`: the members' ids as a sync refresh reads them (`segments.members_condition`), the count alone too.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.services import segments  # noqa: E402

REPEAT = {"field": "orders.count", "op": "gte", "value": 2, "within_days": 365}
OTHERS: dict[str, list[dict[str, Any]]] = {
    "country FR (all)": [{"field": "address.country", "op": "eq", "value": "FR"}],
    "kind customer (59%)": [{"field": "kind", "op": "eq", "value": "customer"}],
    "not tag vip (95%)": [{"not": {"field": "tags", "op": "contains", "value": "vip"}}],
    "city Paris": [{"field": "address.city", "op": "eq", "value": "Paris"}],
    "city Lyon": [{"field": "address.city", "op": "eq", "value": "Lyon"}],
    "tag vip": [{"field": "tags", "op": "contains", "value": "vip"}],
    "tag vip, city Lyon (the bar's)": [{"field": "tags", "op": "contains", "value": "vip"},
                                       {"field": "address.city", "op": "eq", "value": "Lyon"}],
}


async def _timed(connection: asyncpg.Connection, statement: Any, now: datetime) -> tuple[float, int]:
    started = time.perf_counter()
    count = await connection.fetchval(statement.sql, *statement.arguments(now))
    return time.perf_counter() - started, int(count)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--db", default="carnet_bench_seg")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--within-days", type=int, default=365, help="0: lifetime")
    p.add_argument("--members", action="store_true",
                   help="the members' ids as a sync refresh reads them, the count alone among the cases too")
    args = p.parse_args()
    connection = await asyncpg.connect(f"{args.pg}/{args.db}")
    now = datetime.now(UTC)
    repeat = {**REPEAT, "within_days": args.within_days} if args.within_days else \
        {k: v for k, v in REPEAT.items() if k != "within_days"}
    window = f"within {args.within_days} days" if args.within_days else "lifetime"
    print(f"orders.count gte 2 {window}, with:")
    print(f"{'other conditions':34} {'per contact':>12} {'grouped':>10} {'cost per contact':>17} {'cost grouped':>13}"
          f" {'chosen':>12} {'count':>8}")
    cases = {"(alone)": [], **OTHERS} if args.members else OTHERS
    for name, others in cases.items():
        filter_ = {"all": [repeat, *others]}
        compiled = segments._compile(filter_, {}, now)
        if args.members:  # what a sync refresh reads: every member's id (segments.members_condition)
            def members(c: Any) -> Any:
                return select(func.count()).select_from(select(segments._t.c.id).where(c.expression).subquery())

            grouped_filter, groups_better = segments._grouped_twin(compiled, filter_, {}, now, members)
            per_contact, by_group = (segments._Statement.of(members(c), c.clock) for c in (compiled, grouped_filter))
        else:
            per_contact = segments._Statement.of(compiled.counting(), compiled.clock)
            grouped, clock, groups_better = segments._other_form(compiled, filter_, {}, now)  # type: ignore[misc]
            by_group = segments._Statement.of(grouped, clock)
        times: dict[str, list[float]] = {"per": [], "grouped": []}
        counts = set()
        for _ in range(args.runs):
            for form, statement in (("per", per_contact), ("grouped", by_group)):
                seconds, count = await _timed(connection, statement, now)
                times[form].append(seconds)
                counts.add(count)
        if len(counts) != 1:
            raise SystemExit(f"{name}: the two forms disagree: {counts}")
        costs = [await segments._estimated_cost(connection, st, now) for st in (per_contact, by_group)]
        chosen = "grouped" if await groups_better(connection, now) else "per contact"
        print(f"{name:34} {statistics.median(times['per']):11.3f}s {statistics.median(times['grouped']):9.3f}s"
              f" {costs[0]:17,.0f} {costs[1]:13,.0f} {chosen:>12} {counts.pop():8,}")
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main())
