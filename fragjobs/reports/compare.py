"""Side-by-side image of the full model and the fragment on the same seeds."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from fragjobs.errors import InvalidInputError
from fragjobs.keys import check_seeds
from fragjobs.validation import check_image_batches, to_uint8

_DPI = 100
_PANEL_TARGET_PX = 256
_LABEL_COLUMN_PX = 110
_SEED_ROW_PX = 30
_TITLE_ROW_PX = 30
_GAP_PX = 8


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert float images ``(N, 3, H, W)`` in [0, 1] to RGB PIL images (rounded to uint8)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise InvalidInputError(f"images must be a tensor of shape (N, 3, H, W), got {shape}")
    pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


def save_compare_image(
    full: torch.Tensor,
    fragment: torch.Tensor,
    seeds: list[int],
    path: Path,
    *,
    title: str = "",
) -> Path:
    """Save a PNG with the full model's images above the fragment's, one column per seed.

    Each image is drawn at an integer scale of its own pixel size (nearest neighbour, so small
    images stay sharp and no pixels are invented); rows are labelled "full model" and
    "fragment", columns by seed.

    Args:
        full: full-model images, float ``(N, 3, H, W)`` in [0, 1].
        fragment: fragment images, same shape, same seeds in the same order.
        seeds: the N seeds, in the order of the images.
        path: where to write the PNG (parent folders are created).
        title: optional line above the grid (e.g. model and prompt).

    Returns:
        ``path``.

    Raises:
        InvalidInputError: the images are invalid or their number differs from ``len(seeds)``.
    """
    from matplotlib.figure import Figure

    full, fragment = check_image_batches(full, fragment)
    seeds = check_seeds(seeds)
    count, _, height, width = full.shape
    if len(seeds) != count:
        raise InvalidInputError(f"got {count} image pairs but {len(seeds)} seeds")
    scale = max(1, math.floor(_PANEL_TARGET_PX / max(height, width)))
    panel_w, panel_h = width * scale, height * scale
    top = _SEED_ROW_PX + (_TITLE_ROW_PX if title else 0)
    fig_w = _LABEL_COLUMN_PX + count * panel_w + count * _GAP_PX
    fig_h = top + 2 * panel_h + 2 * _GAP_PX
    # Figure (not pyplot): no global state, no display; PNG is rendered by the Agg backend.
    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI)
    if title:
        fig.text(0.5, 1 - (_TITLE_ROW_PX / 2) / fig_h, title, ha="center", va="center")
    for row, (label, images) in enumerate((("full model", full), ("fragment", fragment))):
        bottom = fig_h - top - (row + 1) * panel_h - row * _GAP_PX
        for column, (seed, image) in enumerate(zip(seeds, tensor_to_pil(images), strict=True)):
            left = _LABEL_COLUMN_PX + column * (panel_w + _GAP_PX)
            ax = fig.add_axes((left / fig_w, bottom / fig_h, panel_w / fig_w, panel_h / fig_h))
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"seed {seed}", fontsize=9)
            if column == 0:
                ax.set_ylabel(label, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path
