"""How much memory a built-in model needs: its weights, and an estimate per image.

Nothing is loaded or run. A shipped model's weights are the size of its weight files; a
seeded one is built with its parameters on the ``meta`` device
(``accelerate.init_empty_weights``: no memory, no random initialisation), which gives its
parameter bytes and its configs in well under a second even for ``sd15-shape``.

The per-image figure is an **estimate** from the UNet's and VAE's configs, in float32, with
classifier-free guidance (two UNet rows per image) and PyTorch's scaled-dot-product attention
(which never holds a whole attention matrix):

* UNet: the skip connections the down path keeps for the up path, plus a working set of
  fourteen feature maps' worth at the top resolution (the GEGLU feed-forward alone projects
  to eight times the width, then keeps four);
* VAE decoder: four feature maps of its second width (the last upsampling) and two of its
  first at full image size;

the larger of the two (they run one after the other), times :data:`MARGIN` for the allocator
and kernels' workspaces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLOAT_BYTES = 4
MARGIN = 2.0
"""Estimated activations are multiplied by this (allocator rounding, kernel workspaces):
measured on CPU (peak RSS, batch 16), ``tiny-sd`` took 1.1× and ``shapes`` 0.8× of the
estimate with this margin."""
MAX_BATCH = 1024
"""The largest batch :class:`fragjobs.generation.GenerationConfig` accepts."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
_COMPONENTS = ("unet", "text_encoder", "vae")


@dataclass(frozen=True)
class ModelFootprint:
    """A built-in model's weights in bytes and its estimated bytes per image."""

    name: str
    weight_bytes: int
    per_image_bytes: int
    height: int
    width: int

    def largest_batch(self, budget_bytes: float) -> int:
        """The most images generated at once within ``budget_bytes`` (0: not even one)."""
        room = budget_bytes - self.weight_bytes
        if room < self.per_image_bytes:
            return 0
        return min(int(room // self.per_image_bytes), MAX_BATCH)


def per_image_bytes(
    unet: Mapping[str, Any], vae: Mapping[str, Any], height: int, width: int
) -> int:
    """Estimated peak activation bytes of generating one ``height`` × ``width`` image.

    Args:
        unet: the UNet's config (``block_out_channels``, ``layers_per_block``).
        vae: the VAE's config (``block_out_channels``).
    """
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    latent_area = (height // scale) * (width // scale)
    channels = list(unet["block_out_channels"])
    layers = unet.get("layers_per_block", 2)
    layers = max(layers) if isinstance(layers, list | tuple) else layers
    skips = sum((layers + 1) * c * latent_area // 4**i for i, c in enumerate(channels))
    unet_row = skips + 14 * channels[0] * latent_area
    vae_channels = list(vae["block_out_channels"])
    second = vae_channels[1] if len(vae_channels) > 1 else vae_channels[0]
    decoder = (4 * second + 2 * vae_channels[0]) * height * width
    return int(max(2 * unet_row, decoder) * FLOAT_BYTES * MARGIN)


def _folder_weights(folder: Path) -> int:
    return sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
    )


def footprint(name: str) -> ModelFootprint:
    """The footprint of the built-in model ``name`` (see the module's notes)."""
    from fragjobs.builtin import BUILTINS

    spec = BUILTINS[name]
    if spec.folder is not None:
        unet = json.loads((spec.folder / "unet" / "config.json").read_text())
        vae = json.loads((spec.folder / "vae" / "config.json").read_text())
        weights = _folder_weights(spec.folder)
    else:
        from accelerate import init_empty_weights

        with init_empty_weights():
            pipe = spec.build()
        unet, vae = dict(pipe.unet.config), dict(pipe.vae.config)
        weights = sum(
            t.numel() * t.element_size()
            for component in _COMPONENTS
            for t in [*getattr(pipe, component).parameters(), *getattr(pipe, component).buffers()]
        )
    return ModelFootprint(
        name, weights, per_image_bytes(unet, vae, spec.height, spec.width), spec.height, spec.width
    )


def builtin_footprints() -> list[ModelFootprint]:
    """Every built-in model's footprint, smallest weights first."""
    from fragjobs.builtin import BUILTINS

    return sorted((footprint(name) for name in BUILTINS), key=lambda f: f.weight_bytes)
