"""The farm's tasks, run eagerly on an embedded workspace, and Farm.submit's checks.

Task tests call ``task.apply(...)`` (no broker, no worker); PROGRESS states go to an in-memory
result backend. The submit and affinity tests need the Redis server at 127.0.0.1:6379
(skipped without it): they use an empty Redis database of their own (conftest ``redis_db``)
and check what was (not) queued there.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from fragjobs import chain
from fragjobs.chain import delivery
from fragjobs.errors import (
    CatalogError,
    InvalidInputError,
    UnknownModelError,
)
from fragjobs.keys import generation_object, make_fragment_key, sha256_hex

PROMPT = "a red circle"


@pytest.fixture
def tasks(settings):
    """The tasks module; its tasks record their states in an in-memory result backend."""
    from celery.backends.cache import CacheBackend

    from tasks import catalog as catalog_tasks
    from tasks import chain as chain_tasks
    from tasks.app import app

    backend = CacheBackend(app=app, url="memory://")
    all_tasks = (
        chain_tasks.profile,
        chain_tasks.extract,
        chain_tasks.validate,
        chain_tasks.generate,
        catalog_tasks.revalidate,
        catalog_tasks.fragment_status,
    )
    for task in all_tasks:
        task.backend = backend
    yield chain_tasks
    for task in all_tasks:
        task.backend = None  # back to the app's backend


def _generate(tasks, job_id, seeds=(0, 1), upstream=None, batch_size=1, task_id=None):
    return tasks.generate.apply(
        args=() if upstream is None else (upstream,),
        kwargs={
            "prompt": PROMPT,
            "seeds": list(seeds),
            "job_id": job_id,
            "model": "tiny-sd",
            "batch_size": batch_size,
        },
        task_id=task_id,
    )


# -- tasks -----------------------------------------------------------------------------------


def test_generate_stores_images_reports_progress_and_is_idempotent(tasks, ws):
    first = _generate(tasks, "job-a")
    out = first.get()
    assert out["error"] is None and out["seeds"] == [0, 1]
    assert out["used_fallback"] and out["fragment_key"] is None  # no fragment exists yet
    for seed in (0, 1):
        assert ws.store.exists(generation_object("job-a", f"{seed}.png"))
    job = ws.catalog.get_job("job-a")
    assert (job.status, job.attempts) == ("done", 1)
    assert [img.uri for img in ws.catalog.list_images("job-a")] == out["image_uris"]
    meta = tasks.generate.backend.get_task_meta(first.id)
    assert meta["status"] == "PROGRESS"
    assert meta["result"] == {"step": 2, "total": 2, "job_id": "job-a", "worker": out["worker"]}

    again = _generate(tasks, "job-a").get()  # a redelivery (acks_late): same job, same images
    assert again["image_uris"] == out["image_uris"] and again["redelivered"]
    assert not out["redelivered"]
    assert ws.catalog.get_job("job-a").attempts == 2
    assert ws.catalog.get_job("job-a").finished_at == job.finished_at  # nothing rewritten
    assert len(ws.catalog.list_images("job-a")) == 2

    # The first delivery's result stored (as a worker does when the task returns): a copy of
    # that same message is acknowledged and dropped, the stored result stays.
    tasks.generate.backend.store_result(first.id, out, "SUCCESS")
    copy = _generate(tasks, "job-a", task_id=first.id)
    assert copy.state == "IGNORED"
    assert tasks.generate.backend.get_task_meta(first.id)["result"] == out
    assert ws.catalog.get_job("job-a").attempts == 3
    assert ws.catalog.get_job("job-a").finished_at == job.finished_at


@pytest.fixture
def queued_job(ws):
    """A generation job row, as the first delivery of ``fragjobs.generate`` creates it."""
    base = ws.catalog.get_or_create_base_model("tiny-sd", sha256_hex(b"tiny"), "builtin:tiny-sd")
    return ws.catalog.create_job("job-p", base.id, PROMPT, [0, 1], None)[0]


def _fake_generate(calls):
    def generate(prompt, *, seeds, job_id, **kwargs):
        calls.append(job_id)
        return chain.GenerationResult(job_id, seeds, [], None, True, "fake", images=None)

    return generate


def test_poison_job_is_given_up_after_max_attempts(tasks, ws, queued_job, monkeypatch):
    for _ in range(3):  # three deliveries that killed their worker
        ws.catalog.increment_job_attempts(queued_job.job_id)
    calls = []
    monkeypatch.setattr(delivery, "generate", _fake_generate(calls))

    out = _generate(tasks, queued_job.job_id).get()
    assert calls == []  # not run a fourth time
    assert "delivered 4 times (limit 3" in out["error"]
    assert out["image_uris"] == []
    job = ws.catalog.get_job(queued_job.job_id)
    assert (job.status, job.attempts) == ("failed", 4)
    assert job.finished_at is not None


def test_attempt_limit_is_a_setting(tasks, ws, queued_job, monkeypatch):
    from tasks.app import app

    monkeypatch.setitem(app.conf, "fragjobs_max_task_attempts", 1)
    calls = []
    monkeypatch.setattr(delivery, "generate", _fake_generate(calls))
    assert _generate(tasks, queued_job.job_id).get()["error"] is None
    assert "delivered 2 times (limit 1" in _generate(tasks, queued_job.job_id).get()["error"]
    assert calls == [queued_job.job_id]


def test_chain_tasks_pass_ids_and_validate_is_idempotent(tasks, ws):
    cheap = {"knobs": {"model": "tiny-sd", "profile_seeds": [0, 1], "steps": 4}}
    prof = tasks.profile.apply(args=(PROMPT,), kwargs=cheap).get()
    assert ws.catalog.get_profile(prof["profile_id"]).stats_uri == prof["stats_uri"]
    knobs = {"threshold": 0.75, "model": "tiny-sd"}
    ext = tasks.extract.apply(args=(prof,), kwargs={"knobs": knobs}).get()
    assert ws.catalog.get_fragment(ext["key"]).profile_id == prof["profile_id"]
    val = tasks.validate.apply(args=(ext,), kwargs={"seeds": [1000, 1001]}).get()
    row = ws.catalog.get_fragment(ext["key"])
    assert val["key"] == ext["key"] and val["status"] == row.status
    assert row.status in ("ready", "failed_gate") and val["passed"] == (row.status == "ready")
    assert val["validation_id"] == ws.catalog.latest_validation(ext["key"]).id

    again = tasks.validate.apply(args=(ext["key"],)).get()  # redelivered: not run twice
    assert again["reused"] and again["validation_id"] == val["validation_id"]
    assert ws.catalog.lineage(ext["key"])["validation_ids"] == [val["validation_id"]]

    out = _generate(tasks, "job-c", upstream=val, batch_size=2).get()
    if val["passed"]:
        assert out["fragment_key"] == ext["key"] and not out["used_fallback"]
        assert ws.catalog.lineage(ext["key"])["job_ids"] == ["job-c"]
    else:
        assert out["used_fallback"] and "failed_gate" in out["fallback_reason"]


def test_validate_task_extracts_a_more_conservative_fragment_when_the_gate_fails(
    tasks, gate_ssim_min
):
    gate_ssim_min(1.0)  # nothing lossy passes
    ws = chain.workspace()
    knobs = {"model": "tiny-sd", "profile_seeds": [0, 1]}
    prof = tasks.profile.apply(args=(PROMPT,), kwargs={"knobs": knobs}).get()
    ext = tasks.extract.apply(args=(prof,), kwargs={"knobs": {**knobs, "threshold": 0.5}}).get()
    extraction = {k: ext["knobs"][k] for k in ("threshold", "low_rank", "int8", "caching")}
    assert extraction == {"threshold": 0.5, "low_rank": False, "int8": True, "caching": True}
    assert ext["knobs"]["fidelity"] == 0.9
    first = ws.catalog.get_fragment(ext["key"])
    assert first.status == "building"
    val = tasks.validate.apply(args=(ext,), kwargs={"seeds": [1000]}).get()
    attempts = val["attempts"]
    assert attempts[0]["key"] == ext["key"] and val["key"] == attempts[-1]["key"]
    assert attempts[0]["heads_kept"] < attempts[0]["heads_total"]  # half the heads asked for
    assert 2 <= len(attempts) <= chain.GATE_ATTEMPTS
    assert attempts[1]["heads_kept"] == attempts[1]["heads_total"]  # first rung: no pruning
    assert not val["passed"] and val["status"] == "failed_gate"
    for attempt in attempts:
        assert ws.catalog.get_fragment(attempt["key"]).status == "failed_gate"
        # each fragment validated once: the first one's verdict was not made again
        assert len(ws.catalog.lineage(attempt["key"])["validation_ids"]) == 1
    again = tasks.validate.apply(args=(ext,)).get()  # redelivered: the recorded verdict
    assert again["reused"] and again["key"] == ext["key"] and "attempts" not in again
    bare = tasks.validate.apply(args=(attempts[-1]["key"],)).get()  # a bare key: no ladder
    assert bare["reused"] and bare["key"] == attempts[-1]["key"]


def _raise_catalog_error(cause: Exception):
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise CatalogError("catalog database failed") from cause

    return fail, calls


def test_lost_database_connection_is_retried_then_reported(tasks, monkeypatch):
    fail, calls = _raise_catalog_error(OperationalError("SELECT 1", {}, ConnectionError("gone")))
    monkeypatch.setattr(delivery, "profile", fail)
    result = tasks.profile.apply(args=(PROMPT,), kwargs={"knobs": {"model": "tiny-sd"}})
    assert result.state == "FAILURE"
    assert isinstance(result.result, tasks.TransientError)
    assert len(calls) == 1 + tasks.profile.max_retries


def test_permanent_catalog_error_is_not_retried(tasks, monkeypatch):
    fail, calls = _raise_catalog_error(IntegrityError("INSERT", {}, ValueError("duplicate")))
    monkeypatch.setattr(delivery, "profile", fail)
    result = tasks.profile.apply(args=(PROMPT,), kwargs={"knobs": {"model": "tiny-sd"}})
    assert result.state == "FAILURE" and type(result.result) is CatalogError
    assert len(calls) == 1


def test_malformed_upstream_is_a_clear_error(tasks):
    result = tasks.extract.apply(args=({"key": "not-a-profile"},))
    assert isinstance(result.result, InvalidInputError)
    assert "profile_id" in str(result.result)


# -- worker start-up -------------------------------------------------------------------------


def test_worker_starts_on_a_healthy_embedded_setup(settings, redis_db, monkeypatch):
    """The start check migrates the SQLite file and lets the worker start; its refusals
    (real workers, real services) are in tests/doctor/test_worker_start.py."""
    from tasks import worker

    monkeypatch.setenv("FRAGJOBS_BROKER_URL", redis_db.url)
    worker.refuse_to_start_unhealthy(sender=None)  # does not exit
    assert (settings.data_dir / "catalog.db").is_file()


def test_pool_process_opens_its_own_workspace(monkeypatch):
    from tasks import worker

    monkeypatch.setattr(chain.STATE, "workspaces", {("inherited", "from parent"): object()})
    worker.open_own_workspace(sender=None)
    assert chain.STATE.workspaces == {}


# -- Farm.submit -------------------------------------------------------------------------------


@pytest.fixture
def broker(settings, redis_db):
    """An empty Redis database of our own (conftest) and settings that use it."""
    url = redis_db.url
    return redis_db.client, settings.model_copy(update={"broker_url": url, "result_backend": url})


@pytest.fixture
def farm(broker):
    from fragjobs.client import Farm

    client, settings = broker
    with Farm(settings) as farm:
        yield farm, client


def _queued(client, queue="gpu"):
    """(task name, args, kwargs, argsrepr) of each message waiting in ``queue``, oldest first."""
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # kombu pushes left, pops right
        message = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        headers = message["headers"]
        out.append((headers["task"], args, kwargs, headers["argsrepr"]))
    return out


BAD_SPECS = [
    ({"prompt": "   "}, InvalidInputError, "prompt is empty"),
    ({"prompt": 3}, InvalidInputError, "prompt must be a string"),
    ({"variants": 0}, InvalidInputError, "variants"),
    ({"variants": "4"}, InvalidInputError, "variants"),
    ({"variants": True}, InvalidInputError, "variants"),
    ({"variants": 10_001}, InvalidInputError, "variants"),
    ({"seeds": [1, 1]}, InvalidInputError, "distinct"),
    ({"seeds": [-1]}, InvalidInputError, "seed"),
    ({"seeds": "0,1"}, InvalidInputError, "seeds must be a list"),
    ({"seeds": []}, InvalidInputError, "must not be empty"),
    ({"batch_size": 0}, InvalidInputError, "batch_size"),
    ({"threshold": 0}, InvalidInputError, "threshold"),
    ({"threshold": 1.5}, InvalidInputError, "threshold"),
    ({"threshold": "0.5"}, InvalidInputError, "threshold"),
    ({"model": ""}, InvalidInputError, "model"),
    ({"model": "no-such-model"}, UnknownModelError, "unknown model 'no-such-model'"),
    ({"model": "/no/such/folder"}, UnknownModelError, "unknown model"),
    ({"queue": "gpu n1"}, InvalidInputError, "queue must be a queue name"),
    ({"pipeline_batch_size": 0}, InvalidInputError, "pipeline_batch_size"),
]


@pytest.mark.parametrize(("spec", "error", "match"), BAD_SPECS)
def test_malformed_spec_queues_nothing(farm, spec, error, match):
    farm, client = farm
    kwargs = {"prompt": PROMPT, "variants": 4, "model": "tiny-sd", **spec}
    with pytest.raises(error, match=match):
        farm.submit(**kwargs)
    assert client.dbsize() == 0  # no queue, no binding, no result: nothing reached Redis


def test_valid_spec_queues_the_chain_in_one_message(farm):
    farm, client = farm
    job = farm.submit(PROMPT, variants=6, model="tiny-sd", batch_size=4)
    assert job.reused_fragment is None and len(job.job_ids) == 2
    [(name, args, kwargs, argsrepr)] = _queued(client)  # the rest travels in the message
    assert name == "fragjobs.profile" and args == [PROMPT] and kwargs["knobs"]["model"] == "tiny-sd"
    assert PROMPT in argsrepr
    progress = job.progress()
    assert progress["state"] == "PENDING" and progress["images_total"] == 6
    assert [b["images_total"] for b in progress["batches"]] == [4, 2]


def test_ready_fragment_is_reused_without_profiling(farm, ws):
    farm, client = farm
    catalog = ws.catalog
    sha = sha256_hex(b"stored")
    base = catalog.get_or_create_base_model("tiny-sd", sha256_hex(b"tiny"), "builtin:tiny-sd")
    other = catalog.get_or_create_base_model("sd15-shape", sha256_hex(b"sd15"), "builtin:sd15")
    for model_row in (base, other):
        profile_id = make_fragment_key(model_row.name, PROMPT, {"profile": model_row.id})
        catalog.get_or_create_profile(
            profile_id, model_row.id, PROMPT, sha256_hex(PROMPT), {}, "file:///s", sha, "file:///i"
        )
        key = make_fragment_key(model_row.name, PROMPT, {"t": 1})
        catalog.create_fragment(key, profile_id, model_row.id, PROMPT, {}, "file:///f")
        catalog.set_fragment_status(key, "ready")
    key = make_fragment_key("tiny-sd", PROMPT, {"t": 1})

    job = farm.submit("A  red circle ", variants=3, model="tiny-sd", batch_size=2)
    assert job.reused_fragment == key and job.stage_task_ids == {}
    queued = _queued(client)
    assert [name for name, *_ in queued] == ["fragjobs.generate", "fragjobs.generate"]
    assert all(args == [{"key": key}] for _, args, _, _ in queued)
    assert [kwargs["seeds"] for _, _, kwargs, _ in queued] == [[0, 1], [2]]
    assert [kwargs["job_id"] for _, _, kwargs, _ in queued] == job.job_ids
    assert all(key in argsrepr for *_, argsrepr in queued)


# -- farm launcher (fragjobs.farm) -----------------------------------------------------------


def test_gpu_workers_are_pinned_one_per_gpu():
    from fragjobs.farm import worker_command, worker_env, worker_specs

    specs = worker_specs(node="n1", gpus=[0, 3])
    assert [(s.hostname, s.queues, s.cuda_visible_devices) for s in specs] == [
        ("gpu0@n1", ("gpu", "gpu.n1.0"), "0"),
        ("gpu3@n1", ("gpu", "gpu.n1.3"), "3"),
    ]
    command = worker_command(specs[1])
    assert command[1:6] == ["-m", "celery", "-A", "tasks.app", "worker"]
    options = dict(zip(command[6::2], command[7::2], strict=True))
    assert options == {
        "--pool": "prefork",
        "--concurrency": "1",
        "--queues": "gpu,gpu.n1.3",
        "--hostname": "gpu3@n1",
        "--loglevel": "info",
    }
    env = worker_env(specs[1], {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["PATH"] == "/bin"
    root = env["PYTHONPATH"].split(os.pathsep)[0]
    assert (Path(root) / "celeryconfig.py").is_file()


def test_cpu_workers_see_no_gpu():
    from fragjobs.farm import worker_env, worker_specs

    specs = worker_specs(node="n1", cpu_workers=2)
    assert [(s.hostname, s.queues) for s in specs] == [
        ("cpu0@n1", ("gpu", "gpu.n1.cpu0")),
        ("cpu1@n1", ("gpu", "gpu.n1.cpu1")),
    ]
    assert worker_env(specs[0], {"CUDA_VISIBLE_DEVICES": "0"})["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(
    "args",
    [
        ["--cpu-workers", "1", "--node", "bad node"],
        ["--node", "n1"],
        ["--gpus", "0", "--cpu-workers", "1"],
        ["--cpu-workers", "0"],
        ["--gpus", "0,0"],
        ["--gpus", "-1"],
        ["--gpus", "a"],
    ],
)
def test_farm_start_rejects_bad_flags_before_starting_anything(args, monkeypatch):
    from click.testing import CliRunner

    from fragjobs.cli import main
    from fragjobs.farm import launcher

    monkeypatch.setattr(launcher, "run_workers", lambda *a, **k: pytest.fail("workers started"))
    result = CliRunner().invoke(main, ["farm", "start", *args])
    assert result.exit_code == 2 and "Error:" in result.output


def test_launcher_imports_neither_torch_nor_celery():
    code = (
        "import sys\n"
        "from fragjobs.cli import main\n"
        "from fragjobs.farm import worker_command, worker_env, worker_specs\n"
        "spec = worker_specs(node='n', gpus=[0])[0]\n"
        "worker_env(spec), worker_command(spec)\n"
        "print(sorted(m for m in ('torch', 'celery', 'diffusers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- results, progress events, catalog tasks -------------------------------------------------


@pytest.fixture
def ready_ws(settings, ready_fragment_template, monkeypatch):
    """The tasks' workspace (the environment's) holding a copy of the ready fragment."""
    from collections import OrderedDict

    ready_fragment_template.copy_to(settings.data_dir)
    monkeypatch.setattr(chain.STATE, "workspaces", {})
    monkeypatch.setattr(chain.STATE, "fragment_unets", OrderedDict())
    workspace = chain.workspace()
    yield workspace
    workspace.close()


def test_generate_says_where_the_fragment_came_from(tasks, ready_ws, ready_fragment_template):
    key = ready_fragment_template.key
    # seeds the chain did not profile: the fragment generates them (kept full-model images
    # of profiled seeds would be delivered without generating)
    first = _generate(tasks, "job-w1", seeds=(50, 51), upstream={"key": key}).get()
    second = _generate(tasks, "job-w2", seeds=(50, 51), upstream={"key": key}).get()
    assert first["fragment_key"] == second["fragment_key"] == key
    # A local store is read directly (no node cache); the second batch finds the UNet built.
    assert (first["fragment_source"], second["fragment_source"]) == ("store", "memory")
    assert first["warm_cache"] == {"hits": 0, "misses": 0, "fetched_bytes": 0}
    # What the memory manager did travels with the result (and is on the job row).
    assert first["memory"]["batch_size_used"] >= 1 and first["memory"]["oom_events"] == []
    assert first["memory"] == chain.workspace().catalog.get_job("job-w1").metrics
    assert chain.warm_fragment_keys() == [key]
    assert "worker" in first  # the hostname; None when run eagerly


def test_validate_does_not_revive_a_corrupt_fragment(tasks, ready_ws, ready_fragment_template):
    key = ready_fragment_template.key
    ready_ws.catalog.set_fragment_status(key, "corrupt", "object 'x' is corrupt")
    out = tasks.validate.apply(args=({"key": key},)).get()
    assert (out["status"], out["passed"], out["reused"]) == ("corrupt", False, True)
    assert "object 'x' is corrupt" in out["error"]
    assert ready_ws.catalog.get_fragment(key).status == "corrupt"
    assert ready_ws.catalog.lineage(key)["validation_ids"] == [out["validation_id"]]


@pytest.fixture
def catalog_tasks(tasks):
    """The catalog tasks module (same in-memory result backend as ``tasks``)."""
    from tasks import catalog

    return catalog


def test_revalidate_task_marks_corrupt_and_reports_progress(
    catalog_tasks, ready_ws, ready_fragment_template
):
    from fragjobs.chain import revalidation_lock
    from fragjobs.keys import FRAGMENT_FILE, fragment_object

    key = ready_fragment_template.key
    ready_ws.store.put_bytes(fragment_object("tiny-sd", key, FRAGMENT_FILE), b"broken")
    with revalidation_lock(ready_ws):
        locked = catalog_tasks.revalidate.apply().get()
    assert locked["skipped"] and locked["checks"] == []

    result = catalog_tasks.revalidate.apply(kwargs={"gate": True})
    out = result.get()
    assert out["skipped"] is None
    [check] = out["checks"]
    assert (check["key"], check["status"], check["objects_ok"]) == (key, "corrupt", False)
    meta = catalog_tasks.revalidate.backend.get_task_meta(result.id)
    assert meta["status"] == "PROGRESS" and meta["result"] == {"step": 1, "total": 1, "key": key}


def test_fragment_status_is_a_cheap_round_trip(catalog_tasks, ready_ws, ready_fragment_template):
    status = catalog_tasks.fragment_status
    before = time.time()
    out = status.apply(args=(ready_fragment_template.key,)).get()
    assert (out["key"], out["status"]) == (ready_fragment_template.key, "ready")
    assert before <= out["checked_at"] <= time.time()
    assert isinstance(status.apply(args=("Bad Key",)).result, InvalidInputError)


def test_progress_is_also_an_event_for_flower_on_a_worker(tasks, monkeypatch):
    task = tasks.generate
    states, events = [], []
    monkeypatch.setattr(task, "update_state", lambda **kw: states.append(kw))
    monkeypatch.setattr(task, "send_event", lambda kind, **kw: events.append((kind, kw)))

    task.push_request(id="t-1", hostname="cpu0@n1", is_eager=False)
    try:
        task.report_progress(2, 4, job_id="j")
    finally:
        task.pop_request()
    info = {"step": 2, "total": 4, "job_id": "j"}
    assert states == [{"state": "PROGRESS", "meta": info}]
    assert events == [("task-progress", {"result": info})]

    task.push_request(id="t-2", hostname=None, is_eager=True)  # apply(): no broker, no event
    try:
        task.report_progress(1, 4)
    finally:
        task.pop_request()
    assert len(states) == 2 and len(events) == 1
