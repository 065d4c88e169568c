"""How much memory a built-in model needs: its weights, and an estimate per image.

Nothing is loaded or run. A shipped model's weights are the size of its weight files; a
seeded one is built with its parameters on the ``meta`` device
(``accelerate.init_empty_weights``: no memory, no random initialisation), which gives its
parameter bytes and its configs in well under a second even for ``sd15-shape``.

The per-image figure is an **estimate** from the denoiser's and VAE's configs, in float32, at the
model's own size and guidance: :func:`fragjobs.generation.budget.estimate_from_configs`, the
same estimate the memory budget starts from before it measures the first batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fragjobs.base_identity import COMPONENTS, WEIGHT_SUFFIXES

FLOAT_BYTES = 4
MAX_BATCH = 1024
"""The largest batch :class:`fragjobs.generation.GenerationConfig` accepts."""


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


def _folder_weights(folder: Path) -> int:
    return sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    )


def footprint(name: str) -> ModelFootprint:
    """The footprint of the built-in model ``name`` (see the module's notes)."""
    from fragjobs.builtin import BUILTINS

    spec = BUILTINS[name]
    if spec.folder is not None:
        from fragjobs.families import family_of_class

        index = json.loads((spec.folder / "model_index.json").read_text())
        family = family_of_class(index.get("_class_name"), str(spec.folder))
        unet = json.loads((spec.folder / family.denoiser / "config.json").read_text())
        vae = json.loads((spec.folder / "vae" / "config.json").read_text())
        weights = _folder_weights(spec.folder)
    else:
        from accelerate import init_empty_weights

        with init_empty_weights():
            pipe = spec.build()
        from fragjobs.families import denoiser, family_of

        family = family_of(pipe)
        unet, vae = dict(denoiser(pipe).config), dict(pipe.vae.config)
        weights = sum(
            t.numel() * t.element_size()
            for component in COMPONENTS
            if getattr(pipe, component, None) is not None
            for t in [*getattr(pipe, component).parameters(), *getattr(pipe, component).buffers()]
        )
    from fragjobs.generation.budget import estimate_from_configs

    per_image = estimate_from_configs(
        unet,
        vae,
        family=family,
        element_bytes=FLOAT_BYTES,
        height=spec.height,
        width=spec.width,
        guidance_scale=spec.default_guidance,
    )
    return ModelFootprint(name, weights, per_image, spec.height, spec.width)


def builtin_footprints() -> list[ModelFootprint]:
    """Every built-in model's footprint, smallest weights first."""
    from fragjobs.builtin import BUILTINS

    return sorted((footprint(name) for name in BUILTINS), key=lambda f: f.weight_bytes)
