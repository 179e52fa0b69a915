"""`carnet import FILE`: the same job and runner, in the command's own process, with a summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.auth import TEST_SECRET
from tests.csv_samples import french_file
from tests.factories import ADMIN, make_attribute

pytestmark = pytest.mark.committing


def _carnet(*args: str, database_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "JWT_SECRET": TEST_SECRET, "LOG_JSON": "true"}
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "app", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
        check=False,
    )


async def test_import_command_runs_the_job_and_prints_the_summary(
    committing_client: httpx.AsyncClient, engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    await make_attribute(committing_client, "taille", "enum", options=["S", "M", "L"])
    sample = french_file(100)
    path = tmp_path / "clients.csv"
    path.write_bytes(sample.data)
    root = Path(__file__).resolve().parents[2]  # noqa: ASYNC240

    dry = _carnet("import", str(path), "--dry-run", database_url=database_url, cwd=root)
    assert dry.returncode == 0, dry.stderr
    assert "(dry run)" in dry.stdout
    rate = re.search(r"; (\d+) rows/s", dry.stdout)
    assert rate is not None and int(rate[1]) > 0

    done = _carnet("import", str(path), "--tag", "salon", database_url=database_url, cwd=root)
    assert done.returncode == 0, done.stderr
    good = len(sample.good)
    assert f"{good + len(sample.suppressed)} created" in done.stdout, done.stdout  # nobody was erased here
    assert f"{len(sample.bad) + len(sample.duplicates)} rejected" in done.stdout
    report = tmp_path / "clients.rejects.csv"  # beside the file, and the command says where
    assert done.stdout.splitlines()[-1] == f"rejected and skipped rows, with the reason for each: {report}"
    assert report.stat().st_mode & 0o777 == 0o600  # the refused cells are personal data
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM contact WHERE 'salon' = ANY(tags)")) == good + 3
        subject = await connection.scalar(text("SELECT DISTINCT subject FROM contact_history WHERE via = 'import'"))
        job_id = await connection.scalar(text("SELECT id FROM import_job WHERE NOT dry_run"))
    assert str(subject).startswith("cli:")
    rejects = await committing_client.get(f"/v1/imports/{job_id}/rejects", headers=ADMIN)
    assert rejects.status_code == 200 and len(rejects.text.splitlines()) == 1 + len(sample.bad) + 3
    assert report.read_bytes() == rejects.content  # the same report as the API's, unmasked

    bad = _carnet("import", str(path), "--list", "0b7e0000-0000-4000-8000-000000000000", database_url=database_url,
                  cwd=root)
    assert bad.returncode == 2 and "--consent-source" in bad.stderr


def test_the_report_file_is_never_written_through_a_link_and_stays_private(tmp_path: Path) -> None:
    from app.services.imports.local import _open_private

    precious = tmp_path / "precious"
    precious.write_text("keep me")
    planted = tmp_path / "clients.rejects.csv"
    planted.symlink_to(precious)  # someone else's link where the report goes (a shared /tmp)
    with pytest.raises(OSError):
        _open_private(planted)
    assert precious.read_text() == "keep me"

    older = tmp_path / "older.rejects.csv"
    older.write_text("old report")
    older.chmod(0o644)
    with _open_private(older) as out:
        out.write(b"row,column\r\n")
    assert older.read_bytes() == b"row,column\r\n" and older.stat().st_mode & 0o777 == 0o600
