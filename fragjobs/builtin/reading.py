"""Reading a built-in scene's attributes back from images (:mod:`fragjobs.builtin.scenes`).

:func:`read_attributes` reads colour, shape, size, position and background from images with
a CLIP model, zero-shot (no classifier is trained): every image is scored against the
canonical captions of all single-shape scenes. :func:`read_background` reads the background
from the border pixels alone. :func:`image_embeddings` and :func:`text_embeddings` are the
CLIP embeddings the shapes model's CLIP is trained and read with.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fragjobs.builtin.captions import canonical_caption
from fragjobs.builtin.scenes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    enumerate_specs,
    lookup_tables,
)


def normalise_for_clip(images: torch.Tensor) -> torch.Tensor:
    """Images (n, 3, H, W) in [0, 1] → CLIP pixel values (64×64, CLIP mean/std)."""
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(
            images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True
        )
    tables = lookup_tables(images.device)
    return (images - tables["clip_mean"].to(images.dtype)) / tables["clip_std"].to(images.dtype)


def text_embeddings(clip_model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Unit-norm projected text embeddings of a ``CLIPModel`` (transformers 4 and 5 alike)."""
    pooled = clip_model.text_model(input_ids=input_ids).pooler_output
    return F.normalize(clip_model.text_projection(pooled).float(), dim=-1)


def image_embeddings(clip_model: Any, images: torch.Tensor) -> torch.Tensor:
    """Unit-norm projected image embeddings of images (n, 3, H, W) in [0, 1]."""
    pooled = clip_model.vision_model(pixel_values=normalise_for_clip(images)).pooler_output
    return F.normalize(clip_model.visual_projection(pooled).float(), dim=-1)


@torch.no_grad()
def read_attributes(
    clip_model: Any, tokenizer: Any, images: torch.Tensor, *, batch_size: int = 256
) -> list[dict[str, str]]:
    """Read each image's attributes zero-shot with a CLIP model.

    Every image is compared with the canonical captions of all single-shape scenes
    (:func:`enumerate_specs` with ``held_out=None``); the softmax over those captions is
    summed per attribute value and the most probable value wins. Held-out combinations are
    among the candidates, so reading them tests composition, not memory.

    Args:
        clip_model: a ``CLIPModel`` (its own device is used).
        tokenizer: the model's tokenizer, or a ``CLIPProcessor`` holding it.
        images: (n, 3, H, W) in [0, 1]; resized to 64×64 if needed.
        batch_size: images per forward pass.

    Returns:
        One dict per image with the keys of :data:`ATTRIBUTES`.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    device = next(clip_model.parameters()).device
    specs = enumerate_specs(held_out=None)
    ids = tokenizer(
        [canonical_caption(s) for s in specs],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    text = torch.cat([text_embeddings(clip_model, chunk) for chunk in ids.split(512)])
    scale = clip_model.logit_scale.exp().float()
    values = {a: _values(a) for a in ATTRIBUTES}
    members = {
        a: torch.tensor([vals.index(s.attributes()[a]) for s in specs], device=device)
        for a, vals in values.items()
    }
    readings: list[dict[str, str]] = []
    for chunk in images.split(batch_size):
        image = image_embeddings(clip_model, chunk.to(device=device, dtype=torch.float32))
        logp = torch.log_softmax(scale * image @ text.T, dim=-1)
        best = {}
        for a, vals in values.items():
            per_value = torch.full((logp.shape[0], len(vals)), -math.inf, device=device)
            index = members[a].expand_as(logp)
            per_value = per_value.scatter_reduce(1, index, logp, reduce="amax")
            # log-sum-exp per value, stabilised by the per-value maximum
            summed = torch.zeros_like(per_value).scatter_add(
                1, index, (logp - per_value.gather(1, index)).exp()
            )
            best[a] = (per_value + summed.log()).argmax(dim=-1).tolist()
        readings += [{a: values[a][best[a][i]] for a in ATTRIBUTES} for i in range(logp.shape[0])]
    return readings


def read_background(images: torch.Tensor) -> list[str]:
    """Name each image's background from its border pixels (median of a 2-pixel frame).

    A check of the background that needs no model: the nearest colour of
    :data:`BACKGROUNDS` to the frame's median wins.
    """
    frame = torch.cat(
        [
            images[:, :, :2, :].flatten(2),
            images[:, :, -2:, :].flatten(2),
            images[:, :, 2:-2, :2].flatten(2),
            images[:, :, 2:-2, -2:].flatten(2),
        ],
        dim=2,
    ).float()
    median = frame.median(dim=2).values
    palette = lookup_tables(images.device)["background"]
    nearest = torch.cdist(median, palette).argmin(dim=-1)
    names = list(BACKGROUNDS)
    return [names[i] for i in nearest.tolist()]


def _values(attribute: str) -> list[str]:
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "size": list(SIZES),
        "position": list(POSITIONS),
        "background": list(BACKGROUNDS),
    }[attribute]
