"""The shipped shapes model: loads offline, matches its recorded hashes, draws what it is told."""

from __future__ import annotations

import shutil

import pytest
import torch

from fragjobs.base_models import load_base
from fragjobs.builtin.configs import SHAPES_DIR, build_shapes, verify_shipped_weights
from fragjobs.errors import IntegrityError
from fragjobs.generation import GenerationConfig, generate_images


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from fragjobs.config import Settings

    return load_base("shapes", settings=Settings(data_dir=tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def reader():
    from transformers import CLIPModel, CLIPProcessor

    folder = SHAPES_DIR / "clip"
    return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


def test_shipped_weights_load_offline_and_match_their_hashes(shapes):
    verify_shipped_weights()
    assert shapes.info.name == "shapes" and shapes.info.clip_path
    assert (shapes.info.height, shapes.info.width) == (64, 64)
    for attn in shapes.pipe.unet.attn_processors:
        module = shapes.pipe.unet.get_submodule(attn.rsplit(".", 1)[0])
        assert module.heads >= 4


def test_corrupt_shipped_weights_are_refused(tmp_path):
    copy = tmp_path / "shapes"
    shutil.copytree(SHAPES_DIR, copy)
    weights = copy / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        build_shapes(copy)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red circle on the left", {"colour": "red", "shape": "circle", "position": "left"}),
        ("a blue square at the top", {"colour": "blue", "shape": "square", "position": "top"}),
        (
            "a yellow star in the center over a black background",
            {"colour": "yellow", "shape": "star", "position": "center", "background": "black"},
        ),
    ],
)
def test_it_draws_what_the_prompt_says(shapes, reader, prompt, expected):
    from fragjobs.builtin.reading import read_attributes

    gen = GenerationConfig(steps=20, guidance_scale=6.0, height=64, width=64, batch_size=4)
    images = generate_images(shapes.pipe, prompt, [0, 1, 2, 3], gen)
    readings = read_attributes(reader[0], reader[1], images)
    for attribute, value in expected.items():
        hits = sum(r[attribute] == value for r in readings)
        assert hits >= 3, (attribute, [r[attribute] for r in readings])


def test_unknown_words_still_generate(shapes):
    gen = GenerationConfig(steps=4, guidance_scale=6.0, height=64, width=64, batch_size=1)
    image = generate_images(shapes.pipe, "ein grünes Quadrat ☃ unten", [0], gen)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_caching_search_on_the_trained_model_keeps_fidelity_and_skips_work(shapes):
    import copy

    from fragjobs.extraction import BlockCachingConfig, remove_block_caching
    from fragjobs.extraction.caching import search_block_caching
    from fragjobs.profiling import ProfileConfig, profile_prompt

    pipe, info = shapes.pipe, shapes.info
    prof = profile_prompt(
        pipe,
        "a red circle on the left",
        ProfileConfig(
            seeds=(0, 1),
            steps=info.default_steps,
            guidance_scale=info.default_guidance,
            height=info.height,
            width=info.width,
        ),
        progress=False,
    )
    unet = copy.deepcopy(pipe.unet)
    config = BlockCachingConfig(min_ssim=0.9)
    schedule, rows = search_block_caching(
        pipe, unet, prof, config, height=info.height, width=info.width
    )
    assert schedule is not None and 1 <= len(rows) <= config.max_trials
    chosen = [r for r in rows if r["estimated_cost"] == schedule.estimated_cost]
    assert chosen and chosen[0]["ssim_min"] >= 0.9  # the worst profiling seed kept it
    cheaper = [r for r in rows if r["estimated_cost"] < schedule.estimated_cost]
    assert all(r["ssim_min"] < 0.9 for r in cheaper)  # the cheapest tried that passed
    for i, row in enumerate(rows):  # after a pass, only clearly cheaper candidates are tried
        passed_before = [r["estimated_cost"] for r in rows[:i] if r["ssim_min"] >= 0.9]
        if passed_before:
            assert row["estimated_cost"] < min(passed_before) - config.cost_tolerance
    assert schedule.estimated_cost < 0.6  # most block time really skipped
    for steps in schedule.recompute.values():
        assert set(steps) >= set(range(config.warmup_steps(info.default_steps)))
    assert unet._diffusers_hook.get_hook("fragjobs_step_counter") is not None
    remove_block_caching(unet)
