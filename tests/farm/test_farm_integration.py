"""Two real worker nodes on Redis + PostgreSQL + S3 (moto over HTTP), driven by Farm.

One pair of nodes serves the whole module (``cluster``): ``fragjobs farm start --cpu-workers
1 --node nodeA`` and ``... --node nodeB``, each with its own data and warm-cache folders, as
separate machines would have, sharing one broker (an empty Redis database of our own), one
catalog (a fresh PostgreSQL database, dropped afterwards) and one store
(``s3://<fresh bucket>/farm`` on moto's standalone server). Flower runs next to them from the
start, so it sees every task.

The tests, in order (later ones reuse fragments made by earlier ones, building them if run
alone):

1. a worker refuses an out-of-date catalog; the chain runs across both nodes: rows, objects
   and lineage are there;
2. node B generates with the fragment node A extracted: it downloads it once and extracts
   nothing; afterwards both hold it warm, and batches are routed to their own queues;
   ``fragjobs farm run`` shows a progress bar and prints the images;
3. a worker's pool process is SIGKILLed in the middle of a generate: the job completes on the
   other worker, with every image once; a copy of a running batch's message (as a broker
   restart makes) and one of a finished batch's are dropped: the task succeeds once;
4. a fragment object corrupted behind the store's back is marked corrupt by re-validation
   (``fragjobs.revalidate`` on a worker) and the next job falls back to the full model;
5. Flower lists both workers and the finished tasks (names, arguments, progress) through its
   HTTP API, behind basic auth;
6. SIGTERM stops a node cleanly.

Malformed job specs are rejected before anything is queued: tests/test_tasks.py.
Skipped without Redis at 127.0.0.1:6379, PostgreSQL at 127.0.0.1:5432 or moto[server].
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import AWS_TEST_ENV, AWS_UNSET, S3_REGION, service_reachable

from fragjobs.config import Settings
from fragjobs.drills.cluster import FarmProcesses, fragjobs_cli
from fragjobs.drills.services import free_port
from fragjobs.keys import FRAGMENT_FILE, MANIFEST_FILE, fragment_object, generation_object
from fragjobs.storage import S3Store, WarmCache

PROMPT = "a red circle"
PROMPT_B = "a blue square"
NODES = ("nodeA", "nodeB")
WORKERS = {"nodeA": "cpu0@nodeA", "nodeB": "cpu0@nodeB"}
OWN_QUEUES = {"nodeA": "gpu.nodeA.cpu0", "nodeB": "gpu.nodeB.cpu0"}
ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
FLOWER_LOGIN = ("flower-ops", "flower-pw")
START_TIMEOUT_S = 150
CHAIN_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not (service_reachable("127.0.0.1", 6379) and service_reachable("127.0.0.1", 5432)),
    reason="needs Redis at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432",
)


# -- services --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database_url():
    """A fresh, empty PostgreSQL database of our own (dropped WITH (FORCE) afterwards)."""
    psycopg = pytest.importorskip("psycopg")
    name = f"fragjobs_it_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Bucket:
    """The module's S3 bucket: its URL, a store on it and a plain boto3 client for tampering."""

    endpoint: str
    name: str
    admin: Any
    store: S3Store = field(init=False)

    def __post_init__(self) -> None:
        url = f"s3://{self.name}/farm"
        self.store = S3Store(url, endpoint_url=self.endpoint, region=S3_REGION)

    def put_behind_the_stores_back(self, name: str, data: bytes, sha256: str) -> None:
        """Replace an object, even copying its recorded sha256 metadata (fools a HEAD)."""
        key = f"farm/{name}"
        self.admin.put_object(Bucket=self.name, Key=key, Body=data, Metadata={"sha256": sha256})


@pytest.fixture(scope="module")
def bucket(moto_endpoint):
    """A fresh bucket on the session's moto server; dummy AWS credentials in our environment."""
    import boto3

    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS_TEST_ENV.items():
            patch.setenv(name, value)
        for name in AWS_UNSET:
            patch.delenv(name, raising=False)
        admin = boto3.client("s3", endpoint_url=moto_endpoint, region_name=S3_REGION)
        name = f"farm-{uuid.uuid4().hex[:12]}"
        admin.create_bucket(Bucket=name)
        yield Bucket(moto_endpoint, name, admin)


