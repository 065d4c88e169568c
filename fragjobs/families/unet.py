"""The UNet denoiser layout shared by the SD 1.x/2.x and SDXL families.

Blocks are the UNet's down blocks, its mid block and its up blocks, in that order. Level
``l`` is ``down_blocks.l`` with its mirror ``up_blocks.(L-1-l)`` (the mid block joins the
deepest level): a skipped up block hands on its cached output (DeepCache's reuse), which is
only sound when everything deeper is skipped too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from fragjobs.errors import InvalidInputError

_NAME = re.compile(r"^(down_blocks|up_blocks)\.(\d+)$|^mid_block$")
_WORKING_COPIES = 8  # working tensors at the widest level (input, output, normalised copies)


def unet_blocks(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's down, mid and up blocks, by qualified name, in execution order."""
    blocks = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    if getattr(unet, "mid_block", None) is not None:
        blocks["mid_block"] = unet.mid_block
    blocks.update({f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)})
    return blocks


def block_key(name: str) -> tuple[int, int] | None:
    """``down_blocks.i`` → (0, i), ``mid_block`` → (1, 0), ``up_blocks.i`` → (2, i)."""
    match = _NAME.match(name)
    if match is None:
        return None
    if name == "mid_block":
        return (1, 0)
    return (0 if match.group(1) == "down_blocks" else 2, int(match.group(2)))


def block_levels(names: list[str]) -> dict[str, int]:
    """UNet depth of each block: ``down_blocks.l`` and ``up_blocks.(L-1-l)`` are level ``l``.

    Raises:
        InvalidInputError: a name is not a UNet block, there is no down block, or an up block
            has no mirror.
    """
    bad = [n for n in names if block_key(n) is None]
    if bad:
        raise InvalidInputError(f"not UNet block names: {bad}")
    depth = sum(n.startswith("down_blocks.") for n in names)
    if depth == 0:
        raise InvalidInputError("block caching needs the UNet's down blocks")
    levels = {}
    for name in names:
        if name == "mid_block":
            levels[name] = depth - 1
            continue
        kind, index = name.split(".")
        levels[name] = int(index) if kind == "down_blocks" else depth - 1 - int(index)
        if not 0 <= levels[name] < depth:
            raise InvalidInputError(f"{name} has no mirror block among {names}")
    return levels


def unet_sample_bytes(
    config: Mapping[str, Any],
    latent_h: int,
    latent_w: int,
    *,
    element_bytes: int,
    guidance: int,
    sliced: bool,
) -> int:
    """Activations one image adds: the skip connections of every level plus working tensors
    at the widest one, and the largest self-attention score matrix (halved when sliced)."""
    channels = list(config["block_out_channels"])
    heads = config["attention_head_dim"]
    heads = list(heads) if isinstance(heads, list | tuple) else [heads] * len(channels)
    layers = config["layers_per_block"]
    layers = max(layers) if isinstance(layers, list | tuple) else layers
    activations, attention = 0, 0
    for level, (channel, level_heads) in enumerate(zip(channels, heads, strict=True)):
        pixels = (latent_h >> level) * (latent_w >> level)
        activations += pixels * channel * (layers + 1) * 2
        if "CrossAttn" in config["down_block_types"][level]:
            attention = max(attention, level_heads * pixels * pixels)
    activations += latent_h * latent_w * channels[0] * _WORKING_COPIES
    if sliced:
        attention //= 2
    return guidance * element_bytes * (activations + attention)
