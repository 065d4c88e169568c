"""The PixArt-α family (a diffusion transformer) through the family adapter: its blocks and
their levels, per-head profiling of the transformer blocks' attention, residual block caching
that really skips blocks and comes off cleanly, and the family registry."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import PixArtAlphaPipeline

from fragjobs.base_models import load_base
from fragjobs.base_text import prompt_embedding
from fragjobs.errors import InvalidInputError, UnknownModelError
from fragjobs.extraction import CachingSchedule, apply_block_caching, remove_block_caching
from fragjobs.families import (
    block_levels,
    denoiser,
    denoiser_family,
    family_of,
    level_output_blocks,
    supported_pipelines,
)
from fragjobs.generation import GenerationConfig, generate_images, with_unet
from fragjobs.profiling import ProfileConfig, attention_modules, denoiser_blocks, profile_prompt

PROMPT = "a red circle at the top"
GEN = GenerationConfig(steps=6, guidance_scale=4.5, height=64, width=64, batch_size=2)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """tiny-pixart, loaded once for the module (with a data dir of its own)."""
    from fragjobs.config import Settings

    data = tmp_path_factory.mktemp("pixart-data")
    return load_base("tiny-pixart", device="cpu", settings=Settings(data_dir=data)).pipe


def test_the_adapter_names_the_transformer_and_its_blocks(pixart):
    assert isinstance(pixart, PixArtAlphaPipeline)
    family = family_of(pixart)
    assert (family.denoiser, family.residual_cache) == ("transformer", True)
    assert denoiser(pixart) is pixart.transformer
    assert denoiser_family(pixart.transformer) is family
    blocks = list(denoiser_blocks(pixart.transformer))
    assert blocks == [f"transformer_blocks.{i}" for i in range(4)]
    # block i pairs with its mirror N-1-i; the later one of each pair hands the level on
    assert block_levels(blocks) == dict(zip(blocks, [0, 1, 1, 0], strict=True))
    assert level_output_blocks(blocks) == ["transformer_blocks.2", "transformer_blocks.3"]
    five = [f"transformer_blocks.{i}" for i in range(5)]
    assert block_levels(five)["transformer_blocks.2"] == 1  # the odd middle joins the deepest
    with pytest.raises(InvalidInputError, match="0..N-1"):
        block_levels(["transformer_blocks.0", "transformer_blocks.2"])
    with pytest.raises(InvalidInputError, match="supported denoiser"):
        block_levels(["transformer_blocks.0", "down_blocks.0"])
    assert "PixArtAlphaPipeline" in supported_pipelines()


def test_profiling_measures_every_head_of_every_transformer_block(pixart):
    profile = profile_prompt(
        pixart,
        PROMPT,
        ProfileConfig(seeds=(0, 1), steps=6, guidance_scale=4.5, height=64, width=64),
        progress=False,
    )
    modules = attention_modules(pixart.transformer)
    assert set(profile.energy) == set(modules)  # self- and cross-attention of every block
    for name, module in modules.items():
        assert profile.energy[name].shape == (2, module.heads)
        assert torch.isfinite(profile.energy[name]).all()
    cross = [n for n in modules if n.endswith("attn2")]
    assert cross and all(n in profile.prompt_mass for n in cross)
    assert all(profile.head_kind[n] == "cross" for n in cross)
    assert set(profile.block_change) == set(denoiser_blocks(pixart.transformer))
    assert all(c.shape == (2, 5) for c in profile.block_change.values())


def test_residual_caching_skips_blocks_and_comes_off_cleanly(pixart):
    full = generate_images(pixart, PROMPT, [3, 4], GEN)
    transformer = copy.deepcopy(pixart.transformer)
    calls = []
    middle = transformer.transformer_blocks[1]
    middle.attn1.register_forward_pre_hook(lambda *_: calls.append(1))
    every = tuple(range(GEN.steps))
    skip_middle = {
        "transformer_blocks.0": every,
        "transformer_blocks.1": (0, 3),
        "transformer_blocks.2": (0, 3),
        "transformer_blocks.3": every,
    }
    apply_block_caching(transformer, CachingSchedule(GEN.steps, skip_middle, 0.1, 0.6))
    cached = generate_images(with_unet(pixart, transformer), PROMPT, [3, 4], GEN)
    # one batch of two images with CFG: the middle blocks ran on two of the six steps
    assert len(calls) == 2
    assert not torch.equal(cached, full)
    # a skipped block hands on its input plus its last residual: the images stay close
    assert (cached - full).abs().mean() < 0.05
    remove_block_caching(transformer)
    assert torch.equal(generate_images(with_unet(pixart, transformer), PROMPT, [3, 4], GEN), full)


def test_the_pooled_embedding_is_the_mean_of_the_prompts_t5_states(pixart):
    tokens = pixart.tokenizer(
        "a red circle", padding="max_length", max_length=120, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        states = pixart.text_encoder(tokens.input_ids).last_hidden_state[0]
    used = int(tokens.attention_mask.sum())
    expected = states[:used].mean(0)
    got = prompt_embedding(pixart, "a red circle")
    assert torch.allclose(got, expected / expected.norm(), atol=1e-5)


def test_a_module_of_no_supported_family_is_refused():
    with pytest.raises(UnknownModelError, match="PixArtTransformer2DModel"):
        denoiser_family(torch.nn.Linear(2, 2))
