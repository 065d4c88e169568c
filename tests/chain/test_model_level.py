"""The model-level fragment: built once per base, gated per prompt, else the prompt's own.

Runs on tiny-sd (random weights: the gate's verdict is set by the thresholds file each test
writes, so both paths are exercised on purpose), embedded, every step real."""

from __future__ import annotations

import json

import pytest
import torch

from fragjobs import chain
from fragjobs.chain.fragments import warm_fragment_unet
from fragjobs.chain.full_images import decode_in_batches
from fragjobs.chain.gate_images import shared_warmup_steps
from fragjobs.chain.knobs import ChainKnobs, head_guard
from fragjobs.chain.model_level import (
    CALIBRATION_PROMPTS,
    calibration_prompts,
    gate_for_prompt,
    model_level_fragment,
)
from fragjobs.chain.profile_step import profile_config_of, profile_id_of
from fragjobs.chain.stored import read_manifest
from fragjobs.chain.validate_step import generation_config
from fragjobs.errors import InvalidInputError
from fragjobs.extraction import BlockCachingConfig
from fragjobs.extraction.fidelity import profiling_generation, reference_images, seed_ssim
from fragjobs.extraction.shared_schedule import search_shared_schedule
from fragjobs.families import denoiser
from fragjobs.generation import generate_images, with_unet
from fragjobs.generation.generate import generate_latents

MODEL = "tiny-sd"
SMALL = {
    "model": MODEL,
    "steps": 6,
    "profile_seeds": [0, 1],
    "validation_seeds": [1000, 1001],
    "variants": 4,
}


@pytest.fixture
def gate(gate_ssim_min):
    """Sets the quality gate: ``gate(passing=True)`` accepts any image, False none."""

    def set_gate(passing: bool) -> None:
        gate_ssim_min(0.001 if passing else 1.0, colour_delta_e_max=1000)

    return set_gate


def _run(ws, tmp_path, prompt, **knobs):
    return chain.run(
        prompt,
        **{**SMALL, "model_level": True, **knobs},
        out_dir=tmp_path / "out",
        ws=ws,
        progress=False,
        measure_memory=False,
    )


def _model_level_rows(ws):
    return [r for r in ws.catalog.list_fragments() if "model_level" in r.params]


def test_a_prompt_the_model_level_fragment_passes_is_not_profiled(ws, tmp_path, gate):
    gate(passing=True)
    report = _run(ws, tmp_path, "a red circle on the left", paraphrases=["a red disc on the left"])
    summary = report.summary
    level = summary["model_level"]
    # reuse (H3) is measured for this prompt, and not written into the shared manifest
    assert summary["hypotheses"]["H3"]["values"]["pass_rate"] is not None
    assert read_manifest(ws, ws.catalog.get_fragment(report.key)).reuse.paraphrases == []
    assert level["used"] and level["key"] == report.key and level["built_s"] > 0
    assert len(level["calibration_prompts"]) == CALIBRATION_PROMPTS
    [row] = _model_level_rows(ws)
    assert row.key == report.key and row.status == "ready"
    assert row.params["model_level"]["prompts"] == level["calibration_prompts"]
    lineage = ws.catalog.lineage(report.key)
    assert lineage["profile_id"] == row.params["model_level"]["profile_ids"][0]
    # the prompt itself was never profiled: no profile row, no per-prompt fragment
    loaded = chain.base(MODEL, ws.settings)
    own = profile_config_of(loaded.info, SMALL["profile_seeds"], SMALL["steps"])
    own_id = profile_id_of(loaded.info, "a red circle on the left", own)
    assert ws.catalog.find_profile(own_id) is None
    assert not (report.out_dir / "profiling_raw.parquet").exists()
    assert any("was not profiled" in n for n in _notes(report))
    # the gate's full-model images are the first variants; the fragment made the rest
    delivery = summary["delivery"]
    assert delivery["seeds"] == [1000, 1001, 0, 1]
    assert delivery["from_validation"] == [1000, 1001]
    assert delivery["full_model_seeds"] == [1000, 1001]
    assert delivery["fragment_seeds"] == [0, 1] and delivery["fragment_key"] == report.key
    # the run's seconds: the one-off build (this run made it) and the gate, nothing else
    perf = summary["performance"]
    assert perf["profile_s"] == 0.0
    assert perf["extract_s"] == pytest.approx(level["built_s"], abs=1e-3)
    assert perf["validate_s"] == pytest.approx(level["gate_s"], abs=1e-3)
    assert perf["delivered_full_model_images"] == 2
    h5 = summary["hypotheses"]["H5"]["values"]
    assert h5["chain_s"] == pytest.approx(level["built_s"] + level["gate_s"], abs=1e-3)
    # a validation row of the model-level fragment records this prompt's verdict
    latest = ws.catalog.latest_validation(report.key)
    assert latest.metrics["prompt"] == "a red circle on the left" and latest.passed


