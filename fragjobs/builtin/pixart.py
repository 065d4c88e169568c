"""The PixArt-α built-ins, assembled as ``PixArtAlphaPipeline`` (a diffusion transformer).

What makes them PixArt-α: a ``PixArtTransformer2DModel`` denoiser (2×2 patches, a stack of
transformer blocks with self-attention, cross-attention to T5 text states and a feed-forward,
all modulated by the timestep through adaLN-single; learned variance, so 8 output channels)
and a T5 encoder whose 120 token states are the cross-attention context.

``tiny-pixart``
    That architecture at toy size for tests (64×64 images, 32×32×4 latents, 256 tokens, four
    blocks of four heads, 32-d); fast on a CPU, images noise-like.
``pixart-shape``
    PixArt-α XL/2 at 512 px (28 blocks, 16 heads of 72, 1152-d, 4096-d caption input: 0.6 B
    parameters) with random weights, for timing only. The T5 encoder is a one-layer stand-in
    with T5-XXL's width (the denoiser sees the same 4096-d states) and the VAE the small
    stand-in of the other ``*-shape`` built-ins: fragjobs edits only the denoiser.
"""

from __future__ import annotations

from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from transformers import T5Config, T5EncoderModel

from fragjobs.builtin.seeded import scheduler, seeded, stand_in_vae, tiny_vae
from fragjobs.builtin.tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE, build_byte_tokenizer
from fragjobs.families.pixart import PIXART_TEXT_TOKENS


def pixart_transformer(
    *, sample_size: int, layers: int, heads: int, head_dim: int, caption_dim: int
) -> PixArtTransformer2DModel:
    """A PixArt-α transformer (random weights; seed it with :func:`seeded`)."""
    return PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=heads * head_dim,
        caption_channels=caption_dim,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
    )


def t5_encoder(width: int, layers: int, heads: int, ff: int, seed: int) -> T5EncoderModel:
    """A T5 encoder over the byte-level tokenizer's vocabulary."""
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=width,
        d_kv=width // heads,
        d_ff=ff,
        num_layers=layers,
        num_heads=heads,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    return seeded(seed, lambda: T5EncoderModel(config))


def assemble_pixart(transformer, vae, encoder) -> PixArtAlphaPipeline:
    """A ``PixArtAlphaPipeline`` of these components, the byte-level tokenizer and the
    built-ins' scheduler."""
    return PixArtAlphaPipeline(
        tokenizer=build_byte_tokenizer(PIXART_TEXT_TOKENS),
        text_encoder=encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler(),
    )


def build_tiny_pixart() -> PixArtAlphaPipeline:
    """The ``tiny-pixart`` pipeline (about 0.2 M denoiser parameters)."""
    transformer = seeded(
        41,
        lambda: pixart_transformer(sample_size=32, layers=4, heads=4, head_dim=8, caption_dim=32),
    )
    vae = tiny_vae(42)
    return assemble_pixart(transformer, vae, t5_encoder(32, 2, 4, 64, seed=43))


def build_pixart_shape() -> PixArtAlphaPipeline:
    """The ``pixart-shape`` pipeline: PixArt-α XL/2-512's transformer, stand-in T5 and VAE."""
    transformer = seeded(
        51,
        lambda: pixart_transformer(
            sample_size=64, layers=28, heads=16, head_dim=72, caption_dim=4096
        ),
    )
    vae = stand_in_vae(52, 512)
    return assemble_pixart(transformer, vae, t5_encoder(4096, 1, 64, 10240, seed=53))
