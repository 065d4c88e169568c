"""Fragment affinity: which fragments each worker holds warm, in the broker's Redis.

A worker advertises the fragments whose UNets it holds warm in its pool process
(:func:`fragjobs.chain.warm_fragment_keys`): one key per worker,
``fragjobs:warm:<hostname>`` → ``{"queue", "fragments", "updated_at"}`` (JSON), with a
time-to-live of ``FRAGJOBS_AFFINITY_TTL_S`` seconds. It is rewritten after every generate task,
deleted when a pool process starts (a new process holds nothing) and when the worker stops.
:class:`WarmRegistry` reads and writes it; :class:`fragjobs.farm.client.Farm` routes a
generate batch to the own queue of a holder that replies to ``inspect`` with no running task
and an empty own queue, otherwise to the shared queue. With a broker other than Redis there
is no registry and every batch goes to the shared queue. Redis is imported lazily.

Base models the same way: ``fragjobs:bases:<hostname>`` → ``{"queue", "loaded", "cached",
"updated_at"}``, the sha256s of the bases the worker's pool process holds loaded and of those
its node holds in its base cache (:class:`fragjobs.base_cache.BaseCache`), rewritten after
every chain task and deleted with the fragment advertisement. Routing prefers their holders
after the fragment's, and ``fragjobs models ls`` shows them.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from fragjobs.errors import ConfigError

WARM_KEY_PREFIX = "fragjobs:warm:"
"""Redis key prefix of the fragment-affinity advertisements (one key per worker hostname)."""
BASES_KEY_PREFIX = "fragjobs:bases:"
"""Redis key prefix of the base-model advertisements (one key per worker hostname)."""
_SCRATCH_CLAIM_PREFIX = "fragjobs:scratch-db:"


@dataclass(frozen=True)
class WarmWorker:
    """One worker's advertisement: its own queue and its warm fragments, most recent first."""

    hostname: str
    queue: str | None
    fragments: tuple[str, ...]
    updated_at: float


@dataclass(frozen=True)
class BaseHolder:
    """One worker's base advertisement: its own queue, the sha256s of the bases its process
    holds loaded (most recent first) and of those its node holds in its cache."""

    hostname: str
    queue: str | None
    loaded: tuple[str, ...]
    cached: tuple[str, ...]
    updated_at: float


