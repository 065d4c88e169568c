"""What keeps a farm node's fragment warm, in the core (fragjobs.chain), without Celery.

* an S3-backed workspace reads fragments through the node-local warm cache: the first load
  fetches manifest and file, later loads (any process of the node) fetch nothing;
* a local-folder workspace does not use the cache;
* generation keeps the fragment's UNet built between batches (an LRU of
  ``WARM_FRAGMENT_UNETS``) and gives the same images as a freshly built UNet.

The fragment comes from the session's ``ready_fragment_template``; S3 is moto's server.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fragjobs import chain
from fragjobs.catalog import Catalog
from fragjobs.chain import fragments
from fragjobs.errors import FragmentIntegrityError
from fragjobs.keys import FRAGMENT_FILE, MANIFEST_FILE, fragment_object
from fragjobs.storage import LocalStore, WarmCache


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    """Each test starts as a fresh worker process: nothing cached in memory."""
    monkeypatch.setattr(chain.STATE, "warm_caches", {})
    monkeypatch.setattr(chain.STATE, "fragment_unets", type(chain.STATE.fragment_unets)())


@pytest.fixture
def local_ws(ready_fragment_template, tmp_path):
    settings = ready_fragment_template.copy_to(tmp_path / "data")
    workspace = chain.Workspace.open(settings)
    yield workspace
    workspace.close()


def _object_names(key: str) -> list[str]:
    base_name = key.split("_", 1)[0]
    return [fragment_object(base_name, key, name) for name in (MANIFEST_FILE, FRAGMENT_FILE)]


@pytest.fixture
def s3_ws(local_ws, s3_store, tmp_path):
    """The same catalog, with the fragment's objects copied into an S3 bucket."""
    key = local_ws.catalog.list_fragments()[0].key
    for name in _object_names(key):
        s3_store.put_bytes(name, local_ws.store.get_bytes(name))
    settings = local_ws.settings.model_copy(update={"cache_dir": tmp_path / "node-cache"})
    return chain.Workspace(settings, Catalog(settings.resolved_database_url), s3_store)


def test_s3_fragment_is_fetched_once_per_node(s3_ws, ready_fragment_template, s3_admin):
    key = ready_fragment_template.key
    row = s3_ws.catalog.get_fragment(key)
    cache = chain.warm_cache(s3_ws)
    assert isinstance(cache, WarmCache) and cache.folder == s3_ws.settings.cache_dir

    first = chain.load_stored_fragment(key, s3_ws)
    assert (cache.misses, cache.hits) == (2, 0)  # manifest + fragment file
    names = _object_names(key)
    assert cache.fetched_bytes == sum(s3_ws.store.stat(name).size for name in names)
    sha = {names[0]: row.manifest_sha256, names[1]: row.file_sha256}
    assert all(cache.contains(s3_ws.store, name, sha[name]) for name in names)

    # Another process of the node (a second worker): its own instance, the same folder.
    other = WarmCache(s3_ws.settings.cache_dir, s3_ws.settings.cache_max_bytes)
    for name in names:  # gone from S3: only the node's cache can answer now
        s3_admin.delete_object(Bucket=s3_ws.store.bucket, Key=f"{s3_ws.store.prefix}/{name}")
    assert other.get_bytes(s3_ws.store, names[1], row.file_sha256)
    second = chain.load_stored_fragment(key, s3_ws)
    assert (cache.misses, cache.hits) == (2, 2) and other.misses == 0
    assert second.manifest == first.manifest
    assert s3_ws.catalog.get_fragment(key).status == "ready"


def test_local_store_is_read_directly(local_ws, ready_fragment_template):
    assert isinstance(local_ws.store, LocalStore) and chain.warm_cache(local_ws) is None
    chain.load_stored_fragment(ready_fragment_template.key, local_ws)
    assert not local_ws.settings.resolved_cache_dir.exists()


def test_corrupt_s3_object_is_still_detected_on_a_cold_node(s3_ws, ready_fragment_template):
    key = ready_fragment_template.key
    s3_ws.store.put_bytes(_object_names(key)[1], b"not the fragment")
    with pytest.raises(FragmentIntegrityError, match="expected sha256"):
        chain.load_stored_fragment(key, s3_ws)
    assert s3_ws.catalog.get_fragment(key).status == "corrupt"
    manifest_size = s3_ws.store.stat(_object_names(key)[0]).size
    assert chain.warm_cache(s3_ws).total_bytes() == manifest_size  # never the bad bytes


def test_generation_keeps_the_fragment_unet_warm(local_ws, ready_fragment_template, monkeypatch):
    key = ready_fragment_template.key
    loads = []
    original = chain.load_stored_fragment

    def counting_load(k, ws=None):
        loads.append(k)
        return original(k, ws)

    monkeypatch.setattr(fragments, "load_stored_fragment", counting_load)
    prompt = ready_fragment_template.prompt
    first = chain.generate(
        prompt, seeds=[5, 6], model="tiny-sd", key=key, ws=local_ws, progress=False
    )
    second = chain.generate(
        prompt, seeds=[5, 6], model="tiny-sd", key=key, ws=local_ws, progress=False
    )
    assert loads == [key] and chain.warm_fragment_keys() == [key]
    assert first.fragment_key == second.fragment_key == key and not second.used_fallback
    torch.testing.assert_close(first.images, second.images)  # block-cache state was reset

    chain.STATE.fragment_unets.clear()  # a freshly built UNet gives the same images
    fresh = chain.generate(
        prompt, seeds=[5, 6], model="tiny-sd", key=key, ws=local_ws, progress=False
    )
    torch.testing.assert_close(fresh.images, first.images)
    assert loads == [key, key]


def test_warm_unets_are_a_bounded_lru_keyed_by_the_stored_hashes(
    local_ws, ready_fragment_template, monkeypatch
):
    built = []
    fragment = chain.load_stored_fragment(ready_fragment_template.key, local_ws)

    def fake_load(key, ws=None):
        built.append(key)
        return fragment

    monkeypatch.setattr(fragments, "load_stored_fragment", fake_load)
    monkeypatch.setattr(fragments, "fragment_unet", lambda loaded, f: torch.nn.Identity())
    loaded = chain.base("tiny-sd", local_ws.settings)
    row = local_ws.catalog.get_fragment(ready_fragment_template.key)
    rows = {name: dataclasses.replace(row, key=name) for name in ("a", "b", "c")}

    unet_a = chain.warm_fragment_unet(local_ws, loaded, rows["a"])[1]
    chain.warm_fragment_unet(local_ws, loaded, rows["b"])
    assert chain.warm_fragment_unet(local_ws, loaded, rows["a"])[1] is unet_a  # a hit
    chain.warm_fragment_unet(local_ws, loaded, rows["c"])  # evicts b, the least recent
    assert chain.warm_fragment_keys() == ["c", "a"] and built == ["a", "b", "c"]
    assert chain.WARM_FRAGMENT_UNETS == 2

    rewritten = dataclasses.replace(rows["a"], manifest_sha256="0" * 64)
    chain.warm_fragment_unet(local_ws, loaded, rewritten)  # a new manifest: built anew
    assert built == ["a", "b", "c", "a"] and chain.warm_fragment_keys() == ["a", "c"]
