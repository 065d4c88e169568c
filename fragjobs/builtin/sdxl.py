"""The SDXL-architecture built-ins, assembled as ``StableDiffusionXLPipeline``.

What makes them SDXL: two CLIP text encoders whose penultimate hidden states are
concatenated into the cross-attention context, the second one with a projection whose pooled
output (``text_embeds``) joins the size/crop ``time_ids`` as the UNet's added conditioning
(``addition_embed_type="text_time"``), and a UNet of three levels (the first without
attention) with several transformer layers per attention block, mid block included.

``tiny-sdxl``
    That architecture at toy size for tests (64×64 images, 32×32×4 latents, 1 + 2 + 2
    transformer layers, four heads per attention module); fast on a CPU, images noise-like.
``sdxl-shape``
    SDXL 1.0's UNet (2.6 B parameters: 320/640/1280 channels, 1/2/10 transformer layers,
    2048-d context) and text encoders (CLIP ViT-L and OpenCLIP bigG shapes; byte-level
    vocabulary) with random weights, for timing only. The VAE is a small stand-in with the
    right interface (4-channel latents, 8× down-sampling), as for ``sd15-shape``: fragjobs
    edits only the UNet.
"""

from __future__ import annotations

from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from fragjobs.builtin.seeded import scheduler, seeded, stand_in_vae, text_encoder, tiny_vae
from fragjobs.builtin.tokenizer import build_byte_tokenizer

TIME_IDS = 6
"""SDXL's added time conditioning: original size, crop offset and target size (2 each)."""


def sdxl_unet(
    *,
    sample_size: int,
    channels: tuple[int, int, int],
    heads: tuple[int, int, int],
    transformer_layers: tuple[int, int, int],
    layers_per_block: int,
    context_dim: int,
    pooled_dim: int,
    time_embed_dim: int,
    norm_groups: int = 32,
) -> UNet2DConditionModel:
    """An SDXL-architecture UNet (random weights; seed it with :func:`seeded`).

    Args:
        heads: attention heads per level (diffusers' ``attention_head_dim``).
        context_dim: both text encoders' hidden sizes together (the cross-attention width).
        pooled_dim: the second encoder's projection width (the added ``text_embeds``).
        time_embed_dim: width of each of the ``TIME_IDS`` added time embeddings.
    """
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=transformer_layers,
        attention_head_dim=heads,
        cross_attention_dim=context_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + TIME_IDS * time_embed_dim,
        norm_num_groups=norm_groups,
    )


def assemble_sdxl(unet, vae, text_encoder_1, text_encoder_2) -> StableDiffusionXLPipeline:
    """An SDXL pipeline of these components, the byte-level tokenizer for both encoders."""
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder_1,
        text_encoder_2=text_encoder_2,
        tokenizer=build_byte_tokenizer(),
        tokenizer_2=build_byte_tokenizer(),
        unet=unet,
        scheduler=scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """The ``tiny-sdxl`` pipeline (about 1.5 M parameters)."""
    unet = seeded(
        21,
        lambda: sdxl_unet(
            sample_size=32,
            channels=(32, 64, 64),
            heads=(2, 4, 4),
            transformer_layers=(1, 2, 2),
            layers_per_block=1,
            context_dim=32 + 64,
            pooled_dim=32,
            time_embed_dim=8,
            norm_groups=8,
        ),
    )
    vae = tiny_vae(22)
    first = text_encoder(32, 2, 4, seed=23)
    second = text_encoder(64, 2, 4, seed=24, projection_dim=32, with_projection=True)
    return assemble_sdxl(unet, vae, first, second)


def build_sdxl_shape() -> StableDiffusionXLPipeline:
    """The ``sdxl-shape`` pipeline: SDXL 1.0's UNet and text-encoder shapes, small VAE."""
    unet = seeded(
        31,
        lambda: sdxl_unet(
            sample_size=128,
            channels=(320, 640, 1280),
            heads=(5, 10, 20),
            transformer_layers=(1, 2, 10),
            layers_per_block=2,
            context_dim=768 + 1280,
            pooled_dim=1280,
            time_embed_dim=256,
        ),
    )
    vae = stand_in_vae(32, 1024)
    first = text_encoder(768, 12, 12, seed=33)
    second = text_encoder(1280, 32, 20, seed=34, projection_dim=1280, with_projection=True)
    return assemble_sdxl(unet, vae, first, second)
