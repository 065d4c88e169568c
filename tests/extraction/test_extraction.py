"""Head pruning, low-rank and int8 are exact where they must be and bounded where not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fragjobs.errors import InvalidInputError, IrreversibleChangeError
from fragjobs.extraction import (
    HeadPruningConfig,
    HeadSelectionConfig,
    Int8Config,
    apply_head_pruning_,
    apply_int8_,
    factorise,
    plan_int8,
    remove_head_pruning,
    select_heads,
)
from fragjobs.extraction.int8 import quantize_weight
from fragjobs.families import denoiser
from fragjobs.generation import GenerationConfig, generate_images, with_unet
from fragjobs.profiling import attention_modules

GEN = GenerationConfig(steps=4, guidance_scale=7.5, height=64, width=64, batch_size=2)


@pytest.fixture(scope="module", params=["tiny-sd", "tiny-sdxl", "tiny-pixart"])
def any_tiny_pipe(request, tiny_pipe):
    """Each family's tiny pipeline: tiny-sd, tiny-sdxl (added text/time conditioning, several
    transformer layers per block), tiny-pixart (a diffusion transformer)."""
    if request.param == "tiny-sd":
        return tiny_pipe
    from fragjobs.builtin import BUILTINS

    pipe = BUILTINS[request.param].build()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_out(unet, seed=0):
    """One denoiser call (a UNet's or a PixArt transformer's) on random inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 32, 32, generator=g)
    if "caption_channels" in unet.config:  # PixArt: T5 states, no added conditioning
        ctx = torch.randn(2, 120, unet.config.caption_channels, generator=g)
        added = {"resolution": None, "aspect_ratio": None}
        with torch.no_grad():
            out = unet(
                x,
                encoder_hidden_states=ctx,
                timestep=torch.tensor([500] * 2),
                added_cond_kwargs=added,
            )
        return out.sample
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop ids
        pooled = unet.config.projection_class_embeddings_input_dim
        pooled -= 6 * unet.config.addition_time_embed_dim
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
        added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": time_ids}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), ctx, added_cond_kwargs=added).sample


def _all_heads(unet) -> HeadPruningConfig:
    return HeadPruningConfig(
        keep={n: tuple(range(m.heads)) for n, m in attention_modules(unet).items()}
    )


def test_keeping_every_head_reproduces_the_base_images_exactly(any_tiny_pipe):
    unet = copy.deepcopy(denoiser(any_tiny_pipe))
    apply_head_pruning_(unet, _all_heads(unet))
    full = generate_images(any_tiny_pipe, "a dog on a jet ski", [3, 4], GEN)
    pruned = generate_images(with_unet(any_tiny_pipe, unet), "a dog on a jet ski", [3, 4], GEN)
    assert torch.equal(full, pruned)


def test_removing_a_zeroed_head_changes_nothing(any_tiny_pipe):
    unet = copy.deepcopy(denoiser(any_tiny_pipe))
    modules = attention_modules(unet)
    name = sorted(modules)[1]
    attn = modules[name]
    head_dim = attn.to_q.out_features // attn.heads
    with torch.no_grad():  # head 2 contributes nothing: its to_out columns are zero
        attn.to_out[0].weight[:, 2 * head_dim : 3 * head_dim] = 0
    before = _unet_out(unet)
    keep = {name: tuple(h for h in range(attn.heads) if h != 2)}
    report = apply_head_pruning_(unet, HeadPruningConfig(keep=keep))
    after = _unet_out(unet)
    assert (before - after).abs().max().item() <= 1e-5
    assert modules[name].heads == 3
    assert report["params_after"] < report["params_before"]
    assert report["heads_after"] == report["heads_before"] - 1


def test_pruning_really_removes_parameters_and_changes_output(any_tiny_pipe):
    unet = copy.deepcopy(denoiser(any_tiny_pipe))
    before_params = sum(p.numel() for p in unet.parameters())
    keep = {n: (0,) for n in attention_modules(unet)}
    apply_head_pruning_(unet, HeadPruningConfig(keep=keep))
    assert sum(p.numel() for p in unet.parameters()) < before_params
    for attn in attention_modules(unet).values():
        assert attn.heads == 1
        assert attn.to_q.out_features == attn.to_out[0].in_features == attn.inner_dim
    assert not torch.allclose(_unet_out(unet), _unet_out(denoiser(any_tiny_pipe)))
    with pytest.raises(IrreversibleChangeError, match="reload the base"):
        remove_head_pruning(unet)


def test_bad_pruning_configs_are_rejected(tiny_pipe):
    unet = copy.deepcopy(tiny_pipe.unet)
    with pytest.raises(InvalidInputError, match="unknown attention modules"):
        apply_head_pruning_(unet, HeadPruningConfig(keep={"nope": (0,)}))
    name = sorted(attention_modules(unet))[0]
    with pytest.raises(InvalidInputError, match="out of range"):
        apply_head_pruning_(unet, HeadPruningConfig(keep={name: (0, 9)}))
    with pytest.raises(InvalidInputError, match="at least one head"):
        HeadPruningConfig(keep={name: ()})
    for bad in (0.0, -0.1, 1.5, "0.5"):
        with pytest.raises(InvalidInputError):
            HeadSelectionConfig(threshold=bad)


