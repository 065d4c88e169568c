"""Profiling records per-head, per-block and per-layer statistics without changing outputs."""

from __future__ import annotations

import pytest
import torch

from fragjobs.errors import InvalidInputError
from fragjobs.generation import GenerationConfig, decode_latents, generate_images
from fragjobs.profiling import (
    ProfileConfig,
    ProfilingAttnProcessor,
    PromptProfile,
    RecordingState,
    attention_modules,
    denoiser_blocks,
    profile_prompt,
)


@pytest.fixture(scope="module")
def prof(tiny_pipe):
    return profile_prompt(tiny_pipe, "a dog on a jet ski", ProfileConfig(steps=4), progress=False)


def test_every_head_of_every_attention_module_is_measured(tiny_pipe, prof):
    modules = attention_modules(tiny_pipe.unet)
    assert set(prof.energy) == set(modules)
    for name, attn in modules.items():
        assert prof.energy[name].shape == (4, attn.heads)
        assert bool((prof.energy[name] > 0).all())
        cross = attn.is_cross_attention
        assert prof.head_kind[name] == ("cross" if cross else "self")
        assert (name in prof.entropy) == cross and (name in prof.prompt_mass) == cross
    for name in prof.prompt_mass:
        mass = prof.prompt_mass[name]
        assert bool(((mass > 0) & (mass < 1)).all())  # word tokens only: not BOS, not padding
        assert float(prof.entropy[name].max()) <= torch.log(torch.tensor(77.0)).item() + 1e-4


def test_block_changes_timings_and_rank_stability(tiny_pipe, prof):
    assert set(prof.block_change) == set(denoiser_blocks(tiny_pipe.unet))
    for change in prof.block_change.values():
        assert change.shape == (4, 3)  # seeds × (steps - 1)
    assert set(prof.layer_time_ms) == set(denoiser_blocks(tiny_pipe.unet))
    stability = prof.rank_stability()
    assert -1.0 <= stability <= 1.0
    single = profile_prompt(tiny_pipe, "a cat", ProfileConfig(seeds=(5,), steps=2), progress=False)
    assert single.rank_stability() is None
    assert single.importance_document()["rank_stability"]["reason"]


def test_recording_processor_computes_the_same_output(tiny_pipe):
    unet = tiny_pipe.unet
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        reference = unet(x, torch.tensor([300]), ctx).sample
        original = unet.attn_processors
        state = RecordingState(recording=True)
        unet.set_attn_processor(
            {f"{n}.processor": ProfilingAttnProcessor(n, state) for n in attention_modules(unet)}
        )
        try:
            recorded = unet(x, torch.tensor([300]), ctx).sample
        finally:
            unet.set_attn_processor(original)
    assert torch.allclose(reference, recorded, atol=1e-4)
    assert len(state.modules) == len(attention_modules(unet))


def test_profiling_leaves_the_pipeline_as_it_was(tiny_pipe, prof):
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipe.unet.attn_processors.values())
    assert not tiny_pipe.unet._forward_pre_hooks


def test_save_and_load_round_trip(prof, tmp_path):
    stats, doc = prof.save(tmp_path)
    again = PromptProfile.load(stats)
    assert again.prompt == prof.prompt and again.config == prof.config
    for name, energy in prof.energy.items():
        assert torch.equal(energy, again.energy[name])
    assert doc.read_text().startswith("{")
    assert again.importance_document()["modules"] == prof.importance_document()["modules"]
    assert again.layer_time_ms == prof.layer_time_ms and again.elapsed_s == prof.elapsed_s
    assert torch.equal(again.final_latents, prof.final_latents)


def test_final_latents_decode_to_the_full_models_images(tiny_pipe, prof):
    config = prof.config
    gen = GenerationConfig(
        steps=config.steps,
        guidance_scale=config.guidance_scale,
        height=64,
        width=64,
        batch_size=len(config.seeds),
    )
    images = generate_images(tiny_pipe, prof.prompt, list(config.seeds), gen)
    decoded = decode_latents(tiny_pipe, prof.final_latents)
    assert decoded.shape == images.shape
    assert float((decoded - images).abs().max()) < 1e-3  # profiling processors: same output


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seeds": ()},
        {"seeds": (1, 1)},
        {"steps": 0},
        {"step_stride": 0},
        {"seeds": (-1,)},
        {"guidance_scale": -1},
    ],
)
def test_bad_profile_configs_are_refused(kwargs):
    with pytest.raises(InvalidInputError):
        ProfileConfig(**kwargs)
