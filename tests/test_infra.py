"""The farm's deployment files (infra/), checked without Docker: parsed and cross-checked.

The compose file must describe a whole farm (redis, postgres, minio and its bucket, the schema
migration, flower with auth, beat, one worker per GPU pinned by a device reservation), and its
settings must be fragjobs' own: every FRAGJOBS_* variable of the example env files is a real
setting, the credentials agree with each other, and Celery is configured for JSON only.

The farm is locked down by default: Redis requires a password that the broker URL carries, no
service listens on every interface of the host, every container refuses unset or placeholder
secrets, the workers use a MinIO user limited to their bucket, images are pinned and the
fragjobs image does not run as root. The shell scripts are run here with a stub ``mc``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from fragjobs.errors import ConfigError
from fragjobs.farm import FarmSettings, farm_env
from fragjobs.farm.settings import PLACEHOLDER_MARK

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
CHECK_SECRETS = "/usr/local/bin/check-secrets"
THIRD_PARTY = ("redis", "postgres", "minio", "minio-init")


def _read_env(name: str) -> dict[str, str]:
    values = {}
    for line in (INFRA / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return _read_env("farm.env.example")


@pytest.fixture(scope="module")
def services_env() -> dict[str, str]:
    return _read_env("services.env.example")


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
    assert _command(init) == "/bin/sh /etc/fragjobs/minio-init.sh"
    assert "./minio-init.sh:/etc/fragjobs/minio-init.sh:ro" in init["volumes"]
    script = (INFRA / "minio-init.sh").read_text()
    assert "mc mb --ignore-existing" in script and "FRAGJOBS_STORAGE_URL" in script
    assert re.match(r"^s3://[a-z0-9.-]+/\w+", env_example["FRAGJOBS_STORAGE_URL"])


def test_env_examples_use_only_real_settings_that_agree(env_example, services_env):
    known = {f"FRAGJOBS_{name.upper()}" for name in FarmSettings.model_fields}
    fragjobs_vars = {k for k in env_example if k.startswith("FRAGJOBS_")}
    assert fragjobs_vars <= known, fragjobs_vars - known
    values = {k[len("FRAGJOBS_") :].lower(): v for k, v in env_example.items() if k in known}
    # The examples' passwords are placeholders, which fragjobs refuses to start with.
    with pytest.raises(ConfigError, match="FRAGJOBS_BROKER_URL, FRAGJOBS_DATABASE_URL"):
        FarmSettings(**values)
    settings = FarmSettings(**{k: v.replace(PLACEHOLDER_MARK, "s3cret") for k, v in values.items()})
    broker = urlsplit(env_example["FRAGJOBS_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis"
    assert broker.password == services_env["REDIS_PASSWORD"]
    assert "FRAGJOBS_RESULT_BACKEND" not in env_example  # the broker's URL, password included
    database = urlsplit(env_example["FRAGJOBS_DATABASE_URL"])
    assert database.scheme == "postgresql+psycopg" and database.hostname == "postgres"
    assert (database.username, database.password) == (
        services_env["POSTGRES_USER"],
        services_env["POSTGRES_PASSWORD"],
    )
    assert database.path == "/" + services_env["POSTGRES_DB"]
    # The workers' S3 login is a user of their own, not MinIO's root login.
    assert env_example["AWS_ACCESS_KEY_ID"] != services_env["MINIO_ROOT_USER"]
    assert env_example["AWS_SECRET_ACCESS_KEY"] != services_env["MINIO_ROOT_PASSWORD"]
    assert not {k for k in env_example if k.startswith(("MINIO_", "POSTGRES_", "REDIS_"))}
    assert settings.task_time_limit > settings.task_soft_time_limit


def test_celery_configuration_is_json_only():
    code = (
        "import json, celeryconfig as c\n"
        "print(json.dumps({n: getattr(c, n) for n in ('task_serializer', 'result_serializer',"
        " 'event_serializer', 'accept_content', 'result_accept_content', 'beat_scheduler',"
        " 'task_acks_late', 'task_reject_on_worker_lost', 'worker_prefetch_multiplier',"
        " 'broker_transport_options', 'task_time_limit', 'result_backend_always_retry',"
        " 'result_backend_max_retries')}))"
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
    transport = config["broker_transport_options"]
    assert transport["visibility_timeout"] > config["task_time_limit"]
    # a killed worker's tasks are searched for every 10 s, not every 10th time (100 s)
    assert (transport["unacked_restore_interval"], transport["unacked_restore_throttle"]) == (10, 1)
    # storing PROGRESS or a result waits for a restarting broker instead of failing the task
    assert config["result_backend_always_retry"] and config["result_backend_max_retries"] >= 20


# -- locked down by default ------------------------------------------------------------------


def _published_host_ips(service: dict) -> list[str | None]:
    """The host address of each published port (None: every interface)."""
    ips = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ips.append(port.get("host_ip"))
        else:
            parts = str(port).rsplit(":", 2)
            ips.append(parts[0] if len(parts) == 3 else None)
    return ips


def _secrets_checked(service: dict) -> list[str]:
    """The variables the service's entrypoint (check-secrets.sh) requires, in order."""
    entrypoint = service["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", CHECK_SECRETS], entrypoint
    return entrypoint[2 : entrypoint.index("--")]