@pytest.fixture(scope="module")
def farm_env(tmp_path_factory, database_url, module_redis_db, bucket):
    """The environment shared by every process of the farm (client, CLI, workers, Flower)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FRAGJOBS_", "AWS_", "FLOWER_"))
    }
    env.update(AWS_TEST_ENV)
    env.update(
        FRAGJOBS_DATABASE_URL=database_url,
        FRAGJOBS_BROKER_URL=module_redis_db.url,
        FRAGJOBS_STORAGE_URL=bucket.store.url,
        FRAGJOBS_S3_ENDPOINT_URL=bucket.endpoint,
        FRAGJOBS_DATA_DIR=str(tmp_path_factory.mktemp("client")),
        FRAGJOBS_DEVICE="cpu",
        OMP_NUM_THREADS="1",  # two workers on two cores: one thread each
        DIFFUSERS_VERBOSITY="error",
        TRANSFORMERS_VERBOSITY="error",
    )
    return env


# -- the cluster -----------------------------------------------------------------------------
#
# The farm's processes run as the drills run theirs (fragjobs.drills.cluster.FarmProcesses):
# each node in a session of its own, its output in <root>/<name>/out.log, all killed at the end.


@dataclass
class Cluster:
    """The module's farm: processes, a Farm client, the bucket and what earlier tests built."""

    env: dict[str, str]
    processes: FarmProcesses
    farm: Any
    bucket: Bucket
    flower_url: str
    refused: subprocess.Popen
    refused_log: str
    chains: dict[str, Any] = field(default_factory=dict)

    def ensure_chain(self, prompt: str, **submit: Any) -> Any:
        """The FarmResult of the chain for ``prompt`` (4 variants), run once per module."""
        if prompt not in self.chains:
            job = self.farm.submit(prompt, variants=4, model="tiny-sd", batch_size=2, **submit)
            self.chains[prompt] = (job, job.wait(timeout=CHAIN_TIMEOUT_S))
        return self.chains[prompt]

    def ready_key(self, prompt: str, **submit: Any) -> str:
        job, result = self.ensure_chain(prompt, **submit)
        key = result.lineage["fragment_key"]
        if self.farm.catalog.get_fragment(key).status != "ready":
            pytest.skip(f"the fragment of {prompt!r} did not pass its gate on tiny-sd")
        return key

    def wait_for_workers(self, hostnames: set[str]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, process in self.processes.running.items():
                if process.poll() is not None:
                    pytest.fail(f"{name} exited with {process.returncode}:\n{self.log(name)}")
            replies = self.farm.app.control.inspect(timeout=1).ping() or {}
            if hostnames <= set(replies):
                return
            time.sleep(1)
        pytest.fail(f"workers {hostnames} not up after {START_TIMEOUT_S} s")

    def log(self, name: str) -> str:
        return self.processes.log(name)


@pytest.fixture(scope="module")
def cluster(farm_env, bucket, tmp_path_factory):
    from fragjobs.client import Farm

    processes = FarmProcesses(farm_env, tmp_path_factory.mktemp("nodes"))
    settings = Settings(
        **{
            name: farm_env[f"FRAGJOBS_{name.upper()}"]
            for name in (
                "database_url",
                "broker_url",
                "storage_url",
                "data_dir",
                "s3_endpoint_url",
            )
        }
    )
    try:
        # An out-of-date catalog is refused at start-up, with the command that fixes it.
        refused = processes.start_node("nodeA")
        refused.wait(timeout=START_TIMEOUT_S)
        refused_log = processes.log("nodeA")
        upgrade = fragjobs_cli(farm_env, "db", "upgrade")
        assert upgrade.returncode == 0, upgrade.stderr

        for node in NODES:
            processes.start_node(node)
        port = free_port()
        processes.start(
            "flower",
            [sys.executable, "-m", "fragjobs.cli", "flower", "--port", str(port)],
            FRAGJOBS_FLOWER_USER=FLOWER_LOGIN[0],
            FRAGJOBS_FLOWER_PASSWORD=FLOWER_LOGIN[1],
        )
        with Farm(settings) as farm:
            cluster = Cluster(
                farm_env,
                processes,
                farm,
                bucket,
                f"http://127.0.0.1:{port}",
                refused,
                refused_log,
            )
            cluster.wait_for_workers(set(WORKERS.values()))
            yield cluster
    finally:
        processes.kill_all()


def _stats(cluster: Cluster) -> dict[str, dict[str, int]]:
    """Tasks each worker has run, by name (``inspect stats``)."""
    stats = cluster.farm.app.control.inspect(timeout=2).stats() or {}
    return {host: dict(s["total"]) for host, s in stats.items()}


def _outputs(cluster: Cluster, job: Any) -> list[dict[str, Any]]:
    return [cluster.farm.app.AsyncResult(b.task_id).result for b in job.batches]


def _object(key: str, filename: str) -> str:
    return fragment_object(key.split("_", 1)[0], key, filename)


# -- tests -----------------------------------------------------------------------------------


def test_chain_runs_across_two_nodes_on_postgres_and_s3(cluster):
    assert cluster.refused.returncode != 0 and "fragjobs db upgrade" in cluster.refused_log
    status = fragjobs_cli(cluster.env, "farm", "status", timeout=60)
    assert status.returncode == 0, status.stderr
    for node in NODES:
        assert f"{WORKERS[node]}  queues=gpu,{OWN_QUEUES[node]}" in status.stdout

    job, result = cluster.ensure_chain(PROMPT)
    catalog, store = cluster.farm.catalog, cluster.bucket.store
    [fragment] = [f for f in catalog.list_fragments() if f.prompt == PROMPT]
    assert fragment.status in ("ready", "failed_gate")
    validation = catalog.latest_validation(fragment.key)
    assert validation is not None and validation.passed == (fragment.status == "ready")
    images = []
    for job_id in result.job_ids:
        row = catalog.get_job(job_id)
        assert (row.status, row.attempts) == ("done", 1)
        images += catalog.list_images(job_id)
    assert sorted(img.seed for img in images) == [0, 1, 2, 3]
    assert sorted(img.uri for img in images) == sorted(result.image_uris)
    assert all(uri.startswith(store.url + "/generations/") for uri in result.image_uris)
    for img in images:  # in the bucket, with the bytes the catalog recorded
        store.get_bytes(generation_object(img.job_id, f"{img.seed}.png"), img.sha256)
    assert store.get_bytes(_object(fragment.key, FRAGMENT_FILE), fragment.file_sha256)
    assert store.get_bytes(_object(fragment.key, MANIFEST_FILE), fragment.manifest_sha256)
    profile = catalog.get_profile(fragment.profile_id)
    assert store.exists(profile.stats_uri[len(store.url) + 1 :])
    lineage = result.lineage
    assert lineage["fragment_key"] == fragment.key
    assert lineage["base_model"]["name"] == "tiny-sd"
    assert lineage["profile_id"] == fragment.profile_id
    assert lineage["validation_ids"] == [validation.id]
    assert set(result.workers) <= set(WORKERS.values())
    if fragment.status == "ready":
        assert result.fragment_key == fragment.key and not result.used_fallback
        assert lineage["job_ids"] == sorted(result.job_ids)
        assert lineage["image_count"] == 4
    assert job.progress()["state"] == "SUCCESS" and result.errors == []


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-pixart"])
def test_the_other_families_run_the_chain_on_the_nodes(cluster, model):
    """SDXL and the DiT family through the same tasks, workers and library as tiny-sd."""
    job = cluster.farm.submit(PROMPT, variants=4, model=model, batch_size=2)
    result = job.wait(timeout=CHAIN_TIMEOUT_S)
    assert job.progress()["state"] == "SUCCESS" and result.errors == []
    lineage = result.lineage
    assert lineage["base_model"]["name"] == model
    fragment = cluster.farm.catalog.get_fragment(lineage["fragment_key"])
    assert fragment.key.startswith(f"{model}_") and fragment.status in ("ready", "failed_gate")
    assert cluster.bucket.store.get_bytes(
        _object(fragment.key, FRAGMENT_FILE), fragment.file_sha256
    )
    assert len(result.image_uris) == 4
    assert set(result.workers) <= set(WORKERS.values())


def test_node_b_generates_with_node_a_fragment_fetched_once(cluster):
    farm, catalog, store = cluster.farm, cluster.farm.catalog, cluster.bucket.store
    built, _ = cluster.ensure_chain(PROMPT_B, queue=OWN_QUEUES["nodeA"])  # all on node A
    key = cluster.ready_key(PROMPT_B)
    stage_workers = {
        n: farm.app.AsyncResult(t).result["worker"] for n, t in built.stage_task_ids.items()
    }
    assert stage_workers == dict.fromkeys(("profile", "extract", "validate"), WORKERS["nodeA"])
    before = _stats(cluster)[WORKERS["nodeB"]]

    job = farm.submit(
        PROMPT_B, variants=4, model="tiny-sd", batch_size=2, queue=OWN_QUEUES["nodeB"]
    )
    result = job.wait(timeout=CHAIN_TIMEOUT_S)

    assert job.stage_task_ids == {}  # the ready fragment is reused: no profile, no extract
    outputs = _outputs(cluster, job)
    assert [o["worker"] for o in outputs] == [WORKERS["nodeB"]] * 2
    assert result.fragment_key == key and not result.used_fallback
    # Downloaded once: the first batch fetched manifest + file, the second held it warm.
    row = catalog.get_fragment(key)
    names = [_object(key, MANIFEST_FILE), _object(key, FRAGMENT_FILE)]
    sizes = sum(store.stat(name).size for name in names)
    assert [o["fragment_source"] for o in outputs] == ["store", "memory"]
    assert outputs[0]["warm_cache"] == {"hits": 0, "misses": 2, "fetched_bytes": sizes}
    assert outputs[1]["warm_cache"] == {"hits": 0, "misses": 0, "fetched_bytes": 0}
    node_cache = WarmCache(cluster.processes.cache_dir("nodeB"), 2**30)
    assert node_cache.contains(store, names[0], row.manifest_sha256)
    assert node_cache.contains(store, names[1], row.file_sha256)
    after = _stats(cluster)[WORKERS["nodeB"]]
    ran = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert {n: c for n, c in ran.items() if c} == {"fragjobs.generate": 2}  # nothing else
    assert [f.key for f in catalog.list_fragments() if f.prompt == PROMPT_B] == [key]

    # Both nodes now hold the fragment warm and say so; the next job's batches go to them.
    status = fragjobs_cli(cluster.env, "farm", "status", timeout=60)
    for node in NODES:
        line = next(ln for ln in status.stdout.splitlines() if ln.startswith(WORKERS[node]))
        assert key in line.split("warm=")[1]
    assert f"queue {OWN_QUEUES['nodeA']}  waiting=0" in status.stdout
    routed = farm.submit(PROMPT_B, variants=4, model="tiny-sd", batch_size=2)
    assert sorted(b.queue for b in routed.batches) == sorted(OWN_QUEUES.values())
    routed_result = routed.wait(timeout=CHAIN_TIMEOUT_S)
    owner = {OWN_QUEUES[n]: WORKERS[n] for n in NODES}
    assert routed_result.workers == [owner[b.queue] for b in routed.batches]
    assert [o["fragment_source"] for o in _outputs(cluster, routed)] == ["memory", "memory"]


def test_farm_run_command_shows_progress_and_prints_the_images(cluster):
    key = cluster.ready_key(PROMPT)
    flags = ["--model", "tiny-sd", "--variants", "3", "--batch-size", "2"]
    run = fragjobs_cli(cluster.env, "farm", "run", PROMPT, *flags)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["fragment_key"] == key and len(out["images"]) == 3 and out["errors"] == []
    assert len(out["job_ids"]) == 2 and set(out["workers"]) <= set(WORKERS.values())
    assert "3/3" in run.stderr  # the progress bar's last state


def test_killed_worker_job_completes_on_the_other_worker(cluster):
    farm, catalog, store = cluster.farm, cluster.farm.catalog, cluster.bucket.store
    seeds = list(range(100, 124))
    # The shared queue: either worker may take the redelivery.
    key, job, batch = _one_batch(cluster, seeds, affinity=False)
    victim = _wait_for_images(cluster, batch, 4)["worker"]  # half-way: a few images stored
    [survivor] = set(WORKERS.values()) - {victim}
    active = farm.app.control.inspect(destination=[victim], timeout=2).active()
    [pid] = [t["worker_pid"] for t in active[victim] if t["id"] == batch.task_id]
    done_before = len(catalog.list_images(batch.job_id))
    # The victim stops taking shared work first, so that the redelivery cannot go back to it
    # (its pool replaces the killed process at once and would otherwise race the survivor).
    farm.app.control.cancel_consumer("gpu", destination=[victim], reply=True)
    try:
        os.kill(pid, signal.SIGKILL)
        result = job.wait(timeout=90)
    finally:
        farm.app.control.add_consumer("gpu", destination=[victim], reply=True)

    assert result.workers == [survivor] and result.errors == []
    assert result.fragment_key == key
    row = catalog.get_job(batch.job_id)
    assert (row.status, row.attempts) == ("done", 2)  # delivered twice, counted twice
    images = catalog.list_images(batch.job_id)
    assert 4 <= done_before < len(seeds)
    assert [img.seed for img in images] == seeds  # every seed, once
    assert len({img.uri for img in images}) == len(seeds)
    for img in images:
        store.get_bytes(generation_object(batch.job_id, f"{img.seed}.png"), img.sha256)


def test_a_copy_of_a_running_batch_completes_it_once(cluster):
    """The same message delivered twice, as a broker restart does when a worker restores an
    unacknowledged message while its batch runs: the copy (on the other node) waits for the
    batch, is dropped, and the task succeeds once; a copy delivered after the job finished
    (a lost acknowledgement) is dropped too. Rows, images and the stored result stay."""
    farm, catalog = cluster.farm, cluster.farm.catalog
    seeds = list(range(200, 212))
    key, job, batch = _one_batch(cluster, seeds, queue=OWN_QUEUES["nodeA"])
    _wait_for_images(cluster, batch, 2)
    message = {
        "args": ({"key": key},),
        "kwargs": {
            "prompt": PROMPT,
            "seeds": seeds,
            "job_id": batch.job_id,
            "model": "tiny-sd",
            "batch_size": 2,
        },
        "task_id": batch.task_id,
    }
    farm.app.send_task("fragjobs.generate", queue=OWN_QUEUES["nodeB"], **message)
    result = job.wait(timeout=90)
    assert result.errors == [] and result.workers == [WORKERS["nodeA"]]
    finished = catalog.get_job(batch.job_id)
    _wait_for_drops(cluster, batch.task_id, 1)
    farm.app.send_task("fragjobs.generate", queue=OWN_QUEUES["nodeA"], **message)
    _wait_for_drops(cluster, batch.task_id, 2)

    logs = "".join(cluster.processes.log_path(node).read_text() for node in NODES)
    assert logs.count(f"fragjobs.generate[{batch.task_id}] succeeded") == 1
    row = catalog.get_job(batch.job_id)
    assert (row.status, row.attempts, row.finished_at) == ("done", 3, finished.finished_at)
    assert [img.seed for img in catalog.list_images(batch.job_id)] == seeds  # every seed, once
    stored = farm.app.AsyncResult(batch.task_id)
    assert stored.state == "SUCCESS" and stored.result["worker"] == WORKERS["nodeA"]
    assert not stored.result["redelivered"]


def _one_batch(cluster: Cluster, seeds: list[int], **route: Any) -> tuple[str, Any, Any]:
    """(ready fragment key, job, its one batch) of a job of ``seeds`` for :data:`PROMPT`."""
    key = cluster.ready_key(PROMPT)
    job = cluster.farm.submit(
        PROMPT, seeds=seeds, model="tiny-sd", batch_size=len(seeds), pipeline_batch_size=2, **route
    )
    [batch] = job.batches
    return key, job, batch


def _wait_for_images(cluster: Cluster, batch: Any, step: int) -> dict[str, Any]:
    """The PROGRESS info of ``batch`` once it reported ``step`` images."""
    deadline = time.monotonic() + 60
    while True:
        state = cluster.farm.app.AsyncResult(batch.task_id)
        if state.state == "PROGRESS" and state.info["step"] >= step:
            return state.info
        assert time.monotonic() < deadline, f"batch not started: {state.state}"
        time.sleep(0.1)


def _wait_for_drops(cluster: Cluster, task_id: str, count: int) -> None:
    """Wait until the nodes' logs say ``count`` copies of ``task_id`` were dropped."""
    said = f"dropped a redelivered copy of task {task_id}"
    deadline = time.monotonic() + 90
    while True:
        logs = "".join(cluster.processes.log_path(node).read_text() for node in NODES)
        if logs.count(said) >= count:
            return
        assert time.monotonic() < deadline, f"{count} copies not dropped:\n{logs[-3000:]}"
        time.sleep(0.5)


def test_corrupt_object_is_marked_by_revalidation_and_generation_falls_back(cluster):
    farm, catalog, store = cluster.farm, cluster.farm.catalog, cluster.bucket.store
    key = cluster.ready_key(PROMPT_B, queue=OWN_QUEUES["nodeA"])
    row = catalog.get_fragment(key)
    name = _object(key, FRAGMENT_FILE)
    cluster.bucket.put_behind_the_stores_back(name, b"bit rot" * 100, row.file_sha256)
    assert store.stat(name).sha256 == row.file_sha256  # the metadata still looks right

    report = farm.app.send_task("fragjobs.revalidate").get(timeout=CHAIN_TIMEOUT_S)

    checks = {c["key"]: c for c in report["checks"]}
    assert report["skipped"] is None and checks[key]["status"] == "corrupt"
    assert name in checks[key]["reason"] and not checks[key]["objects_ok"]
    assert catalog.get_fragment(key).status == "corrupt"
    others = [c for k, c in checks.items() if k != key]
    assert all(c["status"] == "ready" and c["gate_passed"] for c in others)

    # A generation job that names the corrupt fragment falls back to the full model, loudly.
    fallback = farm.app.send_task(
        "fragjobs.generate",
        args=({"key": key},),
        kwargs={"prompt": PROMPT_B, "seeds": [40, 41], "job_id": "corrupt-fallback"},
    ).get(timeout=CHAIN_TIMEOUT_S)
    assert fallback["used_fallback"] and fallback["fragment_key"] is None
    assert len(fallback["image_uris"]) == 2
    assert key in fallback["fallback_reason"] and "corrupt" in fallback["fallback_reason"]
    job_row = catalog.get_job("corrupt-fallback")
    assert job_row.used_fallback and job_row.fallback_reason == fallback["fallback_reason"]

    # The next chain for the prompt rebuilds the corrupt fragment in place instead of
    # leaving the prompt on the full model forever; the new bytes pass the hash checks.
    job = farm.submit(PROMPT_B, variants=2, model="tiny-sd", batch_size=2)
    result = job.wait(timeout=CHAIN_TIMEOUT_S)
    extract = farm.app.AsyncResult(job.stage_task_ids["extract"]).result
    assert extract["key"] == key and not extract["reused"]
    rebuilt = catalog.get_fragment(key)
    assert rebuilt.status == "ready" and store.stat(name, verify=True).sha256 == rebuilt.file_sha256
    assert result.fragment_key == key and not result.used_fallback
    assert len(result.image_uris) == 2


def _flower(cluster: Cluster, path: str, auth: tuple[str, str] | None = FLOWER_LOGIN) -> Any:
    """GET ``path`` from Flower's HTTP API: (status, JSON body or None)."""
    request = urllib.request.Request(cluster.flower_url + path)
    if auth is not None:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_flower_lists_workers_and_tasks_with_progress(cluster):
    farm = cluster.farm
    cluster.ready_key(PROMPT)

    assert _flower(cluster, "/api/workers", auth=None)[0] == 401
    assert _flower(cluster, "/api/workers", auth=("flower-ops", "wrong"))[0] == 401
    status, workers = _flower(cluster, "/api/workers?refresh=1")
    assert status == 200 and set(WORKERS.values()) <= set(workers)

    job = farm.submit(
        PROMPT, variants=8, model="tiny-sd", batch_size=8, pipeline_batch_size=2, affinity=False
    )
    [batch] = job.batches
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, info = _flower(cluster, f"/api/task/info/{batch.task_id}")
        if status == 200:  # 404 until Flower has seen the task
            seen.append((info["state"], info.get("result")))
            if info["state"] == "SUCCESS":
                break
        time.sleep(0.1)
    job.wait(timeout=60)
    progress = [result for state, result in seen if state == "PROGRESS"]
    assert progress, f"no PROGRESS seen by Flower: {seen}"
    assert {"step", "total", "job_id", "worker"} <= set(progress[-1])
    assert progress[-1]["total"] == 8

    status, tasks = _flower(cluster, "/api/tasks")
    assert status == 200
    mine = tasks[batch.task_id]
    assert (mine["name"], mine["state"]) == ("fragjobs.generate", "SUCCESS")
    assert PROMPT in mine["args"] and batch.job_id in mine["kwargs"]
    assert mine["worker"] in WORKERS.values()
    finished = [t for t in tasks.values() if t["state"] == "SUCCESS"]
    assert {t["name"] for t in finished} >= {"fragjobs.generate"}
    assert all(t["name"] and t["args"] is not None for t in finished)
    if cluster.chains.get(PROMPT):
        first_job, _ = cluster.chains[PROMPT]
        profile = tasks[first_job.stage_task_ids["profile"]]
        assert profile["name"] == "fragjobs.profile" and PROMPT in profile["args"]


def test_sigterm_stops_each_node_cleanly(cluster):
    for node in NODES:
        launcher = cluster.processes.running[node]
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0, cluster.log(node)
        deadline = time.monotonic() + 30
        while True:
            try:
                os.killpg(launcher.pid, 0)
            except ProcessLookupError:
                break  # no process of the node is left
            assert time.monotonic() < deadline, f"{node}'s workers outlived their launcher"
            time.sleep(0.5)
    assert cluster.farm.registry.workers() == {}  # advertisements withdrawn on shutdown
