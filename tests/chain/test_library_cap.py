"""The library as a cache, on real chain runs (tiny-sd, cheap knobs): the size cap evicts the
least recently used fragment, pinned ones stay, an evicted fragment is rebuilt on demand from
its stored profile, ``fragments gc|pin|unpin``, bad input changes nothing, and a fragment
scored below the share threshold stays node-local."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fragjobs import chain
from fragjobs.chain.library_cap import enforce_library_cap, place_fragment
from fragjobs.chain.maintenance import CAP_EVICTION, remove_fragment
from fragjobs.chain.rebuild import extraction_config_of
from fragjobs.chain.stored import node_store, object_of, read_manifest
from fragjobs.cli import main
from fragjobs.config import Settings, get_settings
from fragjobs.errors import ConfigError, InvalidInputError
from fragjobs.keys import (
    FRAGMENT_FILE,
    MANIFEST_FILE,
    PROFILE_STATS_FILE,
    canonical_json,
    profile_object,
)

PROMPTS = ("a red circle", "a blue square", "a green triangle")
PROFILE = {"model": "tiny-sd", "seeds": [0, 1], "steps": 4}
VALIDATION_SEEDS = [1000, 1001]


def build(ws: chain.Workspace, prompt: str) -> str:
    prof = chain.profile(prompt, ws=ws, progress=False, **PROFILE)
    ext = chain.extract(prof.profile_id, ws=ws, model="tiny-sd")
    val = chain.validate(ext.key, seeds=VALIDATION_SEEDS, ws=ws, progress=False)
    if not val.passed:
        pytest.fail(f"fragment of {prompt!r} failed its gate: {val.gate}")
    return ext.key


@pytest.fixture(scope="module")
def library_template(tmp_path_factory) -> tuple[Path, list[str]]:
    """A data folder with three ready fragments (built once for the module, never edited)."""
    data_dir = tmp_path_factory.mktemp("library") / "data"
    ws = chain.Workspace.open(Settings(data_dir=data_dir, database_url=None, storage_url=None))
    try:
        keys = [build(ws, prompt) for prompt in PROMPTS]
    finally:
        ws.close()
    return data_dir, keys


@pytest.fixture
def library(library_template, tmp_path, monkeypatch):
    """A workspace over a copy of the template (also the CLI's, through the environment)."""
    source, keys = library_template
    data_dir = tmp_path / "data"
    shutil.copytree(source, data_dir)
    monkeypatch.setenv("FRAGJOBS_DATA_DIR", str(data_dir))
    for var in ("FRAGJOBS_DATABASE_URL", "FRAGJOBS_STORAGE_URL", "FRAGJOBS_LIBRARY_MAX_BYTES"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    ws = chain.Workspace.open(get_settings())
    yield ws, keys
    ws.close()
    get_settings.cache_clear()


def snapshot(ws: chain.Workspace) -> tuple[dict, list[str]]:
    """What bad input must not change: every row's status/pin/placement, every stored object."""
    rows = {r.key: (r.status, r.pinned, r.placement) for r in ws.catalog.list_fragments()}
    return rows, sorted(ws.store.list(""))


def stored(ws: chain.Workspace, key: str) -> bool:
    row = ws.catalog.get_fragment(key)
    return ws.store.exists(object_of(row, FRAGMENT_FILE))


def size(ws: chain.Workspace, key: str) -> int:
    return ws.catalog.get_fragment(key).size_bytes


def test_the_cap_evicts_the_least_recently_used_and_keeps_pinned_ones(library):
    ws, (k1, k2, k3) = library
    ws.catalog.mark_fragment_used(k1)  # k1 is now the most recently used
    ws.catalog.set_pinned(k2, True)  # k2 is the oldest, but pinned
    before = ws.catalog.library_bytes()
    assert before == size(ws, k1) + size(ws, k2) + size(ws, k3)

    report = enforce_library_cap(ws, size(ws, k1) + size(ws, k2))

    assert list(report.evicted) == [k3]
    assert (report.before_bytes, report.after_bytes) == (before, size(ws, k1) + size(ws, k2))
    evicted = ws.catalog.get_fragment(k3)
    assert evicted.status == "evicted" and evicted.status_reason.startswith(CAP_EVICTION)
    assert not stored(ws, k3) and stored(ws, k1) and stored(ws, k2)
    lineage = ws.catalog.lineage(k3)  # row, profile and validations are kept
    assert lineage["validation_ids"] and ws.catalog.find_profile(lineage["profile_id"])

    report = enforce_library_cap(ws, size(ws, k2))  # only the pinned one fits
    assert list(report.evicted) == [k1] and not report.over_cap
    assert [r.key for r in ws.catalog.list_fragments(status="ready")] == [k2]


def test_a_cap_smaller_than_one_fragment_changes_nothing(library):
    ws, (k1, k2, _) = library
    ws.catalog.set_pinned(k2, True)
    before = snapshot(ws)
    smallest = min(size(ws, k) for k in (k1, k2))
    with pytest.raises(InvalidInputError, match="smaller than the largest pinned fragment"):
        enforce_library_cap(ws, size(ws, k2) - 1)
    ws.catalog.set_pinned(k2, False)
    with pytest.raises(InvalidInputError, match="could hold none"):
        enforce_library_cap(ws, smallest - 1)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(InvalidInputError, match="positive number of bytes"):
            enforce_library_cap(ws, bad)
    ws.catalog.set_pinned(k2, True)
    assert snapshot(ws) == before


def test_a_cap_from_the_settings_smaller_than_a_new_fragment_stores_nothing(library):
    ws, (k1, _, _) = library
    remove_fragment(ws, k1)
    row = ws.catalog.get_fragment(k1)
    ws.settings.library_max_bytes = 1000
    before = snapshot(ws)
    with pytest.raises(ConfigError, match="FRAGJOBS_LIBRARY_MAX_BYTES=1000 is smaller"):
        chain.extract(row.profile_id, extraction_config_of(row), ws=ws, model="tiny-sd")
    assert snapshot(ws) == before


def test_validation_enforces_the_configured_cap(library):
    ws, (k1, k2, k3) = library
    ws.catalog.mark_fragment_used(k1)
    ws.catalog.mark_fragment_used(k3)
    ws.settings.library_max_bytes = size(ws, k1) + size(ws, k3)
    chain.validate(k3, seeds=VALIDATION_SEEDS, ws=ws, progress=False)  # k3 is ready again
    assert ws.catalog.get_fragment(k2).status == "evicted"  # the least recently used
    assert {r.key for r in ws.catalog.list_fragments(status="ready")} == {k1, k3}


def test_an_evicted_fragment_is_rebuilt_on_demand_from_its_stored_profile(library):
    ws, (k1, _, _) = library
    row = ws.catalog.get_fragment(k1)
    profiles = len({ws.catalog.get_fragment(k).profile_id for k in library[1]})
    stats_name = profile_object(row.profile_id, PROFILE_STATS_FILE)
    stats_path = Path(ws.store.root, *stats_name.split("/"))
    stats_before = (ws.store.stat(stats_name).sha256, stats_path.stat().st_mtime_ns)
    profile_before = ws.catalog.get_profile(row.profile_id)
    report = enforce_library_cap(ws, min(size(ws, k) for k in library[1]))
    assert next(iter(report.evicted)) == k1  # the least recently used goes first
    for other in library[1][1:]:  # no other ready fragment a similar-prompt lookup could take
        remove_fragment(ws, other)

    result = chain.generate(PROMPTS[0], variants=2, model="tiny-sd", ws=ws, progress=False)

    assert result.fragment_key == k1 and not result.used_fallback
    rebuilt = ws.catalog.get_fragment(k1)
    assert (rebuilt.status, rebuilt.id, rebuilt.profile_id) == ("ready", row.id, row.profile_id)
    assert rebuilt.file_sha256 is not None and stored(ws, k1)
    # the profile was not computed again: same row, same statistics object, untouched
    assert ws.catalog.get_profile(row.profile_id) == profile_before
    assert (ws.store.stat(stats_name).sha256, stats_path.stat().st_mtime_ns) == stats_before
    # profile objects only (the kept full-model validation images sit beside them)
    own = [n for n in ws.store.list("profiles/") if "/full_model_" not in n]
    assert len(own) == 2 * profiles
    assert len(ws.catalog.lineage(k1)["validation_ids"]) == 2  # first build and the rebuild


def test_generate_naming_an_evicted_key_rebuilds_it_but_not_a_removed_one(library):
    ws, (k1, k2, k3) = library
    assert list(enforce_library_cap(ws, size(ws, k2) + size(ws, k3)).evicted) == [k1]
    result = chain.generate(
        "something else entirely", variants=1, key=k1, model="tiny-sd", ws=ws, progress=False
    )
    assert result.fragment_key == k1 and not result.used_fallback
    assert ws.catalog.get_fragment(k1).status == "ready"

    remove_fragment(ws, k2)  # removed by hand: it stays removed
    result = chain.generate(
        "another prompt", variants=1, key=k2, model="tiny-sd", ws=ws, progress=False
    )
    assert result.used_fallback and "evicted" in result.fallback_reason
    assert ws.catalog.get_fragment(k2).status == "evicted"


def test_the_knobs_recorded_in_the_row_make_the_same_key(library):
    ws, (k1, _, _) = library
    row = ws.catalog.get_fragment(k1)
    config = extraction_config_of(row)
    profile = chain.profile(PROMPTS[0], ws=ws, progress=False, **PROFILE).profile
    again = config.params(profile)
    assert canonical_json(again) == canonical_json({k: row.params[k] for k in again})


def test_a_fragment_scored_below_the_threshold_stays_node_local(library):
    ws, (k1, k2, k3) = library
    remove_fragment(ws, k1)
    ws.settings.cache_share_threshold = 10.0  # no score reaches it: everything stays local
    row = ws.catalog.get_fragment(k1)
    chain.extract(row.profile_id, extraction_config_of(row), ws=ws, model="tiny-sd")
    chain.validate(k1, seeds=VALIDATION_SEEDS, ws=ws, progress=False)
    row = ws.catalog.get_fragment(k1)
    assert row.placement == "local" and row.status == "ready"
    assert not ws.store.exists(object_of(row, FRAGMENT_FILE))
    assert not ws.store.exists(object_of(row, MANIFEST_FILE))
    assert node_store(ws).exists(object_of(row, FRAGMENT_FILE))
    assert row.storage_uri.startswith(node_store(ws).url)
    decision = row.params["cache"]
    assert decision["placement"] == "local" and decision["threshold"] == 10.0
    assert set(decision["terms"]) == {"extraction_cost", "size", "popularity", "similar_reuse"}
    assert decision["terms"]["extraction_cost"]["value"] > 0
    assert "no library cap" in decision["terms"]["size"]["note"]
    assert "similar-prompt lookup" in decision["terms"]["similar_reuse"]["note"]
    assert ws.catalog.library_bytes() == size(ws, k2) + size(ws, k3)  # not in the library
    result = chain.generate(PROMPTS[0], variants=1, model="tiny-sd", ws=ws, progress=False)
    assert result.fragment_key == k1 and not result.used_fallback  # read from the node


def test_prompt_popularity_from_the_job_history_shares_a_fragment(library):
    ws, (k1, _, _) = library
    row = ws.catalog.get_fragment(k1)
    for n, prompt in enumerate(["A red circle", "a red circle", "a red circle!", "a cat"]):
        ws.catalog.create_job(f"job-{n}", row.base_model_id, prompt, [0], None)
    ws.settings.cache_share_threshold = 0.6
    ws.settings.library_max_bytes = 10 * row.size_bytes

    decision = place_fragment(ws, k1, row.prompt, row.base_model_id, row.size_bytes, 0.0)

    terms = decision.terms
    assert terms["popularity"]["value"] == 2 and terms["popularity"]["contribution"] == 0.4
    assert terms["similar_reuse"]["value"] == 1  # no embedding: "a red circle!", same words
    assert terms["size"]["contribution"] == -0.1
    assert decision.score == pytest.approx(0.4 + 0.25 - 0.1)
    assert decision.placement == "local"  # 0.55 < 0.6
    assert ws.catalog.get_fragment(k1).params["cache"] == decision.to_json()
    ws.catalog.create_job("job-9", row.base_model_id, "a red circle", [0], None)
    decision = place_fragment(ws, k1, row.prompt, row.base_model_id, row.size_bytes, 0.0)
    assert decision.score == pytest.approx(0.5 + 0.25 - 0.1)  # a third job of the prompt
    assert decision.placement == "shared"


def test_similar_reuse_counts_the_jobs_of_fragments_the_similar_lookup_would_match(library):
    """With the fragment's prompt embedding, "similar prompts" are the ones the library's
    similar-prompt lookup matches (each fragment's own reuse threshold), not shared words."""
    ws, (k1, k2, k3) = library
    row, other = ws.catalog.get_fragment(k1), ws.catalog.get_fragment(k2)
    for n in range(3):
        ws.catalog.create_job(f"job-b{n}", row.base_model_id, PROMPTS[1], [0], None)
    ws.catalog.create_job("job-r", row.base_model_id, PROMPTS[0], [0], None)
    ws.catalog.create_job("job-c", row.base_model_id, "a red circle!", [0], None)
    as_k2 = read_manifest(ws, other).reuse.prompt_embedding  # k2's prompt, embedded
    assert as_k2 is not None

    decision = place_fragment(
        ws, k1, row.prompt, row.base_model_id, row.size_bytes, 0.0, embedding=as_k2
    )

    assert decision.terms["popularity"]["value"] == 1  # its own prompt's job
    assert decision.terms["similar_reuse"]["value"] == 3  # k2's prompt; not "a red circle!"
    assert "similar-prompt lookup" in decision.terms["similar_reuse"]["note"]


def run_cli(*argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(argv))
    return result.exit_code, result.stdout, result.stderr


def test_fragments_pin_unpin_gc_and_ls(library):
    ws, (k1, k2, k3) = library
    code, out, _ = run_cli("fragments", "pin", k1)
    assert code == 0 and "pinned" in out
    assert ws.catalog.get_fragment(k1).pinned
    code, out, _ = run_cli("fragments", "ls")
    line = next(line for line in out.splitlines() if line.startswith(k1))
    assert "shared" in line and "pinned" in line

    total = sum(size(ws, k) for k in (k1, k2, k3))
    code, out, err = run_cli("fragments", "gc", "--max-bytes", str(size(ws, k1)))
    assert code == 0, err
    assert f"evicted {k2}" in out and f"evicted {k3}" in out
    assert f"library: {total} B before, {size(ws, k1)} B after" in out
    assert ws.catalog.get_fragment(k1).status == "ready"
    code, out, err = run_cli("fragments", "show", k2)  # a tombstone: row and lineage only
    assert code == 0 and "evicted" in out and "lineage:" in out, err
    assert ws.catalog.get_fragment(k2).status == "evicted"  # reading it did not mark it corrupt

    code, _, _ = run_cli("fragments", "unpin", k1)
    assert code == 0 and not ws.catalog.get_fragment(k1).pinned


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fragments", "pin", "tiny-sd_00000000deadbeef_01234567"], "not in the catalog"),
        (["fragments", "unpin", "tiny-sd_00000000deadbeef_01234567"], "not in the catalog"),
        (["fragments", "pin", "Bad Key"], "key"),
        (["fragments", "gc", "--max-bytes", "0"], "positive number of bytes"),
        (["fragments", "gc", "--max-bytes", "-3"], "positive number of bytes"),
        (["fragments", "gc", "--max-bytes", "10"], "could hold none"),
    ],
)
def test_bad_cache_input_is_one_line_and_changes_nothing(library, argv, message):
    ws, _ = library
    before = snapshot(ws)
    code, out, err = run_cli(*argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert snapshot(ws) == before


def test_cache_commands_never_import_torch(library):
    """pin/unpin and gc answer (and refuse) without loading torch."""
    _, (k1, _, _) = library
    for argv in (["fragments", "pin", k1], ["fragments", "gc", "--max-bytes", "0"]):
        script = (
            "import sys\n"
            "from fragjobs.cli import main\n"
            "try:\n"
            f"    main({argv!r})\n"
            "except SystemExit:\n"
            "    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
