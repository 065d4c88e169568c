"""Lookup at farm scale: ``python -m fragjobs.bench_catalog`` (issue 14, item 4).

Fills a fresh catalog database with ``--fragments`` fragments (100,000 by default) and times
the library's two lookups on it, as the chain calls them:

- **exact**: :func:`fragjobs.library.lookup_prompt` (the prompt's hash → the most recently
  used ready fragment: one indexed query), on prompts of stored fragments and on unseen
  ones;
- **similar**: :func:`fragjobs.library.lookup_similar` (refresh of the in-memory index from
  the catalog, one matrix-vector product over every ready fragment's embedding, one query
  to confirm the best candidate), on noisy copies of stored embeddings (hits) and on random
  vectors (misses).

Each kind is timed ``--lookups`` times on a warm index; the first similar lookup (the cold
build of the index: every ready row's embedding read once) is reported on its own. The
figures are p50 / p95 / max in milliseconds and PASS/FAIL against the issue's target
(p95 ≤ 20 ms for both).

The data: prompts drawn without repetition from a vocabulary of colours, shapes, positions,
backgrounds and styles; keys made by :func:`fragjobs.keys.make_fragment_key` as the chain
makes them; one profile row per fragment; 95 % ready, the rest ``failed_gate`` or
``evicted`` (they must never match); random unit embeddings of the ``shapes`` model's text
embedding size (its text encoder's ``hidden_size``, read from the built-in's config, so no
model is loaded); made over the last 90 days. Rows are bulk-inserted through the ORM's tables
(``executemany``), not one ``create_fragment`` call each: that is setup, not what is timed.

The database is created here (PostgreSQL by default, a fresh name on the server at
``postgresql+psycopg://postgres@127.0.0.1:5432``; ``--database-url`` names another, which must
not exist yet, or a SQLite file) and dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import platform
import random
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert, select, text
from sqlalchemy.engine import make_url

from fragjobs.catalog import Catalog, upgrade_database
from fragjobs.catalog.lookup import REUSE_THRESHOLD_PARAM
from fragjobs.errors import InvalidInputError
from fragjobs.keys import make_fragment_key, prompt_hash, sha256_hex
from fragjobs.library import lookup_prompt, lookup_similar, similarity_index
from models import FragmentRow, ProfileRow

DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
TARGET_P95_MS = 20.0
BASE_NAME = "shapes"
THRESHOLD = 0.8
NOT_READY = ("failed_gate", "evicted")

COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "grey",
    "pink",
    "brown",
    "cyan",
    "teal",
]
SHAPES = [
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "cross",
    "ring",
    "diamond",
    "heart",
    "arrow",
    "crescent",
]
POSITIONS = [
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "in the centre",
    "in the top left corner",
    "in the top right corner",
    "in the bottom left corner",
    "in the bottom right corner",
]
BACKGROUNDS = [
    "white",
    "black",
    "grey",
    "blue",
    "green",
    "striped",
    "dotted",
    "checkered",
    "gradient",
    "sandy",
]
STYLES = [
    "flat colours",
    "soft shadow",
    "thick outline",
    "watercolour",
    "pixel art",
    "pencil sketch",
    "glossy",
    "matte",
    "neon glow",
    "paper cut-out",
]


def embedding_size() -> int:
    """The size of the ``shapes`` model's prompt embedding (its text encoder's hidden size)."""
    config = resources.files("fragjobs") / "builtin/shapes/pipeline/text_encoder/config.json"
    return int(json.loads(config.read_text())["hidden_size"])


def prompts(count: int, rng: random.Random) -> list[str]:
    """``count`` different prompts from the vocabulary (refused past its size)."""
    every = list(itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS, STYLES))
    if count > len(every):
        raise InvalidInputError(
            f"--fragments {count} is more than the {len(every)} prompts the vocabulary makes"
        )
    chosen = rng.sample(every, count)
    return [f"a {c} {s} {p} on a {b} background, {st}" for c, s, p, b, st in chosen]


def unit_vectors(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random unit vectors of size ``dim`` (float32)."""
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@contextlib.contextmanager
def scratch_database(url: str | None, keep: bool) -> Iterator[str]:
    """A new, empty database at ``url`` (default: a fresh PostgreSQL name), dropped after."""
    url = url or f"{DEFAULT_SERVER}/fragjobs_bench_{uuid.uuid4().hex[:12]}"
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not parsed.database or path.exists():
            raise InvalidInputError(f"{url}: give a SQLite file that does not exist yet")
        try:
            yield url
        finally:
            if not keep:
                path.unlink(missing_ok=True)
        return
    if parsed.get_backend_name() != "postgresql":
        raise InvalidInputError(f"{url}: the benchmark runs on PostgreSQL or SQLite")
    import psycopg

    name = parsed.database
    admin = parsed.set(drivername="postgresql", database="postgres")
    admin_dsn = admin.render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if exists.fetchone():
            raise InvalidInputError(f"database {name!r} exists: give a new name to fill")
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url
    finally:
        if not keep:
            with psycopg.connect(admin_dsn, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(catalog: Catalog, count: int, seed: int) -> dict[str, Any]:
    """Insert ``count`` fragments (and their profiles) of one base; return what was made."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    dim = embedding_size()
    base = catalog.get_or_create_base_model(
        BASE_NAME, sha256_hex(f"fragjobs-bench:{BASE_NAME}"), f"builtin:{BASE_NAME}"
    )
    texts = prompts(count, rng)
    vectors = unit_vectors(count, dim, np_rng)
    now = datetime.now(UTC)
    made = [now - timedelta(seconds=rng.uniform(60, 90 * 86400)) for _ in range(count)]
    statuses = [rng.choice(NOT_READY) if rng.random() < 0.05 else "ready" for _ in range(count)]
    params = {"heads": {"keep": 0.7}, "low_rank": {"rank": 16}, REUSE_THRESHOLD_PARAM: THRESHOLD}
    started = time.perf_counter()
    engine = catalog._engine
    with engine.begin() as connection:
        connection.execute(
            insert(ProfileRow),
            [
                {
                    "profile_id": make_fragment_key(BASE_NAME, prompt, {"profile": {"seeds": 4}}),
                    "base_model_id": base.id,
                    "prompt": prompt,
                    "prompt_hash": prompt_hash(prompt),
                    "params": {"seeds": [0, 1, 2, 3]},
                    "stats_uri": f"file:///bench/profiles/{i}/stats.parquet",
                    "stats_sha256": sha256_hex(f"stats {i}"),
                    "importance_uri": f"file:///bench/profiles/{i}/importance.json",
                    "created_at": made[i],
                }
                for i, prompt in enumerate(texts)
            ],
        )
        profile_ids = dict(
            connection.execute(select(ProfileRow.prompt, ProfileRow.id)).tuples().all()
        )
        connection.execute(
            insert(FragmentRow),
            [
                {
                    "key": make_fragment_key(BASE_NAME, prompt, params),
                    "profile_id": profile_ids[prompt],
                    "base_model_id": base.id,
                    "prompt": prompt,
                    "prompt_hash": prompt_hash(prompt),
                    "prompt_embedding": vectors[i].astype("<f4").tobytes(),
                    "params": params,
                    "status": statuses[i],
                    "size_bytes": 1_000_000,
                    "file_sha256": sha256_hex(f"file {i}"),
                    "manifest_sha256": sha256_hex(f"manifest {i}"),
                    "storage_uri": f"file:///bench/fragments/{i}",
                    "created_at": made[i],
                    "updated_at": made[i] + timedelta(seconds=30),
                    "hit_count": 0,
                }
                for i, prompt in enumerate(texts)
            ],
        )
    with engine.connect() as connection:  # a live farm's database has its statistics
        connection.execute(text("ANALYZE fragments"))
        connection.execute(text("ANALYZE profiles"))
        connection.commit()
    return {
        "base_model_id": base.id,
        "prompts": texts,
        "vectors": vectors,
        "ready": [s == "ready" for s in statuses],
        "dim": dim,
        "fill_s": round(time.perf_counter() - started, 2),
    }


def percentiles_ms(samples: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max of ``samples`` (seconds), in milliseconds."""
    values = np.asarray(samples) * 1000
    return {
        "n": len(samples),
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p95_ms": round(float(np.percentile(values, 95)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "max_ms": round(float(values.max()), 3),
    }


def time_lookups(catalog: Catalog, data: dict[str, Any], lookups: int, seed: int) -> dict:
    """Time ``lookups`` exact and ``lookups`` similar lookups; check every answer too."""
    rng, np_rng = random.Random(seed + 1), np.random.default_rng(seed + 1)
    base_id, texts, vectors, ready = (
        data["base_model_id"],
        data["prompts"],
        data["vectors"],
        data["ready"],
    )
    started = time.perf_counter()
    lookup_similar(catalog, base_id, vectors[0])
    cold_s = time.perf_counter() - started

    exact, exact_hits, wrong = [], 0, 0
    for n in range(lookups):
        hit_wanted = n % 5 != 4  # 4 in 5 ask for a stored prompt
        i = rng.randrange(len(texts))
        asked = texts[i] if hit_wanted else f"an unseen prompt number {n} {rng.random()}"
        began = time.perf_counter()
        row = lookup_prompt(catalog, base_id, asked)
        exact.append(time.perf_counter() - began)
        exact_hits += row is not None
        wrong += (row is not None) != (hit_wanted and ready[i])
    similar, similar_hits = [], 0
    for n in range(lookups):
        i = rng.randrange(len(texts))
        hit_wanted = n % 5 != 4
        if hit_wanted:  # a paraphrase: the stored embedding, nudged (cosine ≈ 0.95)
            query = vectors[i] + np_rng.standard_normal(data["dim"]).astype(np.float32) * 0.03
        else:
            query = unit_vectors(1, data["dim"], np_rng)[0]
        began = time.perf_counter()
        hit = lookup_similar(catalog, base_id, query)
        similar.append(time.perf_counter() - began)
        similar_hits += hit is not None
        if hit_wanted and ready[i]:
            wrong += hit is None or hit.fragment.prompt != texts[i]
        elif hit is not None and not hit_wanted:
            wrong += 1
    index = similarity_index(catalog)
    scans = []  # the in-memory part alone: what is CPU, not the catalog's round trips
    for query in unit_vectors(lookups, data["dim"], np_rng):
        began = time.perf_counter()
        index.candidates(base_id, query)
        scans.append(time.perf_counter() - began)
    return {
        "exact": {**percentiles_ms(exact), "hits": exact_hits},
        "similar": {**percentiles_ms(similar), "hits": similar_hits},
        "similar_scan_only": percentiles_ms(scans),
        "cold_index_build_ms": round(cold_s * 1000, 1),
        "index_size": index.size(base_id),
        "wrong_answers": wrong,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Make the database, fill it, time the lookups; return the figures."""
    with scratch_database(args.database_url, args.keep) as url:
        upgrade_database(url)
        with Catalog(url) as catalog:
            data = fill(catalog, args.fragments, args.seed)
            figures = time_lookups(catalog, data, args.lookups, args.seed)
        backend = make_url(url).get_backend_name()
    for kind in ("exact", "similar"):
        figures[kind]["verdict"] = "PASS" if figures[kind]["p95_ms"] <= TARGET_P95_MS else "FAIL"
    return {
        "fragments": args.fragments,
        "ready": int(sum(data["ready"])),
        "embedding_size": data["dim"],
        "backend": backend,
        "fill_s": data["fill_s"],
        "target_p95_ms": TARGET_P95_MS,
        "machine": platform.platform(),
        **figures,
    }


def report(figures: dict[str, Any]) -> str:
    """The figures as a few lines of text."""
    lines = [
        f"{figures['fragments']} fragments ({figures['ready']} ready, embeddings of size "
        f"{figures['embedding_size']}) on {figures['backend']}, filled in {figures['fill_s']} s",
        f"cold index build (first similar lookup): {figures['cold_index_build_ms']} ms, "
        f"{figures['index_size']} embeddings held",
    ]
    for kind in ("exact", "similar"):
        f = figures[kind]
        lines.append(
            f"{kind:<8} n={f['n']} hits={f['hits']}  p50 {f['p50_ms']} ms  p95 {f['p95_ms']} ms"
            f"  p99 {f['p99_ms']} ms  max {f['max_ms']} ms  {f['verdict']}"
            f" (target p95 ≤ {figures['target_p95_ms']} ms)"
        )
    scan = figures["similar_scan_only"]
    lines.append(
        f"(similar, the in-memory scan alone: p50 {scan['p50_ms']} ms  p95 {scan['p95_ms']} ms)"
    )
    lines.append(f"wrong answers: {figures['wrong_answers']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 1 when a target is missed or an answer was wrong."""
    parser = argparse.ArgumentParser(
        prog="python -m fragjobs.bench_catalog", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--fragments", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=1_000, help="Timed lookups per kind.")
    parser.add_argument("--database-url", default=None, help="A database to create and fill.")
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = parser.parse_args(argv)
    if args.fragments < 1 or args.lookups < 1:
        parser.error("--fragments and --lookups must be at least 1")
    try:
        figures = run(args)
    except InvalidInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(figures, indent=2) if args.json else report(figures))
    missed = any(figures[k]["verdict"] == "FAIL" for k in ("exact", "similar"))
    return 1 if missed or figures["wrong_answers"] else 0
