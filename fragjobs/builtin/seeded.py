"""What every seeded built-in is made of: components initialised under fixed seeds, the
byte-level CLIP text encoder and the scheduler they share.

Each component is initialised under its own seed inside ``torch.random.fork_rng``, so a
built-in is the same in every process and building it leaves the caller's RNG untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from fragjobs.builtin.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE


def seeded(seed: int, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``factory()`` initialised under ``seed`` (the caller's RNG state is kept), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory()
    return module.eval()


def text_encoder(
    hidden: int,
    layers: int,
    heads: int,
    seed: int,
    *,
    projection_dim: int | None = None,
    with_projection: bool = False,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text encoder over the byte-level tokenizer's vocabulary.

    Args:
        projection_dim: width of the projected pooled output (default ``hidden``).
        with_projection: a ``CLIPTextModelWithProjection`` (SDXL's second encoder, whose
            projected pooled output is the added text conditioning), else a ``CLIPTextModel``.
    """
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        projection_dim=projection_dim or hidden,
    )
    model = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return seeded(seed, lambda: model(config))


def scheduler() -> DPMSolverMultistepScheduler:
    """The scheduler of every seeded built-in (SD's training noise schedule)."""
    return DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )


def stand_in_vae(seed: int, sample_size: int) -> AutoencoderKL:
    """The small VAE of the ``*-shape`` built-ins (their timing is the UNet's): four levels,
    ``block_out_channels`` (16, 32, 32, 32), drawn from ``seed``."""
    return seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=(16, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=sample_size,
        ),
    )


def tiny_vae(seed: int) -> AutoencoderKL:
    """The VAE of the ``tiny-*`` built-ins: two levels (16, 32 channels; 2× down-sampling,
    64 px images over 32×32×4 latents), drawn from ``seed``."""
    return seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        ),
    )
