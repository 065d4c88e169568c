"""The whole chain on tiny-sd, embedded: files, rows, integrity, fallbacks and bad input.

The end-to-end run and the integrity checks (flipped byte, wrong base, truncated, rehashed or
missing file) run on each family's tiny built-in: tiny-sd, tiny-sdxl and tiny-pixart."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from fragjobs import chain
from fragjobs.base_identity import BaseModelInfo
from fragjobs.base_models import load_base
from fragjobs.errors import (
    BaseModelMismatchError,
    FragjobsError,
    FragmentIntegrityError,
    InvalidInputError,
    InvalidKeyError,
    ManifestError,
    NotFoundError,
    UnknownModelError,
)
from fragjobs.families import family_of
from fragjobs.keys import FRAGMENT_FILE, MANIFEST_FILE, fragment_object

PROMPT = "a dog on a jet ski"
STATUSES = {"PASS", "WARN", "FAIL", "UNAVAILABLE"}
MODELS = ["tiny-sd", "tiny-sdxl", "tiny-pixart"]


@pytest.fixture(params=MODELS)
def model(request) -> str:
    """Each family's tiny built-in (SD, SDXL, PixArt-α)."""
    return request.param


@pytest.fixture
def report(ws, tmp_path, model):
    return chain.run(
        PROMPT, model=model, variants=3, out_dir=tmp_path / "out", ws=ws, progress=False
    )


def _objects(ws):
    return ws.store.list("")


def test_run_writes_every_report_file_and_catalog_row(report, ws, tmp_path, model):
    out = report.out_dir  # a report folder of its own under --out
    assert out.parent == tmp_path / "out" and re.fullmatch(r"\d{4}-\d\d-\d\d_\d{4}", out.name)
    for name in (
        "fragment_manifest.json",
        "head_importance.json",
        "metrics_summary.json",
        "compare.png",
        "profiling_raw.parquet",
        "regression_diff.json",
        "plots/latency.png",
        "plots/quality_tradeoff.png",
        "index.html",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0.png", "1.png", "2.png"]

    summary = json.loads((out / "metrics_summary.json").read_text())
    assert set(summary["hypotheses"]) == {"H1", "H2", "H3", "H4", "H5"}
    assert all(h["status"] in STATUSES for h in summary["hypotheses"].values())
    perf = summary["performance"]
    assert perf["latency_full_ms"] > 0 and perf["latency_fragment_ms"] > 0
    assert summary["hypotheses"]["H3"]["status"] == "UNAVAILABLE"  # not measured in a run
    assert summary["quality"]["lpips"] is None and summary["quality"]["lpips_reason"]

    attempts = summary["fragment"]["attempts"]
    assert attempts[-1]["key"] == report.key and attempts[-1]["passed"] == report.passed
    assert len(attempts) == 1 or attempts[-1]["heads_kept"] == attempts[-1]["heads_total"]
    manifest = json.loads((out / "fragment_manifest.json").read_text())
    assert manifest["key"] == report.key
    assert manifest["verified"] == report.passed
    pruning = manifest["pruning"]
    first = attempts[0]
    if len(attempts) > 1 and first["heads_kept"] < first["heads_total"]:
        # pruned heads failed the gate: extracted again keeping them all
        assert pruning["threshold"] == pruning["requested_threshold"] == 1.0
    elif pruning["heads_kept"] == pruning["heads_total"]:  # the guard kept them all: it shows why
        assert pruning["requested_threshold"] < 1.0 and pruning["threshold"] == 1.0
        assert pruning["search"] and all(
            row["ssim_min"] < pruning["min_ssim"] for row in pruning["search"]
        )
    else:
        assert pruning["threshold"] >= pruning["requested_threshold"]
        passed = [row for row in pruning["search"] if row["threshold"] == pruning["threshold"]]
        assert passed and passed[0]["ssim_min"] >= pruning["min_ssim"]
    assert manifest["performance"]["measured_latency_full_ms"] == pytest.approx(
        perf["latency_full_ms"], rel=1e-3
    )
    importance = json.loads((out / "head_importance.json").read_text())
    assert importance["num_heads"] == manifest["pruning"]["heads_total"]

    row = ws.catalog.get_fragment(report.key)
    assert row.status == ("ready" if report.passed else "failed_gate")
    lineage = ws.catalog.lineage(report.key)
    assert lineage["profile_id"] == manifest["profiling"]["profile_id"]
    assert len(ws.catalog.list_images(report.generation.job_id)) == 3
    names = _objects(ws)
    assert fragment_object(model, report.key, FRAGMENT_FILE) in names
    assert any(n.endswith("/stats.safetensors") for n in names)


def test_steps_are_idempotent(ws):
    first = chain.profile(PROMPT, model="tiny-sd", ws=ws, progress=False)
    again = chain.profile(PROMPT, model="tiny-sd", ws=ws, progress=False)
    assert again.reused and again.profile_id == first.profile_id
    for name, energy in first.profile.energy.items():
        assert torch.allclose(energy, again.profile.energy[name])
    a = chain.extract(first.profile_id, ws=ws)
    b = chain.extract(first.profile_id, ws=ws)
    assert a.key == b.key and b.reused
    assert len(ws.catalog.list_fragments()) == 1


def _validated_fragment(ws, threshold=1.0, caching=False, model="tiny-sd"):
    prof = chain.profile(PROMPT, model=model, ws=ws, progress=False)
    config = chain.extraction_config(threshold, int8=False, caching=caching, head_guard_on=False)
    ext = chain.extract(prof.profile_id, config, ws=ws)
    return chain.validate(ext.key, ws=ws, progress=False)


def test_all_heads_fragment_matches_full_model_and_is_used(ws):
    val = _validated_fragment(ws, threshold=1.0)
    assert torch.equal(val.full_images, val.fragment_images)
    assert val.passed and val.metrics.ssim == pytest.approx(1.0)
    result = chain.generate(PROMPT, variants=2, model="tiny-sd", ws=ws, progress=False)
    assert result.fragment_key == val.key and not result.used_fallback
    assert ws.catalog.get_fragment(val.key).hit_count == 1


def test_flipped_byte_is_detected_and_generation_falls_back(ws, caplog, model):
    val = _validated_fragment(ws, model=model)
    name = fragment_object(model, val.key, FRAGMENT_FILE)
    path = ws.store.root / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="fragjobs"):
        result = chain.generate(PROMPT, variants=2, model=model, key=val.key, ws=ws, progress=False)
    assert result.used_fallback and result.fragment_key is None
    assert "corrupt" in result.fallback_reason
    assert "falling back" in caplog.text
    assert ws.catalog.get_fragment(val.key).status == "corrupt"
    job = ws.catalog.get_job(result.job_id)
    assert job.used_fallback and job.status == "done"
    assert len(result.image_uris) == 2