def test_select_heads_threshold_min_per_layer_and_unstable_ranks():
    scores = {"a": torch.tensor([4.0, 3.0, 0.1, 0.2]), "b": torch.tensor([0.3, 0.1, 0.2, 0.4])}
    stable = {k: torch.zeros(4) for k in scores}
    all_kept = select_heads(scores, stable, HeadSelectionConfig(threshold=1.0))
    assert all_kept.keep == {"a": (0, 1, 2, 3), "b": (0, 1, 2, 3)}
    half = select_heads(scores, stable, HeadSelectionConfig(threshold=0.25, min_heads_per_layer=1))
    assert half.keep["a"] == (0, 1)
    assert half.keep["b"] == (3,)  # below the cut, kept as the layer's best head
    assert half.reasons["b"]["min_per_layer"] == [3]
    unstable = {"a": torch.zeros(4), "b": torch.tensor([0.0, 0.5, 0.0, 0.0])}
    safe = select_heads(scores, unstable, HeadSelectionConfig(threshold=0.25, rank_margin=0.25))
    assert safe.keep["b"] == (1, 3)
    assert safe.reasons["b"]["unstable_rank"] == [1]


def test_full_rank_svd_reproduces_the_layer():
    torch.manual_seed(0)
    layer = nn.Linear(48, 32)
    x = torch.randn(5, 48)
    exact = factorise(layer, 32)
    assert torch.allclose(exact(x), layer(x), atol=1e-5)
    smaller = factorise(layer, 8)
    assert smaller.rank == 8
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in layer.parameters())


def test_int8_error_is_within_its_stated_bound():
    torch.manual_seed(0)
    weight = torch.randn(16, 64) * torch.linspace(0.01, 3, 16)[:, None]
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8
    error = (q.float() * scale[:, None] - weight).abs()
    bound = weight.abs().amax(dim=1, keepdim=True) / 254
    assert bool((error <= bound + 1e-7).all())


def test_int8_unet_holds_fewer_bytes_and_stays_close(any_tiny_pipe):
    unet = copy.deepcopy(denoiser(any_tiny_pipe))
    plan = plan_int8(unet, Int8Config())
    first = next(n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d | nn.Linear))
    assert plan[first] == "float"  # the input layer (conv_in, PixArt's patch embedding)
    quantized = {
        n: quantize_weight(unet.get_submodule(n).weight) for n, k in plan.items() if k == "int8"
    }
    assert quantized
    from fragjobs.extraction import weight_bytes

    before = weight_bytes(unet)
    float_bytes = sum(unet.get_submodule(n).weight.numel() * 4 for n in quantized)
    apply_int8_(unet, quantized)
    # each quantised weight now takes a byte per value (plus a float scale per row)
    assert before - weight_bytes(unet) > 0.7 * float_bytes
    full, q = _unet_out(denoiser(any_tiny_pipe)), _unet_out(unet)
    assert (full - q).abs().max() / full.abs().max() < 0.05


def test_head_guard_keeps_more_heads_until_the_profiling_seeds_keep_their_ssim(tiny_pipe):
    from fragjobs.base_identity import BaseModelInfo
    from fragjobs.extraction import ExtractionConfig, extract_fragment
    from fragjobs.profiling import ProfileConfig, profile_prompt

    prof = profile_prompt(
        tiny_pipe, "a dog on a jet ski", ProfileConfig(seeds=(0, 1), steps=4), progress=False
    )
    info = BaseModelInfo("tiny-sd", "0" * 64, "builtin", 64, 64, 4)

    def extract(min_ssim):
        heads = HeadSelectionConfig(threshold=0.5, min_ssim=min_ssim)
        config = ExtractionConfig(heads=heads, low_rank=None, int8=None, caching=None)
        return extract_fragment(tiny_pipe, info, prof, config, profile_id="p")[0].manifest

    strict = extract(1.0)  # any pruning changes some pixel: every trial fails, all heads kept
    assert strict.pruning.heads_kept == strict.pruning.heads_total
    assert strict.pruning.threshold == 1.0 and strict.pruning.requested_threshold == 0.5
    assert strict.pruning.search and all(r["ssim_min"] < 1.0 for r in strict.pruning.search)
    loose = extract(0.01)  # the requested fraction passes at once
    assert loose.pruning.threshold == 0.5 and loose.pruning.heads_kept < loose.pruning.heads_total
    assert all(r["ssim_min"] >= 0.01 for r in loose.pruning.search)


# -- each technique owns its config, its removal and its tensor format ----------------------


