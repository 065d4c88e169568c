"""Tests of fragjobs.chain.revalidation: re-hash stored objects, re-run the gate, one run at a time.

Each test works on a copy of the session's ``ready_fragment_template`` (a ready tiny-sd
fragment in an embedded workspace); the PostgreSQL lock test needs the server at
127.0.0.1:5432 and is skipped without it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

import fragjobs
from fragjobs import chain
from fragjobs.chain import revalidate, revalidation_lock
from fragjobs.keys import FRAGMENT_FILE, MANIFEST_FILE, fragment_object


@pytest.fixture
def ws(ready_fragment_template, tmp_path):
    workspace = chain.Workspace.open(ready_fragment_template.copy_to(tmp_path / "data"))
    yield workspace
    workspace.close()


def _name(key: str, filename: str) -> str:
    return fragment_object(key.split("_", 1)[0], key, filename)


def test_intact_fragment_stays_ready_after_a_new_gate_run_on_its_seeds(ws, ready_fragment_template):
    key = ready_fragment_template.key
    before = ws.catalog.lineage(key)["validation_ids"]
    progress = []

    report = revalidate(ws, progress_callback=lambda *args: progress.append(args))

    [check] = report.checks
    assert (check.key, check.status, check.objects_ok, check.gate_passed) == (
        key,
        "ready",
        True,
        True,
    )
    assert report.skipped is None and report.marked == [] and progress == [(1, 1, key)]
    after = ws.catalog.lineage(key)["validation_ids"]
    assert after == [*before, check.validation_id]  # a new validation row
    assert ws.catalog.latest_validation(key).metrics["seeds"] == [1000, 1001]  # stored seeds


@pytest.mark.parametrize("filename", [FRAGMENT_FILE, MANIFEST_FILE])
def test_changed_or_missing_object_marks_the_fragment_corrupt(
    ws, ready_fragment_template, filename
):
    key = ready_fragment_template.key
    name = _name(key, filename)
    data = bytearray(ws.store.get_bytes(name))
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    ws.store.put_bytes(name, bytes(data))

    [check] = revalidate(ws).checks
    assert (check.status, check.objects_ok, check.gate_passed) == ("corrupt", False, None)
    assert name in check.reason and "expected sha256" in check.reason
    row = ws.catalog.get_fragment(key)
    assert row.status == "corrupt" and row.status_reason == check.reason

    # The next generation falls back to the full model and says why.
    result = chain.generate(
        ready_fragment_template.prompt, seeds=[0], model="tiny-sd", ws=ws, progress=False
    )
    assert result.used_fallback and result.fragment_key is None
    assert ws.catalog.get_job(result.job_id).used_fallback

    ws.store.delete(name)  # missing is corrupt too (checked when named explicitly)
    [check] = revalidate(ws, keys=[key]).checks
    assert check.status == "corrupt" and "not found" in check.reason


def test_restored_fragment_named_explicitly_becomes_ready_again(ws, ready_fragment_template):
    key = ready_fragment_template.key
    name = _name(key, FRAGMENT_FILE)
    good = ws.store.get_bytes(name)
    ws.store.put_bytes(name, b"broken")
    assert revalidate(ws).checks[0].status == "corrupt"
    [again] = revalidate(ws).checks  # corrupt ones are checked too, and stay corrupt
    assert (again.status, again.objects_ok) == ("corrupt", False)

    ws.store.put_bytes(name, good)
    [check] = revalidate(ws, keys=[key]).checks
    assert (check.status, check.gate_passed) == ("ready", True)


def test_stricter_thresholds_mark_failed_gate(ws, ready_fragment_template, tmp_path):
    strict = tmp_path / "thresholds.yaml"
    lines = (Path(fragjobs.__file__).parent / "thresholds.yaml").read_text().splitlines()
    strict.write_text(
        "\n".join("ssim_min: 1.0" if line.startswith("ssim_min:") else line for line in lines)
    )
    ws.settings = ws.settings.model_copy(update={"thresholds_path": strict})

    [check] = revalidate(ws).checks
    assert (check.status, check.objects_ok, check.gate_passed) == ("failed_gate", True, False)
    assert "ssim" in check.reason
    assert ws.catalog.get_fragment(ready_fragment_template.key).status == "failed_gate"


def test_hashes_only_leaves_the_gate_alone(ws, ready_fragment_template):
    key = ready_fragment_template.key
    before = ws.catalog.lineage(key)["validation_ids"]
    [check] = revalidate(ws, gate=False).checks
    assert (check.status, check.objects_ok, check.gate_passed) == ("ready", True, None)
    assert ws.catalog.lineage(key)["validation_ids"] == before


def test_a_second_run_is_refused_while_the_lock_is_held(ws, ready_fragment_template):
    name = _name(ready_fragment_template.key, FRAGMENT_FILE)
    ws.store.put_bytes(name, b"broken")
    with revalidation_lock(ws) as acquired:
        assert acquired
        report = revalidate(ws)
    assert report.skipped and "lock" in report.skipped and report.checks == []
    assert ws.catalog.get_fragment(ready_fragment_template.key).status == "ready"  # untouched
    assert revalidate(ws).checks[0].status == "corrupt"  # released afterwards


def test_postgres_runs_are_serialised_by_an_advisory_lock(ws, tmp_path):
    psycopg = pytest.importorskip("psycopg")
    from conftest import service_reachable

    from fragjobs.catalog import Catalog, upgrade_database

    if not service_reachable("127.0.0.1", 5432):
        pytest.skip("needs PostgreSQL at 127.0.0.1:5432")
    admin_dsn = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    name = f"fragjobs_rv_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade_database(url)
        settings = ws.settings.model_copy(update={"database_url": url})
        first = chain.Workspace(settings, Catalog(url), ws.store)
        second = chain.Workspace(settings, Catalog(url), ws.store)
        with revalidation_lock(first) as acquired:
            assert acquired
            with revalidation_lock(second) as again:
                assert not again  # another session holds it: not re-entrant across sessions
            assert revalidate(second).skipped
        assert revalidate(second).skipped is None  # released: an (empty) run goes ahead
        first.close()
        second.close()
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_cli_reports_and_exits_non_zero_when_a_fragment_was_marked(
    ready_fragment_template, tmp_path, monkeypatch
):
    from fragjobs.cli import main
    from fragjobs.config import get_settings

    settings = ready_fragment_template.copy_to(tmp_path / "data")
    monkeypatch.setenv("FRAGJOBS_DATA_DIR", str(settings.data_dir))
    for var in ("FRAGJOBS_DATABASE_URL", "FRAGJOBS_STORAGE_URL", "FRAGJOBS_THRESHOLDS_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(chain.STATE, "workspaces", {})
    get_settings.cache_clear()
    key = ready_fragment_template.key
    try:
        ok = CliRunner().invoke(main, ["revalidate", "--no-gate"])
        assert ok.exit_code == 0, ok.output
        assert f"{key}  ready       objects ok  gate not run" in ok.output

        store = chain.workspace().store
        store.put_bytes(_name(key, FRAGMENT_FILE), b"broken")
        bad = CliRunner().invoke(main, ["revalidate"])
        assert bad.exit_code == 1 and f"{key}  corrupt" in bad.output

        invalid = CliRunner().invoke(main, ["revalidate", "--key", "Not/A/Key"])
        assert invalid.exit_code == 2 and "error: invalid key" in invalid.output
    finally:
        for workspace in chain.STATE.workspaces.values():
            workspace.close()
        get_settings.cache_clear()
