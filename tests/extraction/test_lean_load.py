"""A fragment's UNet built without the base UNet's weights: same UNet, same images, same
checks as the edits replayed on a copy of the base (fragjobs.extraction.lean_load)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fragjobs.base_models import load_base
from fragjobs.config import Settings
from fragjobs.errors import BaseModelMismatchError, FragmentIntegrityError
from fragjobs.extraction import (
    ExtractionConfig,
    HeadSelectionConfig,
    apply_fragment_to_unet_,
    extract_fragment,
    load_fragment_folder,
    save_fragment,
)
from fragjobs.extraction.caching import BlockCachingConfig
from fragjobs.extraction.int8_exec import int8_execution
from fragjobs.extraction.lean_load import (
    UnetPlacement,
    build_fragment_unet,
    empty_unet_like,
    load_fragment_pipeline,
    module_reader,
)
from fragjobs.extraction.lowrank import LowRankConfig
from fragjobs.families import denoiser, family_of
from fragjobs.generation.generate import GenerationConfig, generate_images
from fragjobs.profiling import ProfileConfig, profile_prompt

PROMPT = "a red circle on the left"
# every technique: pruned heads, low-rank factors, int8 layers, a caching schedule
EVERYTHING = ExtractionConfig(
    heads=HeadSelectionConfig(threshold=0.6),
    low_rank=LowRankConfig(energy=0.5, max_cost=0.99, min_features=16),
    caching=BlockCachingConfig(deltas=(0.25,), shallow_deltas=(None,), max_trials=1),
)


def _saved_fragment(model: str, data_dir: Path, folder: Path):
    settings = Settings(data_dir=data_dir)
    loaded = load_base(model, device="cpu", settings=settings)
    prof = profile_prompt(loaded.pipe, PROMPT, ProfileConfig(seeds=(0,), steps=4), progress=False)
    fragment, _ = extract_fragment(loaded.pipe, loaded.info, prof, EVERYTHING, profile_id="p")
    save_fragment(fragment, folder)
    return loaded, settings


@pytest.fixture(scope="module", params=["tiny-sd", "shapes", "tiny-pixart"])
def base_and_fragment(request, tmp_path_factory):
    """A base (loaded in full) and a saved fragment of it using every technique."""
    root = tmp_path_factory.mktemp(request.param)
    loaded, settings = _saved_fragment(request.param, root / "data", root / "fragment")
    return request.param, loaded, settings, root / "fragment"


def _images(pipe, unet, steps=4) -> torch.Tensor:
    component = family_of(pipe).denoiser
    saved = getattr(pipe, component)
    setattr(pipe, component, unet)
    try:
        side = 64
        gen = GenerationConfig(
            steps=steps, guidance_scale=6.0, height=side, width=side, batch_size=1
        )
        return generate_images(pipe, PROMPT, [3], gen)
    finally:
        setattr(pipe, component, saved)


def _input_layer(module) -> str:
    return next(n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d))


def _replayed(loaded, fragment):
    unet = copy.deepcopy(denoiser(loaded.pipe))
    apply_fragment_to_unet_(unet, fragment, loaded.info)
    return unet


def test_lean_pipeline_has_the_replayed_unet_and_images(base_and_fragment):
    model, loaded, settings, folder = base_and_fragment
    fragment = load_fragment_folder(folder)
    assert fragment.manifest.compression.int8 and fragment.manifest.compression.low_rank.layers
    assert fragment.manifest.pruning.heads_kept < fragment.manifest.pruning.heads_total
    replayed = _replayed(loaded, fragment)
    lean = load_fragment_pipeline(
        model, fragment, device="cpu", settings=settings, int8_execution="dequantize"
    )
    assert int8_execution(denoiser(lean.pipe)) == "dequantize"

    expected, actual = replayed.state_dict(), denoiser(lean.pipe).state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert all(not t.is_meta for t in actual.values())
    int8 = [k for k in actual if k.endswith(".weight_int8")]
    assert int8 and all(actual[k].dtype == torch.int8 for k in int8)
    assert lean.info == loaded.info
    for name in ("vae", "text_encoder"):  # the other components are the base's
        base_sd = getattr(loaded.pipe, name).state_dict()
        lean_sd = getattr(lean.pipe, name).state_dict()
        assert all(torch.equal(base_sd[k], lean_sd[k]) for k in base_sd)
    assert torch.equal(_images(loaded.pipe, replayed), _images(lean.pipe, denoiser(lean.pipe)))


def test_unet_built_on_a_loaded_base_shares_its_unchanged_tensors(base_and_fragment):
    _, loaded, _, folder = base_and_fragment
    fragment = load_fragment_folder(folder)
    base = denoiser(loaded.pipe)
    unet = build_fragment_unet(empty_unet_like(base), fragment, module_reader(base))
    first = _input_layer(base)  # conv_in, PixArt's patch embedding: kept in float
    ours, theirs = unet.get_submodule(first).weight, base.get_submodule(first).weight
    assert ours.data_ptr() == theirs.data_ptr()  # not copied
    assert ours is not theirs  # own Parameter objects
    assert torch.equal(
        _images(loaded.pipe, _replayed(loaded, fragment)), _images(loaded.pipe, unet)
    )


def test_default_load_dequantises_once_on_cpu_with_the_same_images(base_and_fragment):
    model, loaded, settings, folder = base_and_fragment
    fragment = load_fragment_folder(folder)
    lean = load_fragment_pipeline(model, fragment, device="cpu", settings=settings)
    unet = denoiser(lean.pipe)
    # no int8 matmul is faster than float on CPU: int8 layers hold float weights
    assert int8_execution(unet) == "float"
    assert not [k for k in unet.state_dict() if k.endswith(".weight_int8")]
    precision = fragment.manifest.compression.int8.precision_map
    int8_layer = next(name for name, kind in precision.items() if kind == "int8")
    assert unet.get_submodule(int8_layer).weight.dtype == torch.float32
    # the dequantised values are those the per-call path computes: bit-identical images
    assert torch.equal(_images(loaded.pipe, _replayed(loaded, fragment)), _images(lean.pipe, unet))


def test_wrong_base_and_corrupt_file_are_refused(base_and_fragment, tmp_path):
    model, loaded, settings, folder = base_and_fragment
    other = "shapes" if model == "tiny-sd" else "tiny-sd"
    load_base(other, device="cpu", settings=settings)  # its id cached, as a worker's would be
    fragment = load_fragment_folder(folder)
    with pytest.raises(BaseModelMismatchError, match="was made from"):
        load_fragment_pipeline(other, fragment, device="cpu", settings=settings)

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in folder.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    data = bytearray((broken / "fragment.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "fragment.safetensors").write_bytes(bytes(data))
    with pytest.raises(FragmentIntegrityError, match="does not match its manifest"):
        load_fragment_folder(broken)


def test_group_offloading_from_diffusers_keeps_the_images(base_and_fragment):
    model, loaded, settings, folder = base_and_fragment
    if model != "tiny-sd":
        pytest.skip("one model is enough for the placement hooks")
    fragment = load_fragment_folder(folder)
    offloaded = load_fragment_pipeline(
        model,
        fragment,
        device="cpu",
        settings=settings,
        placement=UnetPlacement(group_offload="block_level"),
    )
    from diffusers.hooks import HookRegistry

    assert HookRegistry.check_if_exists_or_initialize(denoiser(offloaded.pipe).down_blocks[0]).hooks
    expected = _images(loaded.pipe, _replayed(loaded, fragment))
    assert torch.equal(expected, _images(offloaded.pipe, denoiser(offloaded.pipe)))


def test_layerwise_casting_stores_float_weights_in_the_storage_dtype(base_and_fragment):
    model, loaded, settings, folder = base_and_fragment
    if model != "tiny-sd":
        pytest.skip("one model is enough for the placement hooks")
    fragment = load_fragment_folder(folder)
    cast = load_fragment_pipeline(
        model,
        fragment,
        device="cpu",
        settings=settings,
        placement=UnetPlacement(storage_dtype=torch.bfloat16),
        int8_execution="dequantize",
    )
    assert denoiser(cast.pipe).conv_in.weight.dtype == torch.bfloat16
    int8 = [t for k, t in denoiser(cast.pipe).state_dict().items() if k.endswith(".weight_int8")]
    assert int8 and all(t.dtype == torch.int8 for t in int8)
    images = _images(cast.pipe, denoiser(cast.pipe))
    assert images.isfinite().all() and images.shape == (1, 3, 64, 64)


def test_placement_rejects_unknown_offload_types():
    from fragjobs.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="group_offload must be one of"):
        UnetPlacement(group_offload="everything")


def test_a_builtins_uncached_id_is_computed_by_a_process_of_its_own(base_and_fragment, tmp_path):
    model, loaded, _, folder = base_and_fragment
    if model != "tiny-sd":
        pytest.skip("only a seeded built-in is hashed from its weights")
    cold = Settings(data_dir=tmp_path / "cold")  # no hash cached: a child process builds it
    lean = load_fragment_pipeline(model, load_fragment_folder(folder), device="cpu", settings=cold)
    assert lean.info == loaded.info
    assert loaded.info.sha256 in (tmp_path / "cold" / "base_hashes.json").read_text()
