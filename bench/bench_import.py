"""CSV import at scale: Carnet's import vs a raw `\\copy` of the same file, side by side, in one run.

    .venv/bin/python bench/bench_import.py [--rows 1000000] [--db NAME] [--keep-db] [--keep-file]

What it does:
  1. Generates a CSV as a French shop's Excel export: `;`, UTF-8 with BOM, columns Nom; Prénom; E-mail;
     Téléphone (80% filled, national format); Code postal; Ville; Société (30%); Date de naissance
     (dd/mm/yyyy, 60%); 0.5% of rows carry a bad email or phone (Carnet rejects them). Emails are unique,
     so that the raw `\\copy` into a table with a unique index can load every line.
  2. (Re)creates the database `carnet_bench_import` (or --db NAME, so that benches running at the same time on
     one server do not drop each other's database), runs Carnet's migrations.
  3. Floor: `psql -c "\\copy bare FROM file CSV HEADER"` into a bare table with the same primary key
     (uuid, default gen_random_uuid()) and a unique index on lower(email). Wall time and peak RSS (psql).
  4. Carnet: `carnet import FILE` (a subprocess: upload into import_chunk, parse + validate in worker
     processes, COPY into staging, set-based writes into contact with history and outbox rows).
     Wall time and peak RSS of the whole process tree (the command and its validating processes), sampled
     every 20 ms from /proc (bench/procfs.py). PostgreSQL's own memory is in neither number.
  5. Prints both, the ratios (bars: <= 3x wall time, <= 300 MB RSS), writes bench/out/import.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import asyncpg
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.migrations import upgrade  # noqa: E402
from bench.procfs import DbCpu, TreeRss  # noqa: E402

FIRST = ["Camille", "Léa", "Hélène", "François", "Zoé", "Noël", "Chloé", "Jérôme", "Anaïs", "Loïc", "Inès", "Marc"]
LAST = ["Martin", "Bernard", "Lefèvre", "Dubois", "Moreau", "Laurent", "Girard", "Rousseau", "Fontaine", "Mercier"]
CITIES = [("75011", "Paris"), ("69003", "Lyon"), ("13008", "Marseille"), ("25000", "Besançon"),
          ("31000", "Toulouse"), ("44000", "Nantes"), ("67000", "Strasbourg"), ("59000", "Lille")]
ASCII_FIRST = [unicodedata.normalize("NFKD", n).encode("ascii", "ignore").decode().lower() for n in FIRST]
ASCII_LAST = [unicodedata.normalize("NFKD", n).encode("ascii", "ignore").decode().lower() for n in LAST]
COMPANIES = ["Café des Arts", "Boulangerie Saint-Éloi", "Garage Dupré", "Atelier Noé"]


def generate(path: Path, rows: int) -> None:
    rnd = random.Random(42)
    with path.open("w", encoding="utf-8-sig", newline="") as out:
        out.write("Nom;Prénom;E-mail;Téléphone;Code postal;Ville;Société;Date de naissance\r\n")
        for i in range(rows):
            postal, city = CITIES[i % len(CITIES)]
            email = f"{ASCII_FIRST[i % 12]}.{ASCII_LAST[i % 10]}{i}@exemple.fr"
            phone = f"0{6 + i % 2} {80 + i // 1000000 % 20} {i // 10000 % 100:02d} {i // 100 % 100:02d} {i % 100:02d}" \
                if rnd.random() < 0.8 else ""
            if i % 200 == 7:
                email = f"bad{i}@@exemple.fr"
            elif i % 200 == 107:
                phone = "01 23"
            company = COMPANIES[i % 4] if rnd.random() < 0.3 else ""
            birth = f"{rnd.randint(1, 28):02d}/{rnd.randint(1, 12):02d}/{rnd.randint(1940, 2005)}" \
                if rnd.random() < 0.6 else ""
            out.write(f"{LAST[i % 10]};{FIRST[i % 12]};{email};{phone};{postal};{city};{company};{birth}\r\n")


def postgres_cpu() -> float:
    """CPU seconds used so far by the PostgreSQL servers on this machine: each postmaster's own, its live children's
    (backends, WAL writer, checkpointer) and its exited children's (a backend whose connection closed)."""
    total = 0.0
    for process in psutil.process_iter(["name", "ppid"]):
        if process.info["name"] not in ("postgres", "postmaster"):
            continue
        try:
            times = process.cpu_times()
            parent = psutil.Process(process.info["ppid"]).name()
        except psutil.Error:
            continue
        total += times.user + times.system
        if parent not in ("postgres", "postmaster"):  # the postmaster: its waited-for children too
            total += times.children_user + times.children_system
    return total