def test_the_second_prompt_reuses_it_and_pays_only_its_gate(ws, tmp_path, gate):
    gate(passing=True)
    first = _run(ws, tmp_path, "a red circle on the left")
    second = _run(ws, tmp_path, "a blue square at the top")
    assert second.key == first.key and len(_model_level_rows(ws)) == 1
    level = second.summary["model_level"]
    assert level["used"] and level["built_s"] == 0.0
    perf = second.summary["performance"]
    assert perf["extract_s"] == 0.0 and perf["chain_s"] == pytest.approx(level["gate_s"], abs=1e-3)
    assert level["gate_full_model_s"] < level["gate_s"]


def test_its_gate_computes_the_warm_up_steps_once_for_both_models(ws, gate):
    gate(passing=True)
    knobs = ChainKnobs.from_settings(ws.settings, **SMALL)
    level = model_level_fragment(ws, knobs)
    manifest = read_manifest(ws, ws.catalog.get_fragment(level.key))
    # int8 would compute as float on this CPU: left out, so no weight differs from the base
    assert manifest.compression.int8 is None
    shared = shared_warmup_steps(manifest)
    assert 1 <= shared == manifest.dynamic_routing.warmup_steps < SMALL["steps"]
    checked = gate_for_prompt(ws, level.key, "a blue square at the top", knobs)
    assert checked.shared_steps == shared
    # the delivered full-model images are exactly the full model's own, from seed to image
    loaded = chain.base(MODEL, ws.settings)
    gen = generation_config(manifest, batch_size=len(checked.seeds))
    own = generate_latents(loaded.pipe, "a blue square at the top", checked.seeds, gen)
    assert torch.equal(checked.full_images, decode_in_batches(loaded.pipe, own, gen.batch_size))
    # and the fragment's are its own, as generation makes them
    _, unet = warm_fragment_unet(ws, loaded, ws.catalog.get_fragment(level.key))
    frag = generate_images(
        with_unet(loaded.pipe, unet), "a blue square at the top", checked.seeds, gen
    )
    assert torch.equal(frag, checked.fragment_images)
    # a second gate finds the full model's images kept and shares nothing
    again = gate_for_prompt(ws, level.key, "a blue square at the top", knobs)
    assert again.shared_steps == 0 and torch.equal(again.full_images, checked.full_images)


def test_a_failed_gate_falls_back_to_the_prompts_own_chain(ws, tmp_path, gate):
    gate(passing=True)
    model_level_fragment(ws, ChainKnobs.from_settings(ws.settings, **SMALL))  # built, passing
    gate(passing=False)
    report = _run(ws, tmp_path, "a green triangle on the right")
    attempts = report.summary["fragment"]["attempts"]
    first, last = attempts[0], attempts[-1]
    assert first["model_level"] and not first["passed"] and "ssim" in first["gate_reason"]
    assert last["key"] != first["key"] and not last.get("model_level")
    # its own ladder starts where the model-level fragment stood: no head pruning, and a
    # schedule allowed half the SSIM loss of the run's fidelity
    own = attempts[1]
    assert own["heads_kept"] == own["heads_total"]
    assert own["caching_min_ssim"] == head_guard(ChainKnobs.from_settings(ws.settings).fidelity)
    level = report.summary["model_level"]
    assert not level["used"] and level["reason"] == first["gate_reason"]
    # the model-level fragment stays ready: one prompt's verdict is not its status
    assert ws.catalog.get_fragment(first["key"]).status == "ready"
    # its gate's seconds are counted in the run; its full-model images were reused by the
    # prompt's own validation (kept under the prompt's own profile id)
    perf = report.summary["performance"]
    assert perf["validate_s"] >= level["gate_s"]
    assert (report.out_dir / "profiling_raw.parquet").is_file()