def _tiny_linear_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 80), nn.GELU(), nn.Linear(80, 72, bias=False))


def test_low_rank_and_int8_configs_reject_bad_values_with_what_to_do():
    from fragjobs.extraction import LowRankConfig

    for bad in ({"energy": 0.0}, {"energy": 1.5}, {"max_cost": -0.1}, {"min_features": 0}):
        with pytest.raises(InvalidInputError):
            LowRankConfig(**bad)
    with pytest.raises(InvalidInputError, match="low_rank=None"):
        LowRankConfig(patterns=())
    with pytest.raises(InvalidInputError, match="tuple of patterns"):
        LowRankConfig(patterns="*.ff.net.2")  # a bare string is not a tuple of patterns
    with pytest.raises(InvalidInputError, match="min_params"):
        Int8Config(min_params=0)
    with pytest.raises(InvalidInputError, match="int8=None"):
        Int8Config(patterns=())
    with pytest.raises(InvalidInputError, match="non-empty strings"):
        Int8Config(exclude=("conv_in", 3))


def test_removing_low_rank_or_int8_refuses_and_says_to_reload_the_base():
    from fragjobs.extraction import apply_low_rank_, remove_int8, remove_low_rank

    model = _tiny_linear_stack()
    remove_low_rank(model)  # nothing applied yet: nothing to refuse
    remove_int8(model)
    apply_low_rank_(model, {"0": 8})
    with pytest.raises(IrreversibleChangeError, match="reload the base"):
        remove_low_rank(model)
    remove_int8(model)  # int8 was not applied
    apply_int8_(model, {"2": quantize_weight(model[2].weight)})
    with pytest.raises(IrreversibleChangeError, match="int8 .* cannot be undone"):
        remove_int8(model)
    with pytest.raises(IrreversibleChangeError, match="low-rank"):
        remove_low_rank(model)


def test_head_pruning_tensors_round_trip(tiny_pipe):
    from fragjobs.extraction import head_pruning_tensors, load_head_pruning

    names = sorted(attention_modules(tiny_pipe.unet))
    plan = HeadPruningConfig(keep={names[0]: (0, 2), names[1]: (1,)})
    tensors = head_pruning_tensors(plan)
    assert set(tensors) == {f"pruning.{names[0]}.keep", f"pruning.{names[1]}.keep"}
    assert all(t.dtype == torch.int64 for t in tensors.values())
    other = {"int8.x.weight": torch.zeros(1, dtype=torch.int8)}  # another technique's tensor
    assert load_head_pruning({**tensors, **other}).keep == plan.keep
    pruned, replayed = copy.deepcopy(tiny_pipe.unet), copy.deepcopy(tiny_pipe.unet)
    apply_head_pruning_(pruned, plan)
    apply_head_pruning_(replayed, load_head_pruning(tensors))
    assert torch.equal(_unet_out(pruned), _unet_out(replayed))


def test_low_rank_tensors_round_trip_reproduces_the_factorised_model():
    from fragjobs.extraction import (
        LowRankConfig,
        apply_low_rank_,
        install_low_rank_,
        load_low_rank_tensors,
        low_rank_tensors,
        plan_low_rank,
    )

    model, base = _tiny_linear_stack(), _tiny_linear_stack()
    plan = plan_low_rank(model, LowRankConfig(energy=0.5, patterns=("*",), min_features=8))
    assert set(plan) == {"0", "2"} and all(1 <= p["rank"] < 72 for p in plan.values())
    tensors = low_rank_tensors(apply_low_rank_(model, {n: int(p["rank"]) for n, p in plan.items()}))
    assert set(tensors) == {"low_rank.0.down", "low_rank.0.up", "low_rank.0.bias"} | {
        "low_rank.2.down",
        "low_rank.2.up",
    }  # layer 2 has no bias
    install_low_rank_(base, load_low_rank_tensors(tensors, plan))
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(base(x), model(x))
    assert base[0].rank == plan["0"]["rank"]


def test_int8_tensors_round_trip_reproduces_the_quantised_model():
    from fragjobs.extraction import int8_tensors, load_int8_tensors, quantize_layers

    model, base = _tiny_linear_stack(), _tiny_linear_stack()
    precision = plan_int8(model, Int8Config(min_params=6000))
    assert precision == {"0": "int8", "2": "float"}  # layer 2 holds 5760 weights
    quantized = quantize_layers(model, precision)
    apply_int8_(model, quantized)
    tensors = int8_tensors(quantized)
    assert set(tensors) == {"int8.0.weight", "int8.0.scale"}
    assert tensors["int8.0.weight"].dtype == torch.int8
    apply_int8_(base, load_int8_tensors(tensors, precision))
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(base(x), model(x))
    assert isinstance(base[2], nn.Linear)  # float layers are left alone


def test_generation_does_not_import_extraction():
    import subprocess
    import sys

    code = "import sys, fragjobs.generation; print('fragjobs.extraction' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