def test_failed_gate_fragment_is_not_used(ws, gate_ssim_min):
    gate_ssim_min(1.0)
    val = _validated_fragment(ws, threshold=0.5)
    assert not val.passed
    assert ws.catalog.get_fragment(val.key).status == "failed_gate"
    result = chain.generate(PROMPT, variants=1, model="tiny-sd", key=val.key, ws=ws, progress=False)
    assert result.used_fallback and "failed_gate" in result.fallback_reason


def test_failed_gate_with_pruned_heads_is_extracted_again_without(ws, gate_ssim_min):
    gate_ssim_min(0.999)
    prof = chain.profile(PROMPT, model="tiny-sd", ws=ws, progress=False)
    config = chain.extraction_config(
        0.5, low_rank=False, int8=False, caching=False, head_guard_on=False
    )
    ext, val, attempts = chain.extract_and_validate(
        prof.profile_id, config, seeds=[5, 6], ws=ws, progress=False
    )
    first, second = attempts  # half the heads: fails; no edit left: the full model's images
    assert first["heads_kept"] < first["heads_total"] and not first["passed"]
    assert second["heads_kept"] == second["heads_total"] and second["passed"]
    assert val.passed and ext.key == second["key"] != first["key"]
    assert ws.catalog.get_fragment(first["key"]).status == "failed_gate"
    assert ws.catalog.get_fragment(second["key"]).status == "ready"
    assert torch.equal(val.full_images, val.fragment_images)

    # a fragment without pruned heads that fails is not extracted again
    gate_ssim_min(1.0)
    lossy = chain.extraction_config(1.0, caching=False)  # int8: not the full model
    _, val, attempts = chain.extract_and_validate(
        prof.profile_id, lossy, seeds=[5], ws=ws, progress=False
    )
    assert len(attempts) == 1 and not val.passed


