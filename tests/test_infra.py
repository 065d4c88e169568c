"""The farm's deployment files (infra/), checked without Docker: parsed and cross-checked.

The compose file must describe a whole farm (redis, postgres, minio and its bucket, the schema
migration, flower with auth, beat, one worker per GPU pinned by a device reservation), and its
settings must be fragjobs' own: every FRAGJOBS_* variable of the example env file is a real
setting, the credentials agree with each other, and Celery is configured for JSON only.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fragjobs.farm import FarmSettings, farm_env

INFRA = Path(__file__).resolve().parent.parent / "infra"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / "farm.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _command(service: dict) -> str:
    command = service.get("command", "")
    return command if isinstance(command, str) else " ".join(command)


def _workers(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if n.startswith("worker-")}


def test_every_service_of_a_farm_is_there(compose):
    services = compose["services"]
    for name in ("redis", "postgres", "minio", "minio-init", "migrate", "flower", "beat"):
        assert name in services, name
        assert services[name]["profiles"] == ["services"]
    assert len(_workers(compose)) >= 2
    assert _command(services["migrate"]) == "fragjobs db upgrade"
    assert _command(services["beat"]).startswith("celery -A tasks.app beat")
    fragjobs_services = ["migrate", "flower", "beat", *_workers(compose)]
    for name in fragjobs_services:  # every fragjobs container reads the farm's env file
        assert services[name]["env_file"] == ["farm.env"], name
    assert (INFRA / "Dockerfile").is_file()
    assert services["migrate"]["build"]["dockerfile"] == "infra/Dockerfile"


def test_workers_are_pinned_to_distinct_gpus_by_reservations(compose):
    device_ids, queues = [], []
    for name, worker in _workers(compose).items():
        assert worker["profiles"] == ["workers"]
        [device] = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        [gpu] = device["device_ids"]
        device_ids.append(gpu)
        # The reserved GPU is the container's only one, so it is device 0 inside.
        assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
        command = worker["command"]
        assert command[:5] == ["fragjobs", "farm", "start", "--gpus", "0"], name
        node = command[command.index("--node") + 1]
        assert node.endswith(f"-gpu{gpu}") and name == f"worker-gpu{gpu}"
        queues.append(f"gpu.{node}.0")
        assert "/var/cache/fragjobs" in worker["volumes"][0]  # the node's warm cache
    assert len(set(device_ids)) == len(device_ids)
    assert len(set(queues)) == len(queues)  # an own queue per worker, for affinity


def test_flower_requires_a_login_from_the_environment(compose, env_example):
    flower = compose["services"]["flower"]
    assert _command(flower).startswith("fragjobs flower")
    assert "--address 0.0.0.0" in _command(flower)
    assert env_example["FRAGJOBS_FLOWER_USER"] and env_example["FRAGJOBS_FLOWER_PASSWORD"]
    assert "FLOWER_BASIC_AUTH" not in (INFRA / "docker-compose.yml").read_text()


def test_minio_bucket_is_created_from_the_storage_url(compose, env_example):
    init = compose["services"]["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = _command(init)
    assert "mc mb --ignore-existing" in script and "FRAGJOBS_STORAGE_URL" in script
    assert re.match(r"^s3://[a-z0-9.-]+/\w+", env_example["FRAGJOBS_STORAGE_URL"])


def test_env_example_uses_only_real_settings_that_agree(env_example):
    known = {f"FRAGJOBS_{name.upper()}" for name in FarmSettings.model_fields}
    fragjobs_vars = {k for k in env_example if k.startswith("FRAGJOBS_")}
    assert fragjobs_vars <= known, fragjobs_vars - known
    settings = FarmSettings(
        **{k[len("FRAGJOBS_") :].lower(): v for k, v in env_example.items() if k in known}
    )
    assert settings.broker_url.startswith("redis://redis:")
    assert settings.database_url.startswith("postgresql+psycopg://")
    database = settings.database_url
    assert f"{env_example['POSTGRES_USER']}:{env_example['POSTGRES_PASSWORD']}@" in database
    assert database.endswith("/" + env_example["POSTGRES_DB"])
    assert env_example["AWS_ACCESS_KEY_ID"] == env_example["MINIO_ROOT_USER"]
    assert env_example["AWS_SECRET_ACCESS_KEY"] == env_example["MINIO_ROOT_PASSWORD"]
    assert settings.task_time_limit > settings.task_soft_time_limit


def test_celery_configuration_is_json_only():
    code = (
        "import json, celeryconfig as c\n"
        "print(json.dumps({n: getattr(c, n) for n in ('task_serializer', 'result_serializer',"
        " 'event_serializer', 'accept_content', 'result_accept_content', 'beat_scheduler',"
        " 'task_acks_late', 'task_reject_on_worker_lost', 'worker_prefetch_multiplier',"
        " 'broker_transport_options', 'task_time_limit')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=farm_env(), capture_output=True, text=True, check=True
    )
    config = json.loads(out.stdout)
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["event_serializer"] == "json"
    assert config["accept_content"] == config["result_accept_content"] == ["json"]
    assert config["beat_scheduler"] == "celery.beat:Scheduler"  # not the pickle shelve
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    visibility = config["broker_transport_options"]["visibility_timeout"]
    assert visibility > config["task_time_limit"]
