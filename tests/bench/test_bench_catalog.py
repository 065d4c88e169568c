"""``python -m fragjobs.bench_catalog`` on a small library: it runs, answers right, prints its
figures and drops its database. The timings are not asserted (this machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import PG_ADMIN_URL, PG_SERVER, postgres_unavailable

from fragjobs.bench.catalog_lookup import embedding_size, prompts

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fragjobs.bench_catalog", "--fragments", "2000", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.postgres
def test_bench_fills_postgres_times_both_lookups_and_drops_its_database() -> None:
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    import psycopg

    name = f"fragjobs_test_bench_{uuid.uuid4().hex[:12]}"
    url = f"postgresql+psycopg://{PG_SERVER}/{name}"
    done = bench("--lookups", "100", "--database-url", url, "--json")
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: a target missed on this box
    figures = json.loads(done.stdout)
    assert figures["backend"] == "postgresql" and figures["fragments"] == 2000
    assert figures["embedding_size"] == embedding_size() == 128
    assert figures["index_size"] == figures["ready"] and figures["wrong_answers"] == 0
    for kind in ("exact", "similar"):
        f = figures[kind]
        assert f["n"] == 100 and 0 < f["hits"] < 100
        assert 0 < f["p50_ms"] <= f["p95_ms"] <= f["p99_ms"] <= f["max_ms"]
        assert f["verdict"] == ("PASS" if f["p95_ms"] <= 20.0 else "FAIL")
    assert figures["cold_index_build_ms"] > 0 and figures["similar_scan_only"]["n"] == 100
    with psycopg.connect(PG_ADMIN_URL) as admin:
        gone = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        assert gone.fetchone() is None


def test_bench_prints_its_figures_on_sqlite_and_refuses_an_existing_database(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bench.db"
    done = bench("--lookups", "50", "--database-url", f"sqlite:///{path}", "--keep")
    assert done.returncode in (0, 1), done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2000 fragments (") and "on sqlite" in lines[0]
    assert lines[1].startswith("cold index build (first similar lookup):")
    for kind, line in zip(("exact", "similar"), lines[2:4], strict=True):
        assert line.startswith(kind) and "p50" in line and "p95" in line
        assert " PASS (target p95 ≤ 20.0 ms)" in line or " FAIL (target p95 ≤ 20.0 ms)" in line
    assert lines[4].startswith("(similar, the in-memory scan alone: p50")
    assert lines[5] == "wrong answers: 0"
    assert path.is_file()  # --keep

    again = bench("--database-url", f"sqlite:///{path}")
    assert again.returncode == 2
    assert (
        again.stderr.strip().splitlines()[-1].endswith("give a SQLite file that does not exist yet")
    )


def test_the_vocabulary_makes_enough_distinct_prompts() -> None:
    import random

    made = prompts(100_000, random.Random(0))
    assert len(set(made)) == 100_000
