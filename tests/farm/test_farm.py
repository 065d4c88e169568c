"""Tests of fragjobs.farm and the client's routing, without workers.

Fragment affinity (registry, plan, routing), pinned jobs, the Flower launcher and the farm's
settings. Tests that need Redis use an empty database of their own (conftest ``redis_db``)
and are skipped without the server.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from fragjobs.errors import InvalidInputError, UnknownModelError
from fragjobs.farm import (
    SHARED_QUEUE,
    FarmSettings,
    WarmRegistry,
    WarmWorker,
    flower_command,
    flower_env,
    scratch_redis_database,
)
from fragjobs.farm.client import AFFINITY_INSPECT_TIMEOUT_S, plan_batch_queues
from fragjobs.keys import make_fragment_key, sha256_hex

PROMPT = "a red circle"
KEY_A = make_fragment_key("tiny-sd", PROMPT, {"t": 1})
KEY_B = make_fragment_key("tiny-sd", "a blue square", {"t": 1})


def _worker(hostname: str, queue: str | None, *fragments: str) -> WarmWorker:
    return WarmWorker(hostname, queue, fragments, 0.0)


# -- the registry ----------------------------------------------------------------------------


def test_registry_round_trip_with_expiry(redis_db):
    registry = WarmRegistry(redis_db.url, ttl_s=60)
    registry.advertise("cpu0@a", "gpu.a.cpu0", [KEY_B, KEY_A])
    registry.advertise("cpu0@b", "gpu.b.cpu0", [KEY_A])
    registry.advertise("cpu1@b", "gpu.b.cpu1", [])

    workers = registry.workers()
    assert sorted(workers) == ["cpu0@a", "cpu0@b", "cpu1@b"]
    assert workers["cpu0@a"].fragments == (KEY_B, KEY_A)
    assert workers["cpu0@a"].queue == "gpu.a.cpu0"
    assert abs(workers["cpu0@a"].updated_at - time.time()) < 60
    # Most recently used there first: KEY_A is cpu0@b's newest, cpu0@a's second.
    assert [w.hostname for w in registry.holders(KEY_A)] == ["cpu0@b", "cpu0@a"]
    assert 0 < redis_db.client.ttl("fragjobs:warm:cpu0@a") <= 60

    registry.forget("cpu0@b")
    assert [w.hostname for w in registry.holders(KEY_A)] == ["cpu0@a"]
    redis_db.client.rpush("gpu.a.cpu0", b"m1", b"m2")
    assert registry.waiting("gpu.a.cpu0") == 2 and registry.waiting("gpu.none") == 0
    registry.close()


def test_registry_needs_a_redis_broker():
    assert WarmRegistry.for_broker("amqp://guest@localhost//") is None
    assert WarmRegistry.for_broker("redis://127.0.0.1:6379/3") is not None


def test_scratch_databases_are_claimed_one_user_each(redis_db):
    with scratch_redis_database() as first, scratch_redis_database() as second:
        assert first != second and redis_db.url not in (first, second)
        import redis

        client = redis.Redis.from_url(first)
        client.set("k", "v")
        client.close()
    client = redis.Redis.from_url(first)
    assert client.dbsize() == 0  # flushed
    client.close()


# -- the plan --------------------------------------------------------------------------------


def test_plan_gives_each_free_holder_one_batch_and_the_rest_to_the_shared_queue():
    holders = [_worker("g0@a", "gpu.a.0", KEY_A), _worker("g1@a", "gpu.a.1", KEY_A)]
    assert plan_batch_queues(3, holders, {"g0@a", "g1@a"}) == ["gpu.a.0", "gpu.a.1", None]
    assert plan_batch_queues(3, holders, {"g1@a"}) == ["gpu.a.1", None, None]
    assert plan_batch_queues(1, holders, {"g0@a", "g1@a"}) == ["gpu.a.0"]
    assert plan_batch_queues(2, holders, set()) == [None, None]
    assert plan_batch_queues(2, [], {"g0@a"}) == [None, None]


# -- routing in Farm.submit ------------------------------------------------------------------


class FakeInspect:
    """``app.control.inspect``: replies from the given hostnames only."""

    def __init__(self, replies: dict[str, list], calls: list) -> None:
        self.replies, self.calls = replies, calls

    def __call__(self, destination=None, timeout=None, limit=None):
        self.calls.append({"destination": destination, "limit": limit, "timeout": timeout})
        wanted = {h: r for h, r in self.replies.items() if h in (destination or self.replies)}
        return SimpleNamespace(active=lambda: wanted)


@pytest.fixture
def farm(redis_db, settings, ws):
    """A Farm on our own Redis database, with a ready fragment KEY_A-like in the catalog."""
    from fragjobs.client import Farm

    url = redis_db.url
    farm_settings = settings.model_copy(update={"broker_url": url, "result_backend": url})
    catalog = ws.catalog
    base = catalog.get_or_create_base_model("tiny-sd", sha256_hex(b"tiny"), "builtin:tiny-sd")
    profile_id = make_fragment_key("tiny-sd", PROMPT, {"profile": 1})
    sha = sha256_hex(b"stored")
    catalog.get_or_create_profile(
        profile_id, base.id, PROMPT, sha256_hex(PROMPT), {}, "file:///s", sha, "file:///i"
    )
    catalog.create_fragment(KEY_A, profile_id, base.id, PROMPT, {}, "file:///f")
    catalog.set_fragment_status(KEY_A, "ready")
    with Farm(farm_settings) as client:
        yield client, redis_db.client


def _queued(client, queue: str) -> list[tuple[str, list, dict]]:
    """(task name, args, kwargs) of each message waiting in ``queue``, oldest first."""
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["task"], args, kwargs))
    return out


def test_batches_go_to_free_workers_holding_the_fragment(farm, monkeypatch):
    client, redis_client = farm
    registry = client.registry
    registry.advertise("cpu0@a", "gpu.a.cpu0", [KEY_A])
    registry.advertise("cpu0@b", "gpu.b.cpu0", [KEY_B, KEY_A])
    registry.advertise("cpu0@c", "gpu.c.cpu0", [KEY_B])  # holds another fragment
    calls: list = []
    replies = {"cpu0@a": [], "cpu0@b": [{"id": "running"}], "cpu0@c": []}
    monkeypatch.setattr(client.app.control, "inspect", FakeInspect(replies, calls))

    job = client.submit(PROMPT, variants=6, model="tiny-sd", batch_size=2)

    assert [b.queue for b in job.batches] == ["gpu.a.cpu0", None, None]  # b is busy
    timeout = AFFINITY_INSPECT_TIMEOUT_S
    assert calls == [{"destination": ["cpu0@a", "cpu0@b"], "limit": 2, "timeout": timeout}]
    assert [kw["job_id"] for _, _, kw in _queued(redis_client, "gpu.a.cpu0")] == [job.job_ids[0]]
    assert [kw["seeds"] for _, _, kw in _queued(redis_client, SHARED_QUEUE)] == [[2, 3], [4, 5]]


def test_a_holder_that_does_not_reply_or_has_a_backlog_is_not_free(farm, monkeypatch):
    client, redis_client = farm
    client.registry.advertise("cpu0@a", "gpu.a.cpu0", [KEY_A])  # gone: does not reply
    client.registry.advertise("cpu0@b", "gpu.b.cpu0", [KEY_A])  # idle, but has a backlog
    redis_client.rpush("gpu.b.cpu0", b"{}")
    monkeypatch.setattr(client.app.control, "inspect", FakeInspect({"cpu0@b": []}, []))
    assert client._affinity_queues(KEY_A, 2) == [None, None]


def test_no_affinity_and_no_holders_use_the_shared_queue(farm, monkeypatch):
    client, redis_client = farm
    monkeypatch.setattr(client.app.control, "inspect", lambda **kw: pytest.fail("inspected"))
    job = client.submit(PROMPT, variants=2, model="tiny-sd", batch_size=1)  # no holder
    client.registry.advertise("cpu0@a", "gpu.a.cpu0", [KEY_A])
    unrouted = client.submit(PROMPT, variants=2, model="tiny-sd", batch_size=1, affinity=False)
    assert [b.queue for b in job.batches + unrouted.batches] == [None] * 4
    assert len(_queued(redis_client, SHARED_QUEUE)) == 4


def test_a_pinned_job_sends_every_task_to_its_queue(farm):
    client, redis_client = farm
    pinned = client.submit(
        "a green star", variants=3, model="tiny-sd", batch_size=2, queue="gpu.a.cpu0"
    )
    assert [b.queue for b in pinned.batches] == ["gpu.a.cpu0", "gpu.a.cpu0"]
    [(name, args, kwargs)] = _queued(redis_client, "gpu.a.cpu0")
    assert name == "fragjobs.profile" and args == ["a green star"]
    assert _queued(redis_client, SHARED_QUEUE) == []
    # The rest of the chain travels in the message (last step first), each with the queue.
    message = json.loads(redis_client.lrange("gpu.a.cpu0", 0, -1)[0])
    _args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
    group, validate, extract = embed["chain"]
    assert (extract["task"], validate["task"], group["task"]) == (
        "fragjobs.extract",
        "fragjobs.validate",
        "celery.group",
    )
    generates = group["kwargs"]["tasks"]
    steps = [extract, validate, *generates]
    assert [s["options"]["queue"] for s in steps] == ["gpu.a.cpu0"] * 4
    assert (
        extract["kwargs"]["knobs"]["fidelity"] == 0.9
    )  # the extraction's quality knob travels too


def test_fidelity_is_checked_before_anything_is_queued(farm):
    client, redis_client = farm
    for bad in (0.0, 1.5, "high"):
        with pytest.raises(InvalidInputError, match="fidelity"):
            client.submit(PROMPT, variants=2, model="tiny-sd", fidelity=bad)
    assert _queued(redis_client, SHARED_QUEUE) == []
    client.submit("a blue moon", variants=2, model="tiny-sd", fidelity=0.97, queue="gpu.a.cpu0")
    message = json.loads(redis_client.lrange("gpu.a.cpu0", 0, -1)[0])
    _args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
    extract = embed["chain"][-1]
    assert extract["task"] == "fragjobs.extract" and extract["kwargs"]["knobs"]["fidelity"] == 0.97


def test_a_folder_that_is_not_a_pipeline_is_refused_before_anything_is_queued(farm, tmp_path):
    """Found by the malformed-spec drill: any existing folder used to be queued as a model."""
    client, redis_client = farm
    not_a_model = tmp_path / "photos"
    not_a_model.mkdir()
    with pytest.raises(UnknownModelError, match="not a diffusers pipeline folder"):
        client.submit(PROMPT, variants=2, model=str(not_a_model))
    assert redis_client.dbsize() == 0
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(UnknownModelError, match="pipeline of unknown class, which fragjobs"):
        client.submit("a blue moon", variants=2, model=str(pipeline), queue="gpu.a.cpu0")
    assert redis_client.dbsize() == 0


def test_the_client_polls_results_and_subscribes_to_nothing_when_sending(farm):
    """Found by the Redis-restart drill: the subscription made as each task was sent gave up
    after 20 s of broker outage, failing the submit that publishing would have ridden out."""
    from fragjobs.farm.results import PollingRedisBackend

    client, redis_client = farm
    job = client.submit("a green star", variants=4, model="tiny-sd", batch_size=2)
    backend = client.app.backend
    assert isinstance(backend, PollingRedisBackend)
    assert backend.result_consumer.subscribed_to == set()
    assert job.progress()["state"] == "PENDING"  # read by polling
    task_id = job.batches[0].task_id
    backend.store_result(task_id, {"image_uris": []}, "SUCCESS")
    assert job.progress()["batches"][0]["state"] == "SUCCESS"
    assert client.app.AsyncResult(task_id).get(timeout=5) == {"image_uris": []}  # polled too
    assert backend.result_consumer.subscribed_to == set()


def test_pipeline_batch_size_is_the_tasks_batch_size(farm):
    client, redis_client = farm
    client.submit(PROMPT, variants=8, model="tiny-sd", batch_size=8, pipeline_batch_size=2)
    [(_, _, kwargs)] = _queued(redis_client, SHARED_QUEUE)
    assert kwargs["seeds"] == list(range(8)) and kwargs["batch_size"] == 2


# -- the worker's side -----------------------------------------------------------------------


def test_worker_advertises_what_its_process_holds(redis_db, monkeypatch):
    from fragjobs import chain
    from tasks import worker

    app = SimpleNamespace(
        conf={"broker_url": redis_db.url, "fragjobs_affinity_ttl_s": 30},
        amqp=SimpleNamespace(queues=SimpleNamespace(consume_from={"gpu": 1, "gpu.n1.cpu0": 1})),
    )
    app.conf = SimpleNamespace(**app.conf, get=app.conf.get)
    monkeypatch.setattr(worker, "_identity", dict.fromkeys(("hostname", "queue", "app")))
    monkeypatch.setattr(worker, "_registry", [])
    monkeypatch.setattr(chain, "warm_fragment_keys", lambda: [KEY_A])

    assert worker.advertise_warm_fragments() == [KEY_A]  # outside a worker: nothing sent
    assert redis_db.client.dbsize() == 0
    worker.note_identity(sender=SimpleNamespace(hostname="cpu0@n1", app=app))
    worker.advertise_warm_fragments()
    registry = WarmRegistry(redis_db.url)
    [advertised] = registry.holders(KEY_A)
    assert (advertised.hostname, advertised.queue) == ("cpu0@n1", "gpu.n1.cpu0")
    assert 0 < redis_db.client.ttl("fragjobs:warm:cpu0@n1") <= 30

    worker.open_own_workspace()  # a new pool process holds nothing warm
    assert registry.workers() == {}
    registry.close()


# -- Flower and settings ---------------------------------------------------------------------


def test_flower_gets_basic_auth_from_the_environment(monkeypatch):
    monkeypatch.setenv("FRAGJOBS_FLOWER_USER", "ops")
    monkeypatch.setenv("FRAGJOBS_FLOWER_PASSWORD", "s3cret")
    env = flower_env(FarmSettings(), {"PATH": "/bin"})
    assert env["FLOWER_BASIC_AUTH"] == "ops:s3cret" and env["PATH"] == "/bin"
    command = flower_command(5566, "0.0.0.0")
    assert command[1:6] == ["-m", "celery", "-A", "tasks.app", "flower"]
    assert command[6:] == ["--port=5566", "--address=0.0.0.0"]
    assert not any("s3cret" in part for part in command)  # not visible in `ps`


@pytest.mark.parametrize(
    ("user", "password", "message"),
    [
        (None, None, "set FRAGJOBS_FLOWER_USER and FRAGJOBS_FLOWER_PASSWORD"),
        ("ops", None, "set FRAGJOBS_FLOWER_USER and FRAGJOBS_FLOWER_PASSWORD"),
        ("o:ps", "pw", "may not contain"),
        ("ops", "a,b", "may not contain"),
    ],
)
def test_flower_never_starts_without_a_login(monkeypatch, user, password, message):
    from fragjobs.cli import farm_commands, main

    for name, value in (("FRAGJOBS_FLOWER_USER", user), ("FRAGJOBS_FLOWER_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(farm_commands.os, "execve", lambda *a: pytest.fail("flower started"))
    result = CliRunner().invoke(main, ["flower"])
    assert result.exit_code == 2 and message in result.output


def _celeryconfig(env: dict[str, str]) -> dict:
    code = (
        "import json, celeryconfig as c\n"
        "print(json.dumps({'beat': c.beat_schedule, 'scheduler': c.beat_scheduler,"
        " 'ttl': c.fragjobs_affinity_ttl_s}))"
    )
    from fragjobs.farm import farm_env

    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**farm_env(), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_revalidation_is_scheduled_from_the_environment():
    config = _celeryconfig({"FRAGJOBS_REVALIDATE_INTERVAL_S": "120"})
    entry = config["beat"]["fragjobs-revalidate"]
    assert entry["task"] == "fragjobs.revalidate" and entry["schedule"] == 120.0
    assert entry["options"] == {"queue": SHARED_QUEUE, "expires": 120}
    assert config["scheduler"] == "celery.beat:Scheduler"  # no shelve (pickle) file
    assert _celeryconfig({"FRAGJOBS_REVALIDATE_INTERVAL_S": "0"})["beat"] == {}
    assert _celeryconfig({"FRAGJOBS_AFFINITY_TTL_S": "90"})["ttl"] == 90