class CpuSplit:
    """CPU seconds of one phase: PostgreSQL's processes (all of them, and the bench database's backends alone), and
    this bench's children (the command under test)."""

    def __init__(self, db: str) -> None:
        self.db = db

    def __enter__(self) -> CpuSplit:
        self._pg, self._children = postgres_cpu(), _children_cpu()
        self._backends = DbCpu(self.db)
        self._backends.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._backends.stop()
        self.backends = self._backends.seconds
        self.postgres = round(postgres_cpu() - self._pg, 1)
        self.client = round(_children_cpu() - self._children, 1)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str, list[int]]:
    started = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    rss = TreeRss(process.pid)
    rss.start()
    out, err = process.communicate()
    elapsed = time.perf_counter() - started
    rss.stop()
    peak = rss.peak
    if process.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({process.returncode}):\n{out}\n{err}")
    return elapsed, peak, out, sorted(rss.per_process.values(), reverse=True)


async def recreate(server: str, db: str) -> str:
    admin = await asyncpg.connect(server.rsplit("/", 1)[0] + "/postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{db}"')
    await admin.close()
    return server.rsplit("/", 1)[0] + f"/{db}"


async def prepare_bare(url: str) -> None:
    conn = await asyncpg.connect(url)
    await conn.execute("DROP TABLE IF EXISTS bare")
    await conn.execute("""CREATE TABLE bare (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), last_name text,
        first_name text, email text, phone text, postal_code text, city text, company text, birth text)""")
    await conn.execute("CREATE UNIQUE INDEX bare_email ON bare (lower(email))")
    await conn.execute("CHECKPOINT")
    await conn.close()


async def drop_secondary_indexes(url: str) -> None:
    """--only-key-indexes (a what-if on the bench database, never a migration)."""
    conn = await asyncpg.connect(url)
    names = [r["indexname"] for r in await conn.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'contact' "
        "AND indexname NOT IN ('pk_contact', 'uq_contact_email', 'uq_contact_external_id')")]
    for name in names:
        await conn.execute(f'DROP INDEX "{name}"')
    print(f"what-if: dropped {len(names)} indexes of contact: {', '.join(sorted(names))}", flush=True)
    await conn.close()


async def prepare_contact_copy(url: str) -> None:
    """Empty Carnet's tables and give `contact` the defaults a bare \\copy needs (bench database only)."""
    conn = await asyncpg.connect(url)
    await conn.execute("TRUNCATE contact, contact_history, outbox_message, import_job CASCADE")
    # Time-ordered ids, as the import's (app/ids.py): random ones would make this floor ~1.5x dearer.
    time_ordered = ("(lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') || '7' "
                    "|| substr(md5(random()::text), 1, 19))::uuid")
    for column, default in (("id", time_ordered), ("email_status", "'unverified'"), ("kind", "'prospect'"),
                            ("lifecycle_stage", "'prospect'"), ("version", "1"), ("created_at", "now()"),
                            ("updated_at", "now()")):
        await conn.execute(f"ALTER TABLE contact ALTER COLUMN {column} SET DEFAULT {default}")
    await conn.execute("CHECKPOINT")
    await conn.close()


