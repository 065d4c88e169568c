"""What the peers ask of a denoiser: its layout (a UNet or a transformer), its inputs' names.

The peers fit themselves to the denoiser's layout: a UNet (``down_blocks``, ``mid_block``,
``up_blocks``, with Transformer2DModels inside) or a diffusion transformer (one
``transformer_blocks`` list, PixArt's), so they ask here; the pipeline's denoiser itself is its
family's (:func:`fragjobs.families.denoiser`).
"""

from __future__ import annotations

import inspect

import torch


def is_unet(module: torch.nn.Module) -> bool:
    """Whether ``module`` has a UNet's layout (down, mid and up blocks with skip connections)."""
    return all(hasattr(module, name) for name in ("down_blocks", "mid_block", "up_blocks"))


def input_names(module: torch.nn.Module) -> tuple[str, ...]:
    """The names of the denoiser's ``forward`` arguments, in order (without ``self``).

    A pipeline passes the first ones by position (``sample, timestep`` to a UNet, the latents
    to PixArt's transformer): their names are what hooks that read keywords need.
    """
    parameters = inspect.signature(type(module).forward).parameters
    return tuple(name for name in parameters if name != "self")
