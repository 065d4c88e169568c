"""SDXL base models: the tiny-sdxl built-in, a local SDXL folder, the pooled prompt embedding
of the second text encoder, and pipeline classes fragjobs does not support."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from fragjobs.base_identity import hash_weight_files
from fragjobs.base_models import identify, load_base
from fragjobs.base_text import prompt_embedding
from fragjobs.errors import UnknownModelError
from fragjobs.profiling import attention_modules, denoiser_blocks


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """tiny-sdxl, loaded once for the module (with a data dir of its own)."""
    from fragjobs.config import Settings

    data = tmp_path_factory.mktemp("sdxl-data")
    return load_base("tiny-sdxl", device="cpu", settings=Settings(data_dir=data))


def test_tiny_sdxl_has_the_sdxl_architecture(sdxl):
    pipe = sdxl.pipe
    assert isinstance(pipe, StableDiffusionXLPipeline)
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time"
    # the cross-attention context is both encoders' hidden states side by side
    assert config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert list(denoiser_blocks(pipe.unet)) == [
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    ]
    names = list(attention_modules(pipe.unet))
    assert not any(n.startswith("down_blocks.0.") for n in names)  # SDXL's first level
    assert "mid_block.attentions.0.transformer_blocks.1.attn2" in names  # several layers
    assert sdxl.info.source == "builtin:tiny-sdxl" and (sdxl.info.height, sdxl.info.width) == (
        64,
        64,
    )


def test_tiny_sdxl_is_deterministic_and_identified(sdxl, settings):
    again = load_base("tiny-sdxl", settings=settings)
    assert again.info.sha256 == sdxl.info.sha256
    for component in ("unet", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(sdxl.pipe, component), getattr(again.pipe, component)
        for (name, p), (_, q) in zip(
            ours.state_dict().items(), theirs.state_dict().items(), strict=True
        ):
            assert torch.equal(p, q), f"{component}.{name}"
    assert identify(again.pipe) == again.info
    tiny_sd = load_base("tiny-sd", settings=settings).info.sha256
    assert tiny_sd != sdxl.info.sha256


def test_the_prompt_embedding_is_the_second_encoders_pooled_projection(sdxl):
    pipe = sdxl.pipe
    ids = pipe.tokenizer_2(
        "a red circle", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = pipe.text_encoder_2(ids).text_embeds[0]
    got = prompt_embedding(pipe, "a red circle")
    assert got.shape == (pipe.text_encoder_2.config.projection_dim,)
    assert torch.allclose(got, expected / expected.norm(), atol=1e-6)
    assert float(got @ prompt_embedding(pipe, "zzzz qqqq")) < 0.9999


def test_a_saved_sdxl_folder_loads_and_generates_the_same_images(sdxl, settings, tmp_path):
    folder = tmp_path / "my-sdxl"
    sdxl.pipe.save_pretrained(folder)
    loaded = load_base(str(folder), settings=settings)
    assert isinstance(loaded.pipe, StableDiffusionXLPipeline)
    assert loaded.info.source == f"folder:{folder.resolve()}"
    assert loaded.info.sha256 == hash_weight_files(folder.resolve(), "my-sdxl")
    assert (loaded.info.height, loaded.info.width) == (64, 64)

    def image(pipe):
        return pipe(
            "a red circle",
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    assert torch.equal(image(sdxl.pipe), image(loaded.pipe))
    weights = folder / "text_encoder_2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the second text encoder is part of the base's identity
    weights.write_bytes(bytes(data))
    assert hash_weight_files(folder.resolve(), "my-sdxl") != loaded.info.sha256


@pytest.mark.parametrize("class_name", ["StableDiffusion3Pipeline", "FluxPipeline", None])
def test_an_unsupported_pipeline_is_refused_before_its_weights_are_read(
    settings, tmp_path, class_name
):
    folder = tmp_path / "other"
    folder.mkdir()
    index = {"_diffusers_version": "0.30.0", "transformer": ["diffusers", "X"]}
    if class_name:
        index["_class_name"] = class_name
    (folder / "model_index.json").write_text(json.dumps(index))  # no weights at all
    with pytest.raises(UnknownModelError) as info:
        load_base(str(folder), settings=settings)
    message = str(info.value)
    assert "\n" not in message
    assert "does not support" in message and (class_name or "unknown class") in message
    assert "StableDiffusionPipeline" in message and "StableDiffusionXLPipeline" in message


def test_new_builtins_are_listed_where_the_others_are(settings):
    with pytest.raises(UnknownModelError) as info:
        load_base("no-such-model", settings=settings)
    for name in ("tiny-sdxl", "sdxl-shape"):
        assert name in str(info.value)