class WarmRegistry:
    """Which fragments each worker holds warm, in the broker's Redis (see the module doc).

    Args:
        url: a ``redis://`` or ``rediss://`` URL (the broker's).
        ttl_s: how long an advertisement lives unless it is rewritten.

    Example::

        registry = WarmRegistry.for_broker("redis://127.0.0.1:6379/0")
        registry.advertise("gpu0@n1", "gpu.n1.0", ["tiny-sd_0123456789abcdef_01234567"])
        [w.hostname for w in registry.holders("tiny-sd_0123456789abcdef_01234567")]
    """

    def __init__(self, url: str, ttl_s: int = 3600) -> None:
        import redis

        self.ttl_s = int(ttl_s)
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    @classmethod
    def for_broker(cls, url: str, ttl_s: int = 3600) -> WarmRegistry | None:
        """The registry in the broker at ``url``; None when the broker is not Redis."""
        if urlsplit(url).scheme.lower() not in ("redis", "rediss"):
            return None
        return cls(url, ttl_s)

    def advertise(self, hostname: str, queue: str | None, fragments: Sequence[str]) -> None:
        """Record that ``hostname`` (own queue ``queue``) holds ``fragments`` warm."""
        value = {"queue": queue, "fragments": list(fragments), "updated_at": time.time()}
        self._client.set(WARM_KEY_PREFIX + hostname, json.dumps(value), ex=self.ttl_s)

    def advertise_bases(
        self, hostname: str, queue: str | None, loaded: Sequence[str], cached: Sequence[str]
    ) -> None:
        """Record that ``hostname`` holds the bases ``loaded`` and its node ``cached``."""
        value = {
            "queue": queue,
            "loaded": list(loaded),
            "cached": list(cached),
            "updated_at": time.time(),
        }
        self._client.set(BASES_KEY_PREFIX + hostname, json.dumps(value), ex=self.ttl_s)

    def forget(self, hostname: str) -> None:
        """Remove ``hostname``'s advertisements (it holds nothing warm)."""
        self._client.delete(WARM_KEY_PREFIX + hostname, BASES_KEY_PREFIX + hostname)

    def workers(self) -> dict[str, WarmWorker]:
        """Every live fragment advertisement, by worker hostname."""
        return {
            hostname: WarmWorker(
                hostname, data.get("queue"), tuple(data["fragments"]), data["updated_at"]
            )
            for hostname, data in self._advertisements(WARM_KEY_PREFIX).items()
        }

    def base_workers(self) -> dict[str, BaseHolder]:
        """Every live base advertisement, by worker hostname."""
        return {
            hostname: BaseHolder(
                hostname,
                data.get("queue"),
                tuple(data["loaded"]),
                tuple(data["cached"]),
                data["updated_at"],
            )
            for hostname, data in self._advertisements(BASES_KEY_PREFIX).items()
        }

    def base_holders(self, sha256: str) -> list[BaseHolder]:
        """The workers holding base ``sha256``: those with it loaded first, then those whose
        node caches it."""
        found = [w for w in self.base_workers().values() if sha256 in w.loaded + w.cached]
        return sorted(found, key=lambda w: (sha256 not in w.loaded, w.hostname))

    def _advertisements(self, prefix: str) -> dict[str, dict]:
        names = sorted(self._client.scan_iter(match=prefix + "*", count=500))
        values = self._client.mget(names) if names else []
        return {
            name.decode()[len(prefix) :]: json.loads(raw)
            for name, raw in zip(names, values, strict=True)
            if raw is not None  # expired between SCAN and MGET
        }

    def holders(self, key: str) -> list[WarmWorker]:
        """The workers that hold fragment ``key`` warm, most recently used there first."""
        found = [w for w in self.workers().values() if key in w.fragments]
        return sorted(found, key=lambda w: (w.fragments.index(key), w.hostname))

    def waiting(self, queue: str) -> int:
        """How many messages wait in ``queue`` (a Redis list named after the queue)."""
        return int(self._client.llen(queue))

    def close(self) -> None:
        """Close the Redis connections."""
        self._client.close()


def base_hostnames(broker_url: str) -> dict[str, list[str]] | None:
    """sha256 → hostnames of the workers holding that base (loaded or cached on their node).

    None when the broker is not Redis, or cannot be reached: nobody could be asked.
    """
    try:
        registry = WarmRegistry.for_broker(broker_url)
    except ImportError:
        return None
    if registry is None:
        return None
    from redis.exceptions import RedisError

    out: dict[str, list[str]] = {}
    try:
        for worker in registry.base_workers().values():
            for sha256 in dict.fromkeys(worker.loaded + worker.cached):
                out.setdefault(sha256, []).append(worker.hostname)
    except (RedisError, OSError):
        return None
    finally:
        registry.close()
    return out


@contextlib.contextmanager
def scratch_redis_database(host: str = "127.0.0.1", port: int = 6379) -> Iterator[str]:
    """Yield the URL of an empty Redis database (1-15) of our own; flush it afterwards.

    For tests and benchmarks that need a broker of their own next to other users of the same
    Redis server. A claim key in database 0 (``fragjobs:scratch-db:<n>``, expiring after a
    day) keeps two concurrent users off the same database.

    Raises:
        ConfigError: every database 1-15 holds keys or is claimed.
    """
    import redis

    admin = redis.Redis(host, port, db=0, socket_connect_timeout=2)
    token = uuid.uuid4().hex
    try:
        for number in range(1, 16):
            claim = f"{_SCRATCH_CLAIM_PREFIX}{number}"
            database = redis.Redis(host, port, db=number)
            try:
                empty = database.dbsize() == 0
            finally:
                database.close()
            if empty and admin.set(claim, token, nx=True, ex=86400):
                break
        else:
            raise ConfigError(f"no empty, unclaimed Redis database (1-15) on {host}:{port}")
        try:
            yield f"redis://{host}:{port}/{number}"
        finally:
            database = redis.Redis(host, port, db=number)
            database.flushdb()
            database.close()
            if admin.get(claim) == token.encode():
                admin.delete(claim)
    finally:
        admin.close()


# -- commands --------------------------------------------------------------------------------
