"""``fragjobs doctor``: each check against real services, and the command's lines, JSON and
exit status."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import torch
from click.testing import CliRunner
from conftest import service_reachable

from fragjobs.cli import main
from fragjobs.config import Settings, get_settings
from fragjobs.doctor import FAIL, OK, WARN, checks, farm_configured, services
from fragjobs.doctor.estimates import MAX_BATCH, ModelFootprint, footprint

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database of this test's own (dropped afterwards)."""
    if not service_reachable("127.0.0.1", 5432):
        pytest.skip("needs PostgreSQL at 127.0.0.1:5432")
    psycopg = pytest.importorskip("psycopg")
    name = f"fragjobs_doctor_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def embedded(settings, monkeypatch) -> Settings:
    """A used embedded setup (catalog created), without any farm setting."""
    from fragjobs.catalog import upgrade_database

    monkeypatch.delenv("FRAGJOBS_BROKER_URL", raising=False)
    monkeypatch.setenv("FRAGJOBS_DEVICE", "cpu")
    get_settings.cache_clear()
    upgrade_database(settings.resolved_database_url)
    return get_settings()


def _doctor(*args: str):
    return CliRunner().invoke(main, ["doctor", *args], catch_exceptions=False)


# -- the command -----------------------------------------------------------------------------


def test_healthy_embedded_setup_is_all_ok_and_exits_0(embedded):
    result = _doctor()
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert all(line.startswith("OK ") for line in lines), result.output
    names = [line.split()[1] for line in lines]
    assert names[:6] == ["versions", "device", "capacity", "database", "store", "thresholds"]
    assert "broker" not in names  # no farm configured: not checked
    [database] = [line for line in lines if line.split()[1] == "database"]
    assert f"sqlite:///{embedded.data_dir}" in database and "at schema" in database
    store = embedded.data_dir / "store"
    assert [p for p in store.rglob("*") if p.is_file()] == []  # the probe object is gone


def test_json_is_a_list_of_checks(embedded):
    result = _doctor("--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {tuple(sorted(item)) for item in report} == {
        ("detail", "fix", "name", "needed", "status")
    }
    by_name = {item["name"]: item for item in report}
    assert by_name["store"]["status"] == OK
    assert {"model shapes", "model tiny-sd", "model sd15-shape"} <= set(by_name)


def test_an_unreachable_broker_fails_on_the_farm(embedded, monkeypatch):
    monkeypatch.setenv("FRAGJOBS_BROKER_URL", f"redis://127.0.0.1:{_closed_port()}/0")
    get_settings.cache_clear()
    result = _doctor("--json", "--farm")
    assert result.exit_code == 1
    broker = next(item for item in json.loads(result.output) if item["name"] == "broker")
    assert broker["status"] == FAIL and broker["needed"]
    assert "FRAGJOBS_BROKER_URL" in broker["fix"]


def test_the_farm_is_configured_by_an_explicit_broker_url(monkeypatch):
    monkeypatch.delenv("FRAGJOBS_BROKER_URL", raising=False)
    assert not farm_configured(Settings())
    monkeypatch.setenv("FRAGJOBS_BROKER_URL", "redis://127.0.0.1:6379/3")
    assert farm_configured(Settings())


def test_a_failing_line_says_the_fix():
    line = checks.Check("store", FAIL, "s3://nope: bucket missing", "create it").line()
    assert line.startswith("FAIL store ") and line.endswith("— fix: create it")
    assert "fix" not in checks.Check("store", OK, "fine", "unused").line()
    assert "not needed" in checks.Check("x", WARN, "meh", "do y", needed=False).line()


# -- database --------------------------------------------------------------------------------


def test_a_postgres_catalog_not_upgraded_fails_with_the_command(postgres_url):
    from fragjobs.catalog import upgrade_database

    settings = Settings(database_url=postgres_url)
    check = services.check_database(settings)
    assert check.status == FAIL and check.needed
    assert "has no fragjobs schema" in check.detail
    assert check.fix == "run: fragjobs db upgrade"
    upgrade_database(postgres_url)
    check = services.check_database(settings)
    assert check.status == OK and "at schema" in check.detail


