"""The denoiser a benchmark method works on: a pipeline's UNet or its transformer.

The peers fit themselves to the denoiser's layout: a UNet (``down_blocks``, ``mid_block``,
``up_blocks``, with Transformer2DModels inside) or a diffusion transformer (one
``transformer_blocks`` list, PixArt's), so they ask here rather than reading ``pipe.unet``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser: its family's (:func:`fragjobs.families.denoiser`).

    Without the families package (a fragjobs that knows only UNet pipelines), the pipeline's
    ``unet``, else its ``transformer``.
    """
    try:
        from fragjobs.families import denoiser as family_denoiser
    except ImportError:
        return getattr(pipe, "unet", None) or pipe.transformer
    return family_denoiser(pipe)


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