def test_failed_gate_with_caching_tightens_the_schedule_at_most_twice(ws, gate_ssim_min):
    gate_ssim_min(1.0)
    prof = chain.profile(PROMPT, model="tiny-sd", ws=ws, progress=False)
    config = chain.extraction_config(1.0, low_rank=False, int8=False, fidelity=0.9)
    ext, val, attempts = chain.extract_and_validate(
        prof.profile_id, config, seeds=[5], ws=ws, progress=False
    )
    assert attempts[0]["caching_min_ssim"] == 0.9 and not attempts[0]["passed"]
    assert 1 < len(attempts) <= chain.GATE_ATTEMPTS
    for earlier, later in zip(attempts, attempts[1:], strict=False):
        assert not earlier["passed"] and earlier["heads_kept"] == earlier["heads_total"]
        if later["caching_min_ssim"] is not None:  # each rung halves the SSIM it may lose
            assert later["caching_min_ssim"] == chain.head_guard(earlier["caching_min_ssim"])
    if len(attempts) == chain.GATE_ATTEMPTS and attempts[-1]["caching_min_ssim"] is not None:
        assert not val.passed  # every rung failed: the run will fall back to the full model
    assert ext.key == attempts[-1]["key"]
    assert len({a["key"] for a in attempts}) == len(attempts)


def test_validate_reference_must_match_the_seeds(ws):
    prof = chain.profile(PROMPT, model="tiny-sd", ws=ws, progress=False)
    ext = chain.extract(prof.profile_id, chain.extraction_config(1.0, caching=False), ws=ws)
    with pytest.raises(InvalidInputError, match="reference"):
        chain.validate(ext.key, seeds=[1000, 1001], ws=ws, reference=torch.zeros(1, 3, 64, 64))
    with pytest.raises(InvalidInputError, match="reference"):
        chain.validate(ext.key, seeds=[1000], ws=ws, reference=torch.zeros(1, 3, 8, 8))
    with pytest.raises(InvalidInputError, match="held out"):  # a profiling seed
        chain.validate(ext.key, seeds=[prof.profile.config.seeds[0]], ws=ws)
    assert ws.catalog.get_fragment(ext.key).status == "building"  # nothing recorded


def test_apply_fragment_to_own_pipeline(ws, tmp_path, model):
    val = _validated_fragment(ws, threshold=0.5, model=model)
    pipe = load_base(model).pipe
    manifest = chain.apply_fragment_(pipe, val.key, ws=ws)
    assert manifest.key == val.key
    images = pipe(
        PROMPT,
        num_inference_steps=manifest.profiling.steps,
        guidance_scale=manifest.profiling.guidance_scale,  # SDXL's pipelines default to 5.0
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(val.seeds[0]),
        output_type="pt",
        **family_of(pipe).call_kwargs,  # PixArt: no resolution binning at the toy's size
    ).images
    assert torch.allclose(images[0], val.fragment_images[0], atol=1e-4)

    other = load_base(model).pipe
    info = other._fragjobs_base
    other._fragjobs_base = BaseModelInfo(model, "0" * 64, info.source, 64, 64, 10)
    with pytest.raises(BaseModelMismatchError, match=f"was made from {model}"):
        chain.apply_fragment_(other, val.key, ws=ws)

    from fragjobs.builtin import BUILTINS

    with pytest.raises(UnknownModelError, match="cannot identify"):
        chain.apply_fragment_(BUILTINS[model].build(), val.key, ws=ws)