@pytest.mark.parametrize("server", ["closed", "silent"])
def test_an_unreachable_database_fails_fast(server):
    with _silent_server() as silent:
        port = _closed_port() if server == "closed" else silent
        started = time.monotonic()
        check = services.check_database(
            Settings(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/x")
        )
    assert check.status == FAIL and check.needed
    assert time.monotonic() - started < services.CONNECT_TIMEOUT_S + 3
    assert "unreachable" in check.detail


def test_an_embedded_catalog_not_created_yet_is_fine(settings):
    check = services.check_database(settings)
    assert check.status == OK and "not created yet" in check.detail
    assert not (settings.data_dir / "catalog.db").exists()  # the doctor does not create it


# -- store -----------------------------------------------------------------------------------


def test_an_s3_store_is_probed_and_left_as_it_was(moto_endpoint, s3_bucket, s3_admin):
    settings = Settings(storage_url=f"s3://{s3_bucket}/farm", s3_endpoint_url=moto_endpoint)
    check = services.check_store(settings)
    assert check.status == OK, check.detail
    assert "sha256 checked, deleted" in check.detail
    assert s3_admin.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_a_missing_bucket_fails(moto_endpoint, aws_env):
    settings = Settings(
        storage_url=f"s3://no-such-{uuid.uuid4().hex[:12]}/farm", s3_endpoint_url=moto_endpoint
    )
    check = services.check_store(settings)
    assert check.status == FAIL and check.needed
    assert "bucket" in check.detail and "never creates buckets" in check.fix


def test_an_unwritable_store_folder_fails(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    check = services.check_store(Settings(storage_url=(blocker / "store").as_uri()))
    assert check.status == FAIL and "FRAGJOBS_STORAGE_URL" in check.fix


# -- broker ----------------------------------------------------------------------------------


def test_a_live_broker_answers(redis_db):
    check = services.check_broker(Settings(broker_url=redis_db.url))
    assert check.status == OK and "Redis" in check.detail


def test_a_silent_broker_fails_within_the_connect_timeout():
    with _silent_server() as port:
        started = time.monotonic()
        check = services.check_broker(Settings(broker_url=f"redis://127.0.0.1:{port}/0"))
    assert check.status == FAIL
    assert time.monotonic() - started < 2 * services.CONNECT_TIMEOUT_S + 2


def test_placeholder_farm_secrets_fail(monkeypatch):
    monkeypatch.setenv("FRAGJOBS_BROKER_URL", "redis://:change-me-now@127.0.0.1:6379/0")
    check = services.check_farm_settings(Settings())
    assert check.status == FAIL and "placeholder" in check.detail


# -- thresholds, device, capacity, models ----------------------------------------------------


def test_a_malformed_thresholds_file_fails(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text("ssim_min: [not, a, number]\n")
    check = checks.check_thresholds(Settings(thresholds_path=path))
    assert check.status == FAIL and check.needed
    assert str(path) in check.detail and "FRAGJOBS_THRESHOLDS_PATH" in check.fix
    assert checks.check_thresholds(Settings()).status == OK


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent_fails_and_is_fine_on_cpu():
    check = checks.check_device(Settings(device="cuda"))
    assert check.status == FAIL and check.needed and "FRAGJOBS_DEVICE" in check.fix
    assert checks.check_device(Settings(device="auto")).status == OK


def test_capacity_names_the_largest_model_that_fits_and_fails_when_the_default_does_not():
    roomy = checks.check_capacity(Settings(device="cpu", memory_budget_mb=64 * 1024))
    assert roomy.status == OK
    assert "largest built-in that fits is sdxl-shape" in roomy.detail
    assert "estimated" in roomy.detail
    tiny = checks.check_capacity(Settings(device="cpu", memory_budget_mb=1, default_model="shapes"))
    assert tiny.status == FAIL and tiny.needed and "shapes does not fit" in tiny.detail


def test_footprints_grow_with_the_model_and_batches_are_capped():
    small, large = footprint("tiny-sd"), footprint("sd15-shape")
    assert 3 * 2**30 < large.weight_bytes < 4 * 2**30  # 860 M UNet parameters in float32
    assert large.per_image_bytes > small.per_image_bytes > 0
    one = ModelFootprint("m", weight_bytes=100, per_image_bytes=10, height=8, width=8)
    assert one.largest_batch(105) == 0 and one.largest_batch(135) == 3
    assert one.largest_batch(10**9) == MAX_BATCH


def test_builtin_models_are_checked_against_what_is_recorded(settings):
    shapes = checks.check_builtin_model("shapes", settings, {})
    assert shapes.status == OK and "match weights.sha256.json" in shapes.detail
    assert shapes.needed == (settings.default_model == "shapes")
    tiny = checks.check_builtin_model("tiny-sd", settings, {})
    assert tiny.status == OK and "id " in tiny.detail
    other = checks.check_builtin_model("tiny-sd", settings, {"builtin:tiny-sd": "0" * 64})
    assert other.status == WARN and "do not apply here" in other.detail


def test_a_check_that_hangs_fails_at_its_limit():
    started = time.monotonic()
    check = checks._timed("slow", 0.5, True, lambda: time.sleep(5) or checks.Check("x", OK, ""))
    assert check.status == FAIL and "no answer within" in check.detail
    assert time.monotonic() - started < 2


# -- the farm's workers ----------------------------------------------------------------------


def _node_refuses_to_start(tmp_path, redis_db, **env: str) -> str:
    """Queue a task, start a real node (``fragjobs farm start``, one CPU worker) with ``env``;
    check that it stops with EXIT_WORKER_REFUSED and the task is still queued; its log."""
    import os
    import subprocess
    import sys

    from celery import Celery

    from fragjobs.farm.launcher import EXIT_WORKER_REFUSED
    from fragjobs.farm.settings import SHARED_QUEUE

    client = Celery(broker=redis_db.url)
    client.send_task("fragjobs.generate", args=[{"job_id": "never-run"}], queue=SHARED_QUEUE)
    assert redis_db.client.llen(SHARED_QUEUE) == 1
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FRAGJOBS_", "AWS_"))}
    base.update(
        FRAGJOBS_BROKER_URL=redis_db.url,
        FRAGJOBS_DATA_DIR=str(tmp_path / "data"),
        FRAGJOBS_DEVICE="cpu",
        OMP_NUM_THREADS="1",
        **env,
    )
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        node = subprocess.run(
            [sys.executable, "-m", "fragjobs.cli", "farm", "start", "--cpu-workers", "1"]
            + ["--node", "doctortest"],
            env=base,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert node.returncode == EXIT_WORKER_REFUSED, text
    assert "refused to start (fragjobs doctor" in text
    assert redis_db.client.llen(SHARED_QUEUE) == 1, "the worker took the queued task"
    return text


def test_a_worker_refuses_an_out_of_date_postgres_catalog(tmp_path, redis_db, postgres_url):
    text = _node_refuses_to_start(tmp_path, redis_db, FRAGJOBS_DATABASE_URL=postgres_url)
    assert "fragjobs worker refuses to start (fragjobs doctor --farm)" in text
    [database] = [line for line in text.splitlines() if line.startswith("FAIL database")]
    assert database.endswith("fix: run: fragjobs db upgrade")


def test_a_worker_refuses_a_store_it_cannot_write(tmp_path, redis_db):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    text = _node_refuses_to_start(
        tmp_path, redis_db, FRAGJOBS_STORAGE_URL=(blocker / "store").as_uri()
    )
    assert "fragjobs worker refuses to start (fragjobs doctor --farm)" in text
    assert "\nFAIL store " in text
    assert "\nOK   database " in text  # the embedded catalog was migrated, then checked
    assert "\nOK   broker " in text


def test_an_unusable_setting_is_one_failed_check(settings, monkeypatch):
    monkeypatch.setenv("FRAGJOBS_DEVICE", "gpu")
    get_settings.cache_clear()
    result = _doctor()
    assert result.exit_code == 1
    assert result.output.startswith("FAIL settings ") and "FRAGJOBS_DEVICE" in result.output
