"""Tests of fragjobs.storage.warm_cache: fetched once, verified on every read, bounded LRU.

The S3 fixtures (moto server) come from conftest.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fragjobs.errors import IntegrityError, InvalidInputError, ObjectNotFoundError
from fragjobs.storage import LocalStore, ObjectStore, WarmCache
from fragjobs.storage.base import Readable

NAME = "fragments/tiny-sd/tiny-sd_0123456789abcdef_01234567/fragment.safetensors"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """The same tests over a local folder and over S3 (moto)."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def cache(tmp_path: Path) -> WarmCache:
    return WarmCache(tmp_path / "cache", max_bytes=10_000)


def entries(cache: WarmCache) -> list[Path]:
    return sorted(cache.folder.glob("*.obj"))


def leftovers(cache: WarmCache) -> list[Path]:
    """Files in the cache folder that are not entries (temporary files)."""
    return [p for p in cache.folder.iterdir() if p.is_file() and p.suffix != ".obj"]


def test_second_get_is_a_hit_and_fetches_nothing(store: ObjectStore, cache: WarmCache) -> None:
    data = b"fragment bytes " * 100
    stored = store.put_bytes(NAME, data)

    assert cache.get_bytes(store, NAME, stored.sha256) == data
    assert (cache.hits, cache.misses, cache.fetched_bytes) == (0, 1, len(data))
    assert cache.contains(store, NAME, stored.sha256)

    store.delete(NAME)  # from now on, only the cache can answer
    assert cache.get_bytes(store, NAME, stored.sha256.upper()) == data
    assert (cache.hits, cache.misses, cache.fetched_bytes) == (1, 1, len(data))

    # A different sha256 is a different entry: the store is asked, and has nothing.
    with pytest.raises(ObjectNotFoundError):
        cache.get_bytes(store, NAME, sha(b"replaced"))
    assert len(entries(cache)) == 1 and leftovers(cache) == []


def test_entries_are_per_store(tmp_path: Path, cache: WarmCache) -> None:
    first, second = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    stored = first.put_bytes(NAME, b"same bytes")
    second.put_bytes(NAME, b"same bytes")

    cache.get_bytes(first, NAME, stored.sha256)
    cache.get_bytes(second, NAME, stored.sha256)
    assert cache.misses == 2 and len(entries(cache)) == 2


def test_corrupted_cache_file_is_dropped_and_fetched_again(
    store: ObjectStore, cache: WarmCache
) -> None:
    data = b"good fragment bytes" * 50
    stored = store.put_bytes(NAME, data)
    cache.get_bytes(store, NAME, stored.sha256)
    (entry,) = entries(cache)

    for damage in (b"x" * len(data), data[:-1]):  # flipped bytes, truncated
        entry.write_bytes(damage)
        assert cache.get_bytes(store, NAME, stored.sha256) == data
        assert entry.read_bytes() == data
    assert (cache.hits, cache.misses) == (0, 3)


def test_failed_fetch_caches_nothing(store: ObjectStore, cache: WarmCache) -> None:
    store.put_bytes(NAME, b"stored bytes")

    with pytest.raises(IntegrityError):
        cache.get_bytes(store, NAME, sha(b"what the catalog expected"))
    assert entries(cache) == [] and leftovers(cache) == []


def test_lru_eviction_keeps_the_cache_within_max_bytes(
    local_store: LocalStore, tmp_path: Path
) -> None:
    cache = WarmCache(tmp_path / "cache", max_bytes=250)
    objects = {n: local_store.put_bytes(f"objects/{n}.bin", n.encode() * 100) for n in "abcd"}

    def get(n: str) -> bytes:
        return cache.get_bytes(local_store, objects[n].name, objects[n].sha256)

    def cached() -> set[str]:
        return {n for n, o in objects.items() if cache.contains(local_store, o.name, o.sha256)}

    get("a")
    get("b")
    get("a")  # a hit: now "b" is the least recently used
    get("c")
    assert cached() == {"a", "c"}
    assert cache.total_bytes() == 200 <= cache.max_bytes

    get("d")
    assert cached() == {"c", "d"}

    # Larger than the whole cache: returned, but it does not flush the cache.
    big = local_store.put_bytes("objects/big.bin", b"z" * 300)
    assert cache.get_bytes(local_store, big.name, big.sha256) == b"z" * 300
    assert cached() == {"c", "d"} and cache.total_bytes() == 200


