"""Built-in pipelines made offline from configs with seeded random weights.

``tiny-sd``
    An SD-architecture pipeline small enough for tests: 64×64 images, 32×32×4 latents, a UNet
    with four heads in every attention module, a 2-layer CLIP text encoder and the byte-level
    tokenizer. Images are noise-like; the code path is the real one.
``shapes`` (the default)
    A small model trained here on procedural scenes (``fragjobs.builtin.scenes``, recipe in
    ``fragjobs.builtin.train``), shipped as a diffusers folder with its matching tiny CLIP;
    its files are checked against ``shapes/weights.sha256.json`` before loading. Quality
    figures on it mean something. See ``shapes/MODEL_CARD.md``.
``sd15-shape``
    Stable Diffusion 1.5's UNet shape (860 M parameters, 8 heads, 768-d cross-attention) with
    random weights, for timing. The text encoder and VAE are small stand-ins with the right
    interfaces (768-d context, 4-channel latents, 8× down-sampling) because fragjobs edits only
    the UNet and a full-size VAE would only dilute the measured ratios.
``tiny-sdxl``, ``sdxl-shape``
    The same two roles for the SDXL architecture (``StableDiffusionXLPipeline``: two text
    encoders, added time/text conditioning, three UNet levels with several transformer layers
    per block), built in :mod:`fragjobs.builtin.sdxl`.
``tiny-pixart``, ``pixart-shape``
    The same two roles for a diffusion transformer (``PixArtAlphaPipeline``: a T5 text
    encoder, a stack of transformer blocks as the denoiser), built in
    :mod:`fragjobs.builtin.pixart`.

The seeded ones are deterministic across processes: each component is initialised under its
own fixed seed inside ``torch.random.fork_rng`` (:mod:`fragjobs.builtin.seeded`), so the
caller's RNG state is untouched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffusers import (
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from fragjobs.builtin.pixart import build_pixart_shape, build_tiny_pixart
from fragjobs.builtin.sdxl import build_sdxl_shape, build_tiny_sdxl
from fragjobs.builtin.seeded import scheduler, seeded, stand_in_vae, text_encoder, tiny_vae
from fragjobs.builtin.tokenizer import build_byte_tokenizer


@dataclass(frozen=True)
class BuiltinSpec:
    """A built-in model: how to build it and its default generation size."""

    name: str
    description: str
    build: Callable[[], DiffusionPipeline]
    height: int
    width: int
    default_steps: int
    default_guidance: float = 7.5
    folder: Path | None = None  # shipped weights (hashed as a folder)
    clip_folder: Path | None = None  # matching CLIPModel for CLIP-score


def _assemble(unet, vae, encoder) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=build_byte_tokenizer(),
        unet=unet,
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd() -> StableDiffusionPipeline:
    """The ``tiny-sd`` pipeline (about 2 M parameters)."""
    unet = seeded(
        1,
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(4, 4),  # diffusers' name for the number of heads
            norm_num_groups=8,
        ),
    )
    vae = tiny_vae(2)
    return _assemble(unet, vae, text_encoder(64, 2, 4, seed=3))


def build_sd15_shape() -> StableDiffusionPipeline:
    """The ``sd15-shape`` pipeline: SD 1.5's UNet shape, small text encoder and VAE."""
    unet = seeded(
        11,
        lambda: UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    )
    vae = stand_in_vae(12, 512)
    return _assemble(unet, vae, text_encoder(768, 1, 12, seed=13))


SHAPES_DIR = Path(__file__).parent / "shapes"
SHAPES_HASHES = SHAPES_DIR / "weights.sha256.json"


def verify_shipped_weights(root: Path = SHAPES_DIR) -> None:
    """Check every shipped file against ``weights.sha256.json``; raise IntegrityError if not."""
    from fragjobs.errors import IntegrityError

    expected = json.loads((root / SHAPES_HASHES.name).read_text())
    for relative, sha in expected.items():
        path = root / relative
        try:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise IntegrityError(f"shipped model file {relative} is unreadable: {exc}") from exc
        if actual != sha:
            raise IntegrityError(
                f"shipped model file {relative} does not match its recorded sha256 "
                f"({actual[:12]}…, expected {sha[:12]}…); reinstall fragjobs"
            )


def build_shapes(root: Path = SHAPES_DIR) -> StableDiffusionPipeline:
    """The shipped ``shapes`` pipeline, after checking its files' hashes."""
    verify_shipped_weights(root)
    return StableDiffusionPipeline.from_pretrained(root / "pipeline", local_files_only=True)


BUILTINS: dict[str, BuiltinSpec] = {
    "shapes": BuiltinSpec(
        "shapes",
        "trained here on procedural scenes; matching tiny CLIP (default)",
        build_shapes,
        64,
        64,
        20,
        default_guidance=6.0,
        folder=SHAPES_DIR / "pipeline",
        clip_folder=SHAPES_DIR / "clip",
    ),
    "tiny-sd": BuiltinSpec(
        "tiny-sd", "SD-architecture toy, seeded random weights (tests)", build_tiny_sd, 64, 64, 10
    ),
    "sd15-shape": BuiltinSpec(
        "sd15-shape",
        "SD 1.5 UNet shape, random weights (timing only)",
        build_sd15_shape,
        256,
        256,
        4,
    ),
    "tiny-sdxl": BuiltinSpec(
        "tiny-sdxl",
        "SDXL-architecture toy, seeded random weights (tests)",
        build_tiny_sdxl,
        64,
        64,
        10,
    ),
    "sdxl-shape": BuiltinSpec(
        "sdxl-shape",
        "SDXL UNet and text-encoder shapes, random weights (timing only)",
        build_sdxl_shape,
        512,
        512,
        4,
    ),
    "tiny-pixart": BuiltinSpec(
        "tiny-pixart",
        "PixArt-α (DiT) toy, seeded random weights (tests)",
        build_tiny_pixart,
        64,
        64,
        10,
        default_guidance=4.5,
    ),
    "pixart-shape": BuiltinSpec(
        "pixart-shape",
        "PixArt-α XL/2-512 transformer shape, random weights (timing only)",
        build_pixart_shape,
        512,
        512,
        4,
        default_guidance=4.5,
    ),
}