def test_redis_requires_a_password_that_the_broker_url_carries(compose, env_example):
    redis = compose["services"]["redis"]
    # In compose files "$$" is a literal "$": the container's shell expands the variable.
    assert '--requirepass "$$REDIS_PASSWORD"' in _command(redis)
    assert _command(redis).startswith("/bin/sh -c exec docker-entrypoint.sh redis-server")
    assert "REDIS_PASSWORD" in _secrets_checked(redis)
    assert 'REDISCLI_AUTH="$$REDIS_PASSWORD" redis-cli ping' in redis["healthcheck"]["test"][1]
    assert urlsplit(env_example["FRAGJOBS_BROKER_URL"]).password  # see the env-example test
    for name in ("flower", "beat", "migrate", *_workers(compose)):
        assert "FRAGJOBS_BROKER_URL" in _secrets_checked(compose["services"][name]), name


def test_no_service_listens_on_every_interface_by_default(compose):
    services = compose["services"]
    for name in ("redis", "postgres", "minio"):  # the compose network only
        assert "ports" not in services[name], name
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
        for host_ip in _published_host_ips(service):
            assert host_ip == "127.0.0.1", f"{name} publishes a port on {host_ip or 'every'}"
    assert _published_host_ips(services["flower"]) == ["127.0.0.1"]


def test_gpu_nodes_reach_the_services_on_one_required_private_address():
    nodes = yaml.safe_load((INFRA / "docker-compose.nodes.yml").read_text())
    assert set(nodes["services"]) == {"redis", "postgres", "minio"}
    for name, service in nodes["services"].items():
        ips = _published_host_ips(service)
        assert ips, name
        for host_ip in ips:  # ${VAR:?...}: compose refuses to start without an address
            assert host_ip.startswith("${FRAGJOBS_PRIVATE_ADDRESS:?") and host_ip.endswith("}")


