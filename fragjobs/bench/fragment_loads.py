"""Fragment loads from a local folder, from S3 and from the warm node cache (farm benchmark, 3).

:func:`fragment_loads` starts moto's standalone S3 server in a process of its own, copies a
stored fragment there and times :func:`fragjobs.chain.load_stored_fragment` (catalog row,
manifest, file, hashes, parse) against each source, then the same three reads of a large
object (sha256 checked), the size-bound case.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fragjobs.bench.loading import embedded_settings
from fragjobs.bench.timing import median_ms, timed


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's standalone S3 server in a process of its own (killed afterwards); its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's server did not start (pip install 'moto[server]')")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def fragment_loads(data_dir: Path, key: str, repeats: int, blob_mib: int) -> dict[str, float]:
    """Median ms of fragment loads and of a ``blob_mib`` object read: local, S3, warm cache."""
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    saved = {name: os.environ.get(name) for name in credentials}
    os.environ.update(credentials)
    try:
        with moto_server() as endpoint:
            return _measure_loads(data_dir, key, repeats, blob_mib, endpoint)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _measure_loads(
    data_dir: Path, key: str, repeats: int, blob_mib: int, endpoint: str
) -> dict[str, float]:
    import boto3

    from fragjobs import chain
    from fragjobs.keys import FRAGMENT_FILE, MANIFEST_FILE, fragment_object
    from fragjobs.storage import S3Store, WarmCache

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    store = S3Store("s3://bench/farm", endpoint_url=endpoint, region="us-east-1")
    local = chain.Workspace.open(embedded_settings(data_dir))
    remote = chain.Workspace(local.settings, local.catalog, store)
    caches = data_dir.parent / "node-caches"
    try:
        for filename in (MANIFEST_FILE, FRAGMENT_FILE):
            name = fragment_object(key.split("_", 1)[0], key, filename)
            store.put_bytes(name, local.store.get_bytes(name))

        def new_node_cache() -> None:  # a cold node: an empty cache folder of its own
            chain.STATE.warm_caches.clear()
            folder = caches / uuid.uuid4().hex
            remote.settings = local.settings.model_copy(update={"cache_dir": folder})

        def load_local() -> Any:
            return chain.load_stored_fragment(key, local)

        def load_remote() -> Any:
            return chain.load_stored_fragment(key, remote)

        load_local()  # warm the catalog connection and the page cache
        local_ms = median_ms(timed(load_local, repeats))
        cold_ms = median_ms(timed(load_remote, repeats, before=new_node_cache))
        new_node_cache()
        load_remote()
        warm_ms = median_ms(timed(load_remote, repeats))

        blob = os.urandom(blob_mib * 2**20)
        stored = local.store.put_bytes("bench/blob.bin", blob)
        store.put_bytes("bench/blob.bin", blob)
        del blob
        warm_cache = WarmCache(caches / "blob", 2 * stored.size)

        def read_local() -> Any:
            return local.store.get_bytes(stored.name, expected_sha256=stored.sha256)

        def read_cold() -> Any:
            cache = WarmCache(caches / uuid.uuid4().hex, 2 * stored.size)
            return cache.get_bytes(store, stored.name, stored.sha256)

        def read_warm() -> Any:
            return warm_cache.get_bytes(store, stored.name, stored.sha256)

        read_local()
        read_warm()
        blob_repeats = max(3, repeats // 5)
        return {
            "local_ms": local_ms,
            "s3_ms": cold_ms,
            "warm_ms": warm_ms,
            "bytes": local.catalog.get_fragment(key).size_bytes,
            "blob_bytes": stored.size,
            "blob_local_ms": median_ms(timed(read_local, blob_repeats)),
            "blob_s3_ms": median_ms(timed(read_cold, blob_repeats)),
            "blob_warm_ms": median_ms(timed(read_warm, blob_repeats)),
        }
    finally:
        chain.STATE.warm_caches.clear()
        local.close()
