"""Profiling and block caching on SDXL's UNet: every head of every transformer layer, both
encoders' context in the cross-attention, three levels and a mid block with attention."""

from __future__ import annotations

import pytest
import torch

from fragjobs.extraction.caching import block_levels
from fragjobs.profiling import ProfileConfig, attention_modules, denoiser_blocks, profile_prompt


@pytest.fixture(scope="module")
def sdxl_pipe():
    from fragjobs.builtin.sdxl import build_tiny_sdxl

    pipe = build_tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def prof(sdxl_pipe):
    config = ProfileConfig(seeds=(0, 1), steps=3, step_stride=1)
    return profile_prompt(sdxl_pipe, "a dog on a jet ski", config, progress=False)


def test_every_head_of_every_transformer_layer_is_measured(sdxl_pipe, prof):
    modules = attention_modules(sdxl_pipe.unet)
    assert set(prof.energy) == set(modules)
    layers = {n.rsplit(".", 1)[0] for n in modules if ".transformer_blocks.1." in n}
    assert layers  # SDXL blocks hold several transformer layers; the second ones count too
    context = sdxl_pipe.unet.config.cross_attention_dim
    for name, attn in modules.items():
        assert prof.energy[name].shape == (2, attn.heads)
        assert bool((prof.energy[name] > 0).all())
        if attn.is_cross_attention:  # keys read both text encoders' hidden states
            assert attn.to_k.in_features == context
            mass = prof.prompt_mass[name]
            assert bool(((mass > 0) & (mass < 1)).all())
    assert prof.importance_document()["num_heads"] == sum(m.heads for m in modules.values())


def test_block_changes_cover_three_levels_and_the_mid_block(sdxl_pipe, prof):
    blocks = denoiser_blocks(sdxl_pipe.unet)
    assert set(prof.block_change) == set(blocks) == set(prof.layer_time_ms)
    for change in prof.block_change.values():
        assert change.shape == (2, 2) and bool(torch.isfinite(change).all())
    levels = block_levels(blocks)
    assert levels == {
        "down_blocks.0": 0,
        "up_blocks.2": 0,
        "down_blocks.1": 1,
        "up_blocks.1": 1,
        "down_blocks.2": 2,
        "up_blocks.0": 2,
        "mid_block": 2,
    }


def test_the_profile_leaves_the_pipeline_as_it_was(sdxl_pipe, prof):
    processors = sdxl_pipe.unet.attn_processors
    assert not any(type(p).__name__ == "ProfilingAttnProcessor" for p in processors.values())
    assert prof.final_latents is not None and prof.final_latents.shape == (2, 4, 32, 32)