def test_every_image_is_pinned(compose):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in compose["services"].items():
        image = service["image"]
        if name not in THIRD_PARTY:  # the fragjobs image, tagged with its version by default
            assert image == f"${{FRAGJOBS_IMAGE:-fragjobs:{version}}}", name
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
    assert compose["services"]["minio"]["image"].startswith("minio/minio:RELEASE.")
    assert compose["services"]["minio-init"]["image"].startswith("minio/mc:RELEASE.")
    [base] = re.findall(r"^FROM\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.M)
    assert re.match(r"^[\w./-]+:[\w.-]*\d[\w.-]*$", base) and not base.endswith(":latest")


def test_the_fragjobs_image_runs_as_an_unprivileged_user():
    lines = [
        line.strip()
        for line in (INFRA / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    instructions = [line.split()[0].upper() for line in lines]
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users, "no USER: the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    # Nothing after the last USER switches back, and the build steps run before it.
    last_user = len(instructions) - 1 - instructions[::-1].index("USER")
    assert "RUN" not in instructions[last_user:]
    assert "chown fragjobs:fragjobs /var/cache/fragjobs" in (INFRA / "Dockerfile").read_text()


def test_the_workers_use_a_minio_user_limited_to_their_bucket(compose):
    policy = json.loads((INFRA / "minio-worker-policy.json").read_text())
    allowed = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and "NotResource" not in statement
        actions = statement["Action"]
        actions = [actions] if isinstance(actions, str) else actions
        assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
        allowed |= set(actions)
        resources = statement["Resource"]
        resources = [resources] if isinstance(resources, str) else resources
        assert set(resources) <= {"arn:aws:s3:::{bucket}", "arn:aws:s3:::{bucket}/*"}, resources
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"} <= allowed
    assert not allowed & {"s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy"}
    # The root login is in services.env, which no fragjobs container reads.
    for name, service in compose["services"].items():
        if name not in THIRD_PARTY:
            assert service["env_file"] == ["farm.env"], name
    init = compose["services"]["minio-init"]
    assert {"MINIO_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(
        _secrets_checked(init)
    )
    assert (
        "./minio-worker-policy.json:/etc/fragjobs/minio-worker-policy.json:ro" in (init["volumes"])
    )


@pytest.fixture
def stub_mc(tmp_path):
    """A fake ``mc`` on PATH that logs its arguments and keeps the policy it is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mc").write_text(
        "#!/bin/sh\n"
        'echo "$*" >> "$MC_LOG"\n'
        'case "$*" in\n'
        '  "admin policy create "*) cp "$6" "$MC_LOG.policy" ;;\n'
        '  "admin user info "*) echo \'{"status":"success","policyName":"readwrite"}\' ;;\n'
        "esac\n"
    )
    (bin_dir / "mc").chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MC_LOG": str(tmp_path / "mc.log"),
        "TMPDIR": str(tmp_path),
        "FRAGJOBS_STORAGE_URL": "s3://farm-bucket/fragments",
        "AWS_ACCESS_KEY_ID": "fragjobs-worker",
        "AWS_SECRET_ACCESS_KEY": "worker-secret",
        "MINIO_ROOT_USER": "admin",
        "MINIO_ROOT_PASSWORD": "root-secret",
    }


def test_minio_init_creates_the_bucket_user_and_its_scoped_policy(stub_mc, tmp_path):
    run = subprocess.run(
        ["sh", str(INFRA / "minio-init.sh")], env=stub_mc, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    calls = Path(stub_mc["MC_LOG"]).read_text().splitlines()
    assert calls[0] == "alias set farm http://minio:9000 admin root-secret"
    assert "mb --ignore-existing farm/farm-bucket" in calls
    assert "admin user add farm fragjobs-worker worker-secret" in calls
    assert "admin policy attach farm fragjobs-bucket-rw --user fragjobs-worker" in calls
    policy = json.loads(Path(stub_mc["MC_LOG"] + ".policy").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::farm-bucket", "arn:aws:s3:::farm-bucket/*"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"AWS_ACCESS_KEY_ID": "admin"}, "MinIO's root user"),
        ({"FRAGJOBS_STORAGE_URL": 's3://b"ucket/x'}, "must be s3://<bucket>/<prefix>"),
    ],
)
def test_minio_init_refuses_the_root_login_or_a_bad_bucket(stub_mc, override, message):
    run = subprocess.run(
        ["sh", str(INFRA / "minio-init.sh")],
        env={**stub_mc, **override},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and message in run.stderr
    assert not Path(stub_mc["MC_LOG"]).exists()  # nothing was done


def test_every_container_refuses_unset_or_placeholder_secrets(compose, env_example, services_env):
    services = compose["services"]
    expected = {
        "redis": {"REDIS_PASSWORD"},
        "postgres": {"POSTGRES_PASSWORD"},
        "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
        "flower": {"FRAGJOBS_FLOWER_USER", "FRAGJOBS_FLOWER_PASSWORD"},
        "migrate": {"FRAGJOBS_DATABASE_URL"},
        **{name: {"FRAGJOBS_DATABASE_URL", "AWS_SECRET_ACCESS_KEY"} for name in _workers(compose)},
    }
    for name, secrets in expected.items():
        assert secrets <= set(_secrets_checked(services[name])), name
    for name in THIRD_PARTY:  # their images do not have the script: it is mounted
        assert f"./check-secrets.sh:{CHECK_SECRETS}:ro" in services[name]["volumes"], name
    assert f"COPY infra/check-secrets.sh {CHECK_SECRETS}" in (INFRA / "Dockerfile").read_text()
    # Every secret of the examples is a placeholder, so none can go live by mistake.
    examples = {**env_example, **services_env}
    secrets = {"FRAGJOBS_BROKER_URL", "FRAGJOBS_DATABASE_URL"}
    secrets |= {name for name in examples if re.search("PASSWORD|SECRET", name)}
    assert len(secrets) == 7, secrets
    for name in secrets:
        assert PLACEHOLDER_MARK in examples[name], name


def _check_secrets(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(INFRA / "check-secrets.sh"), *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
    )


def test_check_secrets_refuses_then_runs_the_command_unchanged():
    names = ["REDIS_PASSWORD", "POSTGRES_PASSWORD"]
    refused = _check_secrets([*names, "--", "echo", "ran"], REDIS_PASSWORD="change-me-redis")
    assert refused.returncode == 78 and refused.stdout == ""
    assert "REDIS_PASSWORD (placeholder)" in refused.stderr
    assert "POSTGRES_PASSWORD (unset)" in refused.stderr
    assert "change-me-redis" not in refused.stderr
    command = ["sh", "-c", 'echo "$1|$2"', "x", "a b", "$HOME"]
    ran = _check_secrets([*names, "--", *command], REDIS_PASSWORD="0f3c", POSTGRES_PASSWORD="9a")
    assert ran.returncode == 0 and ran.stdout == "a b|$HOME\n"


def test_celery_processes_refuse_placeholder_secrets():
    """Workers, beat and Flower load celeryconfig, hence FarmSettings, before anything else."""
    env = farm_env({**os.environ, "FRAGJOBS_BROKER_URL": "redis://:change-me-redis@redis/0"})
    run = subprocess.run(
        [sys.executable, "-c", "import celeryconfig"], env=env, capture_output=True, text=True
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("fragjobs.errors.ConfigError: FRAGJOBS_BROKER_URL still hold")