def test_knob_off_builds_nothing_model_level(ws, tmp_path, gate):
    gate(passing=True)
    report = _run(ws, tmp_path, "a red circle on the left", model_level=False)
    assert report.summary["model_level"] is None and not _model_level_rows(ws)


def test_a_folder_needs_prompts_of_its_own_before_it_gets_one(ws, tmp_path, gate):
    from fragjobs.builtin import BUILTINS

    gate(passing=True)
    folder = tmp_path / "my-model"
    BUILTINS[MODEL].build().save_pretrained(folder)
    knobs = ChainKnobs.from_settings(ws.settings, **{**SMALL, "model": str(folder)})
    level = model_level_fragment(ws, knobs)
    assert level.key is None and "needs 3 prompts" in level.reason and "it has 0" in level.reason
    for prompt in ("a red circle on the left", "a blue square at the top", "a green star"):
        _run(ws, tmp_path, prompt, model=str(folder), model_level=False)
    loaded = chain.base(str(folder), ws.settings)
    base_row = ws.catalog.get_or_create_base_model(
        loaded.info.name, loaded.info.sha256, loaded.info.source
    )
    prompts = calibration_prompts(ws, loaded, base_row.id)
    assert sorted(prompts) == [
        "a blue square at the top",
        "a green star",
        "a red circle on the left",
    ]
    level = model_level_fragment(ws, knobs)
    assert level.key is not None and sorted(level.prompts) == sorted(prompts)


def test_the_shared_schedule_keeps_its_fidelity_on_every_calibration_prompt(ws):
    loaded = chain.base(MODEL, ws.settings)
    profiles = [
        chain.profile(p, model=MODEL, seeds=[0, 1], steps=6, ws=ws, progress=False).profile
        for p in ("a red circle on the left", "a blue square at the top")
    ]
    unet = denoiser(loaded.pipe)
    config = BlockCachingConfig(min_ssim=0.9)
    size = loaded.info.height, loaded.info.width
    try:
        schedule, rows = search_shared_schedule(
            loaded.pipe, unet, profiles, config, height=size[0], width=size[1]
        )
        assert rows and {r["prompt_index"] for r in rows} <= {0.0, 1.0}
        if schedule is not None:  # attached: each prompt's worst profiling seed keeps it
            for p in profiles:
                reference = reference_images(loaded.pipe, p, *size)
                gen = profiling_generation(p, *size)
                worst, _mean = seed_ssim(loaded.pipe, unet, p, reference, gen)
                assert worst >= 0.9
    finally:
        from fragjobs.extraction import remove_block_caching

        remove_block_caching(unet)
    with pytest.raises(InvalidInputError, match="at least two"):
        search_shared_schedule(loaded.pipe, unet, profiles[:1], config, height=8, width=8)


def _notes(report):
    path = report.out_dir / "metrics_summary.json"
    return json.loads(path.read_text()).get("notes", [])


def test_fragjobs_run_tries_it_by_default(settings, gate, tmp_path):
    import os
    import subprocess
    import sys

    gate(passing=True)
    env = {**os.environ, "FRAGJOBS_THRESHOLDS_PATH": str(settings.thresholds_path)}
    env.pop("FRAGJOBS_MODEL_LEVEL")  # the default, as a user gets it
    args = ["--model", MODEL, "--steps", "6", "--variants", "3", "--profile-seeds", "0,1"]
    args += ["--validation-seeds", "1000,1001", "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-m", "fragjobs.cli", "run", "a red circle on the left", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "built the base's model-level fragment" in done.stdout
    assert "the prompt was not profiled" in done.stdout
    [folder] = (tmp_path / "out").iterdir()
    summary = json.loads((folder / "metrics_summary.json").read_text())
    assert summary["model_level"]["used"] and summary["knobs"]["model_level"] is True
    per_prompt = [*args, "--per-prompt"]
    done = subprocess.run(
        [sys.executable, "-m", "fragjobs.cli", "run", "a blue square at the top", *per_prompt],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    newest = max((tmp_path / "out").iterdir(), key=lambda p: p.stat().st_mtime)
    summary = json.loads((newest / "metrics_summary.json").read_text())
    assert summary["model_level"] is None and summary["knobs"]["model_level"] is False