async def counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    out = {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in
           ("bare", "contact", "contact_history", "outbox_message", "import_reject")}
    out["contact_indexes"] = await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE tablename = 'contact'")
    await conn.execute("CHECKPOINT")
    await conn.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--server", default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--db", default="carnet_bench_import", help="the bench database (dropped and recreated)")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--keep-file", action="store_true")
    parser.add_argument("--only-key-indexes", action="store_true",
                        help="what-if: drop every index of `contact` but the primary key and the unique email and "
                             "external_id ones before measuring (the API's search, sorts, filters and duplicate "
                             "finder would lose theirs): how much of the gap to the floor the indexes are")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    workdir = Path(tempfile.mkdtemp(prefix="carnet-bench-import-"))
    path = workdir / "clients.csv"
    started = time.perf_counter()
    generate(path, args.rows)
    print(f"generated {args.rows} rows, {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s",
          flush=True)
    url = asyncio.run(recreate(args.server, args.db))
    upgrade(url)
    if args.only_key_indexes:
        asyncio.run(drop_secondary_indexes(url))
    asyncio.run(prepare_bare(url))
    env = {**os.environ, "DATABASE_URL": url, "JWT_SECRET": "bench-" + "x" * 40, "LOG_JSON": "true",
           "PGOPTIONS": "-c client_min_messages=warning"}

    with CpuSplit(args.db) as raw_cpu:
        raw_s, raw_rss, _, _ = timed(["psql", url, "-v", "ON_ERROR_STOP=1", "-c",
                                   f"\\copy bare (last_name, first_name, email, phone, postal_code, city, company, "
                                   f"birth) FROM '{path}' "
                                   "WITH (FORMAT csv, HEADER true, DELIMITER ';', ENCODING 'UTF8')"], env)
    print(f"raw \\copy: {raw_s:.2f} s, peak RSS {raw_rss / 1e6:.0f} MB; CPU s: PostgreSQL {raw_cpu.postgres} "
          f"(this database's backends {raw_cpu.backends}), psql {raw_cpu.client}", flush=True)

    with CpuSplit(args.db) as carnet_cpu:
        carnet_s, carnet_rss, out, processes = timed([sys.executable, "-m", "app", "import", str(path)], env)
    print(out.strip().splitlines()[-2] if out.strip() else "", flush=True)
    print(f"carnet import: {carnet_s:.2f} s, peak RSS {carnet_rss / 1e6:.0f} MB "
          f"(per process: {', '.join(f'{p / 1e6:.0f}' for p in processes)} MB); CPU s: PostgreSQL "
          f"{carnet_cpu.postgres} (this database's backends {carnet_cpu.backends}), Carnet's processes "
          f"{carnet_cpu.client}", flush=True)
    tables = asyncio.run(counts(url))

    # A second floor: the same raw \copy into Carnet's real `contact` table (all its indexes), no validation.
    asyncio.run(prepare_contact_copy(url))
    with CpuSplit(args.db) as table_cpu:
        table_s, _, _, _ = timed(["psql", url, "-v", "ON_ERROR_STOP=1", "-c",
                                  f"\\copy contact (last_name, first_name, email, phone, postal_code, city, company, "
                                  f"birth_date) FROM '{path}' "
                                  "WITH (FORMAT csv, HEADER true, DELIMITER ';', ENCODING 'UTF8')"],
                                 {**env, "PGOPTIONS": "-c datestyle=ISO,DMY"})
    print(f"raw \\copy into contact: {table_s:.2f} s; CPU s: PostgreSQL {table_cpu.postgres} (this database's "
          f"backends {table_cpu.backends})", flush=True)

    result = {
        "rows": args.rows, "file_mb": round(path.stat().st_size / 1e6, 1),
        "raw_copy_seconds": round(raw_s, 2), "raw_copy_rss_mb": round(raw_rss / 1e6),
        "carnet_seconds": round(carnet_s, 2), "carnet_rss_mb": round(carnet_rss / 1e6),
        "ratio_wall": round(carnet_s / raw_s, 2), "carnet_rows_per_second": round(args.rows / carnet_s),
        "carnet_rss_per_process_mb": [round(p / 1e6) for p in processes],
        "raw_copy_into_contact_seconds": round(table_s, 2), "ratio_wall_vs_contact_copy": round(carnet_s / table_s, 2),
        "cpu_seconds": {"raw_copy": {"postgres": raw_cpu.postgres, "backends": raw_cpu.backends,
                                     "psql": raw_cpu.client},
                        "carnet": {"postgres": carnet_cpu.postgres, "backends": carnet_cpu.backends,
                                   "carnet": carnet_cpu.client},
                        "raw_copy_into_contact": {"postgres": table_cpu.postgres, "backends": table_cpu.backends}},
        # the same ratios in CPU: this database's backends (+ Carnet's own processes), steadier than wall time when
        # other work shares the machine
        "cpu_ratio_contact_copy_vs_bare": round(table_cpu.backends / max(raw_cpu.backends, 0.1), 2),
        "cpu_ratio_carnet_vs_contact_copy": round((carnet_cpu.backends + carnet_cpu.client)
                                                  / max(table_cpu.backends, 0.1), 2),
        "only_key_indexes": args.only_key_indexes,
        "tables": tables, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                      "load_1m_before": load_before, "load_1m_after": os.getloadavg()[0]},
    }
    print(json.dumps(result, indent=2))
    print(f"ratio wall {result['ratio_wall']}x (bar <= 3x); peak RSS {result['carnet_rss_mb']} MB (bar <= 300 MB)")
    print(f"raw \\copy into contact / bare: wall {round(table_s / raw_s, 2)}x, backend CPU "
          f"{result['cpu_ratio_contact_copy_vs_bare']}x (bar <= 2.5x); Carnet / that: wall "
          f"{result['ratio_wall_vs_contact_copy']}x, CPU {result['cpu_ratio_carnet_vs_contact_copy']}x (bar <= 2x)")
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    (ROOT / "bench" / "out" / "import.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep_file:
        for leftover in workdir.iterdir():  # the file, and the rejects CSV the import writes beside it
            leftover.unlink()
        workdir.rmdir()
    if not args.keep_db:
        async def drop() -> None:
            admin = await asyncpg.connect(args.server.rsplit("/", 1)[0] + "/postgres")
            await admin.execute(f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)')
            await admin.close()
        asyncio.run(drop())


if __name__ == "__main__":
    main()