def test_recency_and_size_come_from_the_folder(local_store: LocalStore, tmp_path: Path) -> None:
    """A second instance (another process) sees the first one's entries and their recency."""
    folder = tmp_path / "cache"
    objects = [local_store.put_bytes(f"objects/{n}.bin", b"%d" % n * 100) for n in range(3)]
    first = WarmCache(folder, max_bytes=1000)
    for stored in objects:
        first.get_bytes(local_store, stored.name, stored.sha256)
    first.get_bytes(local_store, objects[0].name, objects[0].sha256)  # 1 is now the oldest

    second = WarmCache(folder, max_bytes=250)
    assert second.total_bytes() == 300
    extra = local_store.put_bytes("objects/extra.bin", b"e" * 50)
    second.get_bytes(local_store, extra.name, extra.sha256)
    assert second.total_bytes() == 250
    assert not second.contains(local_store, objects[1].name, objects[1].sha256)
    assert second.contains(local_store, objects[0].name, objects[0].sha256)


def test_invalid_arguments_are_refused(local_store: LocalStore, cache: WarmCache) -> None:
    with pytest.raises(InvalidInputError, match="64 hex digits"):
        cache.get_bytes(local_store, NAME, "not-a-sha")
    with pytest.raises(InvalidInputError):
        cache.get_bytes(local_store, "../escape", sha(b""))
    with pytest.raises(InvalidInputError, match="max_bytes"):
        WarmCache(cache.folder, max_bytes=0)


def test_from_settings_uses_the_configured_folder_and_bound(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = WarmCache.from_settings(settings)
    assert cache.folder == settings.data_dir / "cache" and cache.folder.is_dir()
    assert cache.max_bytes == settings.cache_max_bytes

    monkeypatch.setenv("FRAGJOBS_CACHE_DIR", str(settings.data_dir / "warm"))
    monkeypatch.setenv("FRAGJOBS_CACHE_MAX_BYTES", "12345")
    from fragjobs.config import get_settings

    get_settings.cache_clear()
    from_env = WarmCache.from_settings()
    assert (from_env.folder, from_env.max_bytes) == (settings.data_dir / "warm", 12345)


class SlowLocalStore(LocalStore):
    """A LocalStore whose reads take a while, so that two processes' misses overlap."""

    @contextlib.contextmanager
    def _open_read(self, name: str) -> Iterator[Readable]:
        time.sleep(0.5)
        with super()._open_read(name) as stream:
            yield stream


def fetch_in_child(
    store_url: str, folder: str, name: str, sha256: str, barrier: Any, results: Any
) -> None:
    cache = WarmCache(Path(folder), max_bytes=10_000)
    store = SlowLocalStore(store_url)
    barrier.wait()
    data = cache.get_bytes(store, name, sha256)
    results.put((cache.misses, cache.hits, cache.fetched_bytes, hashlib.sha256(data).hexdigest()))


def test_two_processes_fetch_one_object_once(local_store: LocalStore, tmp_path: Path) -> None:
    data = b"shared fragment" * 200
    stored = local_store.put_bytes(NAME, data)
    folder = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    args = (local_store.url, str(folder), NAME, stored.sha256, barrier, results)
    workers = [context.Process(target=fetch_in_child, args=args) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
        assert worker.exitcode == 0

    assert sorted(o[:3] for o in outcomes) == [(0, 1, 0), (1, 0, len(data))]
    assert {o[3] for o in outcomes} == {stored.sha256}
    cache = WarmCache(folder, max_bytes=10_000)
    assert [p.read_bytes() for p in entries(cache)] == [data]
    assert leftovers(cache) == []
