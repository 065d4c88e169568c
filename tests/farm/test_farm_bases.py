"""Base models on the farm: found by their sha256 in the shared store, refused before anything
is queued when no worker could get them, advertised by the workers that hold them.

The fast tests use a Redis database of their own and the embedded catalog and store; the last
one runs the whole chain on a ``fragjobs models add``-ed folder on the two real worker nodes
of tests/farm/test_farm_integration.py (its fixtures, a cluster of this module's own).
"""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest
import torch
from conftest import service_reachable
from test_farm_integration import (  # noqa: F401  (the fixtures are used by name)
    CHAIN_TIMEOUT_S,
    OWN_QUEUES,
    WORKERS,
    bucket,
    cluster,
    database_url,
    farm_env,
)

from fragjobs.base_store import add_base, base_object, index_object
from fragjobs.drills.cluster import fragjobs_cli
from fragjobs.errors import InvalidInputError, ObjectNotFoundError, UnknownModelError
from fragjobs.farm.client import plan_batch_queues
from fragjobs.farm.registry import BaseHolder, WarmRegistry, WarmWorker
from fragjobs.farm.settings import SHARED_QUEUE
from fragjobs.keys import sha256_hex

PROMPT = "a green triangle"
KNOBS = {"steps": 4, "profile_seeds": [0, 1], "validation_seeds": [1000, 1001]}
SHA_A, SHA_B = sha256_hex(b"a"), sha256_hex(b"b")


def _write_folder(folder, nudge: float = 0.0):
    """A diffusers folder written by ``save_pretrained`` (tiny-sd), its UNet nudged."""
    from fragjobs.builtin.configs import build_tiny_sd

    pipe = build_tiny_sd()
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(nudge)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def farm(redis_db, settings, ws):
    """A Farm on our own Redis database, the embedded catalog and store."""
    from fragjobs.client import Farm

    url = redis_db.url
    with Farm(settings.model_copy(update={"broker_url": url, "result_backend": url})) as client:
        yield client, redis_db.client


def _queued_models(redis_client) -> list[str]:
    out = []
    for raw in redis_client.lrange(SHARED_QUEUE, 0, -1):
        message = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append(kwargs["knobs"]["model"])
    return out


def test_registry_lists_base_holders_loaded_first(redis_db):
    registry = WarmRegistry(redis_db.url, ttl_s=60)
    registry.advertise_bases("cpu0@a", "gpu.a.cpu0", loaded=[], cached=[SHA_A])
    registry.advertise_bases("cpu0@b", "gpu.b.cpu0", loaded=[SHA_A], cached=[SHA_A, SHA_B])
    registry.advertise("cpu0@b", "gpu.b.cpu0", ["frag"])
    assert [w.hostname for w in registry.base_holders(SHA_A)] == ["cpu0@b", "cpu0@a"]
    assert [w.hostname for w in registry.base_holders(SHA_B)] == ["cpu0@b"]
    assert 0 < redis_db.client.ttl("fragjobs:bases:cpu0@a") <= 60
    registry.forget("cpu0@b")  # a new pool process: nothing known about it any more
    assert registry.workers() == {} and list(registry.base_workers()) == ["cpu0@a"]
    registry.close()


def test_plan_puts_fragment_holders_before_base_holders():
    fragment = [WarmWorker("cpu0@a", "gpu.a.cpu0", ("k",), 0.0)]
    bases = [
        BaseHolder("cpu0@b", "gpu.b.cpu0", (SHA_A,), (), 0.0),
        BaseHolder("cpu0@a", "gpu.a.cpu0", (), (SHA_A,), 0.0),
    ]
    assert plan_batch_queues(3, fragment + bases, {"cpu0@a", "cpu0@b"}) == [
        "gpu.a.cpu0",
        "gpu.b.cpu0",
        None,
    ]


