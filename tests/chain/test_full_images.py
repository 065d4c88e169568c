"""Nothing the chain computes is wasted: the full model's profiling and validation images are
delivered as variants, kept for later validations, and the fragment makes only the rest."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fragjobs import chain
from fragjobs.chain.delivery import generate_message
from fragjobs.chain.full_images import full_image_object
from fragjobs.chain.knobs import variant_seeds
from fragjobs.chain.validate_step import fragment_base, generation_config
from fragjobs.errors import InvalidInputError
from fragjobs.generation import generate_images
from fragjobs.keys import generation_object
from fragjobs.validation.break_even import break_even_delivered, break_even_old

SHAPES_PROMPT = "a small blue square on the left"
TINY_PROMPT = "a dog on a jet ski"
FAST = {"low_rank": False, "caching": False, "threshold": 1.0, "int8": True}


def _png(ws, job_id: str, seed: int) -> np.ndarray:
    data = ws.store.get_bytes(generation_object(job_id, f"{seed}.png"))
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _uint8(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(int)


@pytest.mark.parametrize(
    ("profile", "validation", "variants", "expected"),
    [
        ([0, 1], [1000], 5, [0, 1, 1000, 2, 3]),
        ([0, 1, 2, 3], [1000, 1001], 3, [0, 1, 2]),
        ([2, 0], [1, 5], 6, [2, 0, 1, 5, 3, 4]),
        ([7], [8], 1, [7]),
    ],
)
def test_variant_seeds_put_the_full_models_first_and_never_repeat(
    profile, validation, variants, expected
):
    seeds = variant_seeds(profile, validation, variants)
    assert seeds == expected
    assert len(set(seeds)) == len(seeds) == variants


def test_chain_run_on_shapes_delivers_profiling_and_validation_images_then_the_fragments(
    ws, tmp_path
):
    report = chain.run(
        SHAPES_PROMPT,
        model="shapes",
        variants=8,
        steps=8,
        profile_seeds=[0, 1],
        validation_seeds=[1000, 1001],
        out_dir=tmp_path / "out",
        ws=ws,
        progress=False,
        measure_memory=False,
        **FAST,
    )
    assert report.passed  # int8 alone keeps the gate: the fragment made the other images
    delivery = report.summary["delivery"]
    assert delivery["seeds"] == [0, 1, 1000, 1001, 2, 3, 4, 5]
    assert len(set(delivery["seeds"])) == delivery["variants"] == 8
    assert delivery["full_model_seeds"] == [0, 1, 1000, 1001]
    assert delivery["from_profiling"] == [0, 1] and delivery["from_validation"] == [1000, 1001]
    assert delivery["fragment_seeds"] == [2, 3, 4, 5]
    images = sorted(int(p.stem) for p in (report.out_dir / "images").glob("*.png"))
    assert images == sorted(delivery["seeds"])

    job_id = report.generation.job_id
    meta = json.loads(ws.store.get_bytes(generation_object(job_id, "meta.json")))
    assert meta["full_model_seeds"] == [0, 1, 1000, 1001]
    assert meta["fragment_seeds"] == [2, 3, 4, 5]
    assert ws.catalog.get_job(job_id).metrics["reused_full_model_seeds"] == [0, 1, 1000, 1001]
    assert sorted(img.seed for img in ws.catalog.list_images(job_id)) == sorted(delivery["seeds"])

    # the delivered full-model images are the full model's, the others the fragment's
    loaded = fragment_base(ws, report.key)
    manifest = chain.read_manifest(ws, ws.catalog.get_fragment(report.key))
    gen = generation_config(manifest, batch_size=2)
    full = generate_images(loaded.pipe, SHAPES_PROMPT, [1, 1001], gen)
    assert np.abs(_png(ws, job_id, 1) - _uint8(full[0])).max() <= 1
    assert np.abs(_png(ws, job_id, 1001) - _uint8(full[1])).max() <= 1
    again = chain.generate(
        SHAPES_PROMPT, seeds=[3], model="shapes", key=report.key, ws=ws, progress=False
    )
    assert again.full_model_seeds == [] and again.reused_seeds == []
    assert np.abs(_png(ws, job_id, 3) - _png(ws, again.job_id, 3)).max() <= 1

    h5 = report.summary["hypotheses"]["H5"]["values"]
    perf = report.summary["performance"]
    assert h5["delivered_full_model_images"] == 4
    full_s, frag_s = perf["latency_full_ms"] / 1000, perf["latency_fragment_ms"] / 1000
    if full_s > frag_s:
        # the stored latencies are rounded to 6 digits: when the saving is a tiny difference
        # of two of them, recompute from the stored saving, not from their difference
        saving = h5["saving_per_image_s"]
        assert saving == pytest.approx(full_s - frag_s, abs=2e-5 * full_s)
        assert h5["break_even_variants"] == pytest.approx(
            break_even_delivered(h5["chain_s"], 4, full_s, full_s - saving), rel=1e-4
        )
        assert h5["break_even_variants_old"] == pytest.approx(
            break_even_old(h5["overhead_s"], full_s, full_s - saving), rel=1e-4
        )
        assert h5["break_even_variants"] < h5["break_even_variants_old"]


@pytest.fixture(params=["tiny-sd", "tiny-sdxl", "tiny-pixart"])
def tiny_fragment(request, ws):
    """A fragment of each family's tiny built-in (its kept full-model latents decode alike)."""
    prof = chain.profile(
        TINY_PROMPT, model=request.param, seeds=[0, 1], steps=3, ws=ws, progress=False
    )
    config = chain.extraction_config(1.0, int8=True, caching=False, head_guard_on=False)
    return chain.extract(prof.profile_id, config, ws=ws)


