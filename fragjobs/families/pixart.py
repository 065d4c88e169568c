"""The PixArt-α family: a diffusion transformer (DiT) denoiser (``PixArtAlphaPipeline``).

The denoiser is ``pipe.transformer`` (``PixArtTransformer2DModel``): patch embedding, a
stack of ``transformer_blocks`` (self-attention, cross-attention to the T5 prompt states,
feed-forward, all modulated by the timestep through adaLN-single), then the output
projection. The blocks run in sequence, so a skipped block hands on its input plus its cached
residual (output − input; Δ-DiT, First-Block-Cache): the blocks before it still count. Levels
pair block ``i`` with its mirror ``N-1-i`` (the outermost blocks are level 0, the middle ones
the deepest), so the nested schedules recompute the middle of the stack least often, where
features change least between steps (FORA, Δ-DiT). The pooled prompt embedding is the mean of
the T5 states (T5 has no pooled output); the pipeline encodes 120 text tokens; resolution
binning is off (fragjobs asks for the size it profiled), and so is caption cleaning (it needs
Beautiful Soup and ftfy; fragjobs prompts are plain).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from fragjobs.errors import InvalidInputError
from fragjobs.families.base import PipelineFamily

_NAME = re.compile(r"^transformer_blocks\.(\d+)$")
_WORKING_COPIES = 8  # the hidden states, the attention and feed-forward outputs, norms
PIXART_TEXT_TOKENS = 120
"""``PixArtAlphaPipeline``'s ``max_sequence_length``: the text states the blocks attend to."""


def transformer_blocks(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The transformer's blocks, by qualified name, in execution order."""
    return {f"transformer_blocks.{i}": b for i, b in enumerate(transformer.transformer_blocks)}


def block_key(name: str) -> tuple[int, int] | None:
    """``transformer_blocks.i`` → (0, i)."""
    match = _NAME.match(name)
    return None if match is None else (0, int(match.group(1)))


def block_levels(names: list[str]) -> dict[str, int]:
    """Block ``i`` of ``N`` is level ``min(i, N-1-i)``, at most ``N // 2 - 1`` (an odd
    middle block joins the deepest pair).

    Raises:
        InvalidInputError: a name is not a transformer block, fewer than two blocks, or the
            blocks are not ``0..N-1``.
    """
    bad = [n for n in names if block_key(n) is None]
    if bad:
        raise InvalidInputError(f"not transformer block names: {bad}")
    indices = sorted(block_key(n)[1] for n in names)
    if len(indices) < 2 or indices != list(range(len(indices))):
        raise InvalidInputError(
            f"block caching needs the transformer's blocks 0..N-1 (N >= 2), got {sorted(names)}"
        )
    n, depth = len(indices), len(indices) // 2
    return {name: min(block_key(name)[1], n - 1 - block_key(name)[1], depth - 1) for name in names}


def transformer_sample_bytes(
    config: Mapping[str, Any],
    latent_h: int,
    latent_w: int,
    *,
    element_bytes: int,
    guidance: int,
    sliced: bool,
) -> int:
    """Activations one image adds: a few copies of the token states and the largest
    attention score matrix (self-attention over the patches; halved when sliced)."""
    patch = int(config["patch_size"])
    tokens = (latent_h // patch) * (latent_w // patch)
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    activations = tokens * hidden * _WORKING_COPIES + tokens * hidden * 4  # feed-forward
    attention = int(config["num_attention_heads"]) * tokens * tokens
    if sliced:
        attention //= 2
    return guidance * element_bytes * (activations + attention)


PIXART_ALPHA = PipelineFamily(
    pipeline_class="PixArtAlphaPipeline",
    label="PixArt-α (DiT)",
    denoiser="transformer",
    denoiser_class="PixArtTransformer2DModel",
    blocks=transformer_blocks,
    block_key=block_key,
    block_levels=block_levels,
    residual_cache=True,
    sample_bytes=transformer_sample_bytes,
    pooled_output=None,
    text_tokens=PIXART_TEXT_TOKENS,
    call_kwargs={"use_resolution_binning": False, "clean_caption": False},
)