def test_a_local_folder_is_sent_as_its_stored_base_or_refused_before_queueing(farm, ws, tmp_path):
    client, redis_client = farm
    folder = _write_folder(tmp_path / "my-sd")
    added_hint = re.escape(f"run fragjobs models add {folder.resolve()}")
    with pytest.raises(UnknownModelError, match=added_hint + "$"):
        client.submit(PROMPT, model=str(folder), variants=2, **KNOBS)
    assert redis_client.dbsize() == 0 and ws.catalog.list_base_models() == []

    sha256 = add_base(folder, store=ws.store, catalog=ws.catalog, settings=ws.settings).index.sha256
    for model in (str(folder), "my-sd", f"store:{sha256}"):  # the folder, its name, its id
        client.submit(PROMPT, model=model, variants=2, affinity=False, **KNOBS)
    assert _queued_models(redis_client) == [f"store:{sha256}"] * 3

    redis_client.flushdb()
    refused = {
        "store:nothex": InvalidInputError,
        f"store:{'0' * 64}": UnknownModelError,
        "no-such-base": UnknownModelError,
    }
    for model, error in refused.items():
        with pytest.raises(error):
            client.submit(PROMPT, model=model, variants=2, **KNOBS)
    ws.store.delete(base_object(sha256, "unet/config.json"))
    with pytest.raises(ObjectNotFoundError, match="missing 1 object.*models add"):
        client.submit(PROMPT, model=str(folder), variants=2, **KNOBS)
    ws.store.delete(index_object(sha256))
    with pytest.raises(ObjectNotFoundError, match="not in the store"):
        client.submit(PROMPT, model=f"store:{sha256}", variants=2, **KNOBS)
    add_base(folder, store=ws.store, catalog=ws.catalog, settings=ws.settings)  # repaired
    client.submit(PROMPT, model=f"store:{sha256}", variants=2, affinity=False, **KNOBS)
    assert _queued_models(redis_client) == [f"store:{sha256}"]

    redis_client.flushdb()
    _write_folder(folder, nudge=0.01)  # changed after it was added: another base
    with pytest.raises(UnknownModelError, match="no base with its content"):
        client.submit(PROMPT, model=str(folder), variants=2, **KNOBS)
    assert redis_client.dbsize() == 0


@pytest.mark.skipif(
    not (service_reachable("127.0.0.1", 6379) and service_reachable("127.0.0.1", 5432)),
    reason="needs Redis at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432",
)
def test_the_chain_runs_on_an_added_folder_across_two_workers(cluster, tmp_path):  # noqa: F811
    farm, store = cluster.farm, cluster.bucket.store
    folder = _write_folder(tmp_path / "farm-sd")
    with pytest.raises(UnknownModelError, match="run fragjobs models add"):
        farm.submit(PROMPT, model=str(folder), variants=2, **KNOBS)
    assert farm.registry.waiting(SHARED_QUEUE) == 0

    added = fragjobs_cli(cluster.env, "models", "add", str(folder))
    assert added.returncode == 0, added.stderr
    sha256 = added.stdout.split()[1]
    job = farm.submit(PROMPT, model=str(folder), variants=4, batch_size=2, **KNOBS)
    shutil.rmtree(folder)  # the workers can only get the base from the store
    result = job.wait(timeout=CHAIN_TIMEOUT_S)

    assert result.errors == [] and len(result.image_uris) == 4
    assert result.lineage["base_model"]["name"] == "farm-sd"
    base_row = farm.catalog.find_base_model(sha256)
    assert base_row.source == f"store:{sha256}"
    assert farm.catalog.get_fragment(result.lineage["fragment_key"]).base_model_id == base_row.id
    stages = {farm.app.AsyncResult(t).result["worker"] for t in job.stage_task_ids.values()}
    ran = stages | set(result.workers)
    nodes = {WORKERS[n]: n for n in WORKERS}
    for worker in ran:  # each node that ran a step fetched the base into its own cache
        cache = cluster.processes.cache_dir(nodes[worker]) / "bases" / sha256 / "farm-sd"
        assert (cache / "model_index.json").is_file(), worker
    holders = {w.hostname for w in farm.registry.base_holders(sha256)}
    assert holders and holders <= ran

    listed = fragjobs_cli(cluster.env, "models", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = [r for r in json.loads(listed.stdout) if r["sha256"] == sha256]
    assert row["nodes"] == sorted(holders) and row["size"] == _stored_size(store, sha256)
    # routing: free workers holding the base get a batch each on their own queue
    queues = farm._affinity_queues(None, 2, sha256)
    assert any(queues) and {q for q in queues if q} <= {OWN_QUEUES[nodes[w]] for w in holders}


def _stored_size(store, sha256: str) -> int:
    return sum(f["size"] for f in json.loads(store.get_bytes(index_object(sha256)))["files"])