def test_validation_reuses_the_kept_full_model_images(ws, tiny_fragment):
    key = tiny_fragment.key
    first = chain.validate(key, seeds=[1000, 1001], ws=ws, progress=False)
    assert first.full_generated_seeds == [1000, 1001]
    again = chain.validate(key, seeds=[1001, 1000, 1002], ws=ws, progress=False)
    assert again.full_generated_seeds == [1002]  # only the seed never validated before
    # the same latents, decoded in another batch: equal up to float rounding
    assert torch.allclose(again.full_images[0], first.full_images[1], atol=1e-5)
    assert torch.allclose(again.full_images[1], first.full_images[0], atol=1e-5)
    ssim = again.metrics.ssim_per_image[:2]
    assert ssim == pytest.approx(first.metrics.ssim_per_image[::-1], abs=1e-4)


def test_a_damaged_kept_image_is_generated_again(ws, tiny_fragment):
    key = tiny_fragment.key
    first = chain.validate(key, seeds=[1000], ws=ws, progress=False)
    name = full_image_object(tiny_fragment.manifest.profiling.profile_id, 1000)
    data = bytearray(ws.store.get_bytes(name))
    data[-3] ^= 0xFF  # a flipped byte in the latents
    ws.store.put_bytes(name, bytes(data))
    again = chain.validate(key, seeds=[1000], ws=ws, progress=False)
    assert again.full_generated_seeds == [1000]
    assert torch.allclose(again.full_images, first.full_images, atol=1e-5)


def test_validation_refuses_seeds_the_fragment_was_profiled_on(ws, tiny_fragment):
    with pytest.raises(InvalidInputError, match="held out"):
        chain.validate(tiny_fragment.key, seeds=[1, 1000], ws=ws, progress=False)


def test_run_refuses_validation_seeds_that_were_profiled(ws, tmp_path):
    with pytest.raises(InvalidInputError, match="held out"):
        chain.run(
            TINY_PROMPT,
            model="tiny-sd",
            profile_seeds=[0, 1],
            validation_seeds=[1, 1000],
            out_dir=tmp_path / "out",
            ws=ws,
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_fewer_variants_than_full_model_images_delivers_only_n(ws, tmp_path):
    report = chain.run(
        TINY_PROMPT,
        model="tiny-sd",
        variants=3,
        steps=3,
        profile_seeds=[0, 1],
        validation_seeds=[1000, 1001],
        out_dir=tmp_path / "out",
        ws=ws,
        progress=False,
        measure_memory=False,
        **FAST,
    )
    delivery = report.summary["delivery"]
    assert delivery["seeds"] == [0, 1, 1000] and delivery["fragment_seeds"] == []
    assert report.generation.reused_seeds == [0, 1, 1000]
    assert sorted(p.stem for p in (report.out_dir / "images").glob("*.png")) == ["0", "1", "1000"]
    assert len(ws.catalog.list_images(report.generation.job_id)) == 3
    assert report.summary["hypotheses"]["H5"]["values"]["delivered_full_model_images"] == 3


def test_farm_generate_delivers_kept_full_model_images_for_matching_seeds(ws, tiny_fragment):
    key = tiny_fragment.key
    model = key.split("_", 1)[0]  # the fragment's base model
    val = chain.validate(key, seeds=[1000], ws=ws, progress=False)
    out = generate_message(
        {"key": key},
        prompt=TINY_PROMPT,
        seeds=[0, 1000, 7],
        job_id="job-farm",
        model=model,
        ws=ws,
    )
    assert out["reused_full_model_seeds"] == [0, 1000]
    if val.passed:
        assert out["fragment_key"] == key and out["full_model_seeds"] == [0, 1000]
    assert np.abs(_png(ws, "job-farm", 1000) - _uint8(val.full_images[0])).max() <= 1
    # another prompt never gets this prompt's images
    other = generate_message(
        {"key": key},
        prompt="a cat on a sofa",
        seeds=[0, 1000],
        job_id="job-other",
        model=model,
        ws=ws,
    )
    assert other["reused_full_model_seeds"] == []