def test_truncated_rehashed_or_missing_fragment_file_is_refused(ws, tmp_path, model):
    val = _validated_fragment(ws, threshold=0.5, model=model)
    folder = tmp_path / "frag"
    folder.mkdir()
    for filename in (FRAGMENT_FILE, MANIFEST_FILE):
        name = fragment_object(model, val.key, filename)
        (folder / filename).write_bytes(ws.store.get_bytes(name))
    pipe = load_base(model).pipe
    data = (folder / FRAGMENT_FILE).read_bytes()
    (folder / FRAGMENT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(FragmentIntegrityError, match="does not match its manifest"):
        chain.apply_fragment_(pipe, folder)
    (folder / FRAGMENT_FILE).write_bytes(data)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["artifacts"]["files"][FRAGMENT_FILE]["sha256"] = "f" * 64
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(FragmentIntegrityError):
        chain.apply_fragment_(pipe, folder)
    (folder / FRAGMENT_FILE).unlink()
    with pytest.raises(ManifestError, match="cannot read fragment folder"):
        chain.apply_fragment_(pipe, folder)
    ws.store.delete(fragment_object(model, val.key, FRAGMENT_FILE))  # missing from the store
    with pytest.raises(FragjobsError):
        chain.load_stored_fragment(val.key, ws)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompt": ""}, InvalidInputError, "prompt is empty"),
        ({"prompt": "   \n"}, InvalidInputError, "prompt is empty"),
        ({"prompt": 42}, InvalidInputError, "must be a string"),
        ({"variants": 0}, InvalidInputError, "variants"),
        ({"variants": -3}, InvalidInputError, "variants"),
        ({"variants": 10**9}, InvalidInputError, "variants"),
        ({"variants": 2.5}, InvalidInputError, "integer"),
        ({"threshold": 0.0}, InvalidInputError, "threshold"),
        ({"threshold": 1.5}, InvalidInputError, "threshold"),
        ({"profile_seeds": [-1, 2]}, InvalidInputError, "seed"),
        ({"profile_seeds": ["a"]}, InvalidInputError, "seed"),
        ({"validation_seeds": []}, InvalidInputError, "empty"),
        (
            {"model": "no-such-model"},
            UnknownModelError,
            "Available: pixart-shape, sd15-shape, sdxl-shape, shapes, tiny-pixart, tiny-sd, "
            "tiny-sdxl",
        ),
        ({"model": "/no/such/folder"}, UnknownModelError, "unknown model"),
    ],
)
def test_bad_input_is_refused_and_leaves_nothing(ws, tmp_path, kwargs, error, match):
    args = {
        "prompt": PROMPT,
        "model": "tiny-sd",
        "variants": 2,
        "out_dir": tmp_path / "o",
        "ws": ws,
        "progress": False,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        chain.run(args.pop("prompt"), **args)
    assert ws.catalog.list_fragments() == []
    assert _objects(ws) == []
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key", ["../etc/passwd", "a/b", "UPPER", "", "x..y", "a b"])
def test_bad_keys_are_refused_before_any_lookup(ws, key):
    with pytest.raises(InvalidKeyError):
        chain.generate(PROMPT, variants=1, model="tiny-sd", key=key, ws=ws, progress=False)
    with pytest.raises(InvalidKeyError):
        chain.load_stored_fragment(key, ws)
    assert _objects(ws) == []


def test_unknown_fragment_key_is_a_clear_error(ws):
    with pytest.raises(NotFoundError, match="tiny-sd_0000"):
        chain.validate("tiny-sd_0000000000000000_00000000", ws=ws, progress=False)


def test_cli_run_writes_report_and_errors_are_one_line(settings, tmp_path):
    env = {"FRAGJOBS_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin"}
    out = tmp_path / "cli-out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fragjobs.cli",
            "run",
            PROMPT,
            "--model",
            "tiny-sd",
            "--variants",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (folder,) = out.iterdir()  # the run's report folder, printed at the end
    assert "H4" in done.stdout and (folder / "metrics_summary.json").is_file()
    assert f"open:   {folder.resolve() / 'index.html'}" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fragjobs.cli", "run", " ", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: prompt is empty: give a non-blank text prompt"
    )


def test_similar_prompt_reuses_the_fragment_and_reuse_is_measured(ws):
    val = _validated_fragment(ws, threshold=1.0)
    similar = chain.generate(
        "a dog on a jet-ski!", variants=1, model="tiny-sd", ws=ws, progress=False
    )
    assert similar.fragment_key == val.key and not similar.used_fallback
    other = chain.generate("zzzz qqqq xxxx", variants=1, model="tiny-sd", ws=ws, progress=False)
    assert other.used_fallback and "similar prompt" in other.fallback_reason

    reuse = chain.measure_reuse(val.key, ["a dog on a jet-ski!", "A dog riding a jet ski"], ws=ws)
    assert reuse["n"] == 2 and reuse["pass_rate"] == 1.0  # every head kept: identical images
    assert all(row["similarity"] > 0.8 for row in reuse["rows"])
    manifest = chain.load_stored_fragment(val.key, ws).manifest
    assert manifest.reuse.pass_rate == 1.0 and len(manifest.reuse.paraphrases) == 2
