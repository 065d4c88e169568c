"""Colour difference of two images' dominant regions: CIEDE2000 in CIELAB.

SSIM compares local structure channel by channel; a shape that keeps its outline but turns
from green to near-black, or from orange to red, moves SSIM little when the shape covers a
small part of the image. This module compares what a person names first: the colour of the
background and the colour of what stands on it.

* :func:`rgb_to_lab`: sRGB in [0, 1] to CIELAB (D65), in torch.
* :func:`ciede2000`: the CIEDE2000 colour difference ΔE00 (Sharma, Wu & Dalal, 2005); about
  2 is a just-noticeable difference, above 10 the two colours get different names.
* :func:`dominant_colours`: per image, the background colour (median of a 2-pixel border) and
  the foreground colour (median of the pixels that differ from the background by more than
  :data:`FOREGROUND_DELTA_E`; the background colour itself when too few do — nothing stands
  on it).
* :func:`colour_delta_e`: per image pair, the larger ΔE00 of the two backgrounds and of the
  two foregrounds.

Everything is deterministic: no clustering, no random initialisation.
"""

from __future__ import annotations

import math

import torch

FOREGROUND_DELTA_E = 20.0
"""A pixel belongs to the foreground when its CIELAB distance (ΔE76) from the image's
background colour is larger than this."""

MIN_FOREGROUND_FRACTION = 0.005
"""Fewer foreground pixels than this fraction of the image: the image has no foreground, and
its foreground colour is its background colour (a shape that vanished reads as background)."""

BORDER_PIXELS = 2
"""Width of the border frame whose median is the background colour."""

_SRGB_TO_XYZ = torch.tensor(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ],
    dtype=torch.float64,
)
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """Convert sRGB images in [0, 1], shape ``(N, 3, H, W)``, to CIELAB (D65), float64.

    Returns:
        ``(N, 3, H, W)``: L in [0, 100], a and b roughly in [-128, 127].
    """
    rgb = images.detach().to(torch.float64).clamp(0.0, 1.0)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,njhw->nihw", _SRGB_TO_XYZ, linear)
    scaled = xyz / _D65_WHITE.view(1, 3, 1, 1)
    epsilon = (6.0 / 29.0) ** 3
    f = torch.where(
        scaled > epsilon,
        scaled.clamp(min=epsilon) ** (1.0 / 3.0),
        scaled / (3.0 * (6.0 / 29.0) ** 2) + 4.0 / 29.0,
    )
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def ciede2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 colour difference of CIELAB colours, shape ``(..., 3)`` each.

    Returns:
        ΔE00, shape ``(...)``, float64.

    Example::

        ciede2000(torch.tensor([50.0, 2.6772, -79.7751]), torch.tensor([50.0, 0.0, -82.7485]))
        # tensor(2.0425)
    """
    lab1, lab2 = lab1.to(torch.float64), lab2.to(torch.float64)
    l1, a1, b1 = lab1.unbind(-1)
    l2, a2, b2 = lab2.unbind(-1)
    c_mean = (torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2.0
    g = 0.5 * (1.0 - torch.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.rad2deg(torch.atan2(b1, a1p)) % 360.0
    h2p = torch.rad2deg(torch.atan2(b2, a2p)) % 360.0
    chroma = c1p * c2p
    grey = chroma == 0

    dh = h2p - h1p
    dh = torch.where(dh > 180.0, dh - 360.0, torch.where(dh < -180.0, dh + 360.0, dh))
    dh = torch.where(grey, torch.zeros_like(dh), dh)
    d_l = l2 - l1
    d_c = c2p - c1p
    d_h = 2.0 * torch.sqrt(chroma) * torch.sin(torch.deg2rad(dh / 2.0))

    l_mean = (l1 + l2) / 2.0
    cp_mean = (c1p + c2p) / 2.0
    h_sum = h1p + h2p
    h_mean = torch.where(
        (h1p - h2p).abs() <= 180.0,
        h_sum / 2.0,
        torch.where(h_sum < 360.0, (h_sum + 360.0) / 2.0, (h_sum - 360.0) / 2.0),
    )
    h_mean = torch.where(grey, h_sum, h_mean)

    t = (
        1.0
        - 0.17 * torch.cos(torch.deg2rad(h_mean - 30.0))
        + 0.24 * torch.cos(torch.deg2rad(2.0 * h_mean))
        + 0.32 * torch.cos(torch.deg2rad(3.0 * h_mean + 6.0))
        - 0.20 * torch.cos(torch.deg2rad(4.0 * h_mean - 63.0))
    )
    d_theta = 30.0 * torch.exp(-(((h_mean - 275.0) / 25.0) ** 2))
    r_c = 2.0 * torch.sqrt(cp_mean**7 / (cp_mean**7 + 25.0**7))
    s_l = 1.0 + 0.015 * (l_mean - 50.0) ** 2 / torch.sqrt(20.0 + (l_mean - 50.0) ** 2)
    s_c = 1.0 + 0.045 * cp_mean
    s_h = 1.0 + 0.015 * cp_mean * t
    r_t = -torch.sin(torch.deg2rad(2.0 * d_theta)) * r_c
    terms = (d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h)
    return torch.sqrt(terms.clamp(min=0.0))


def dominant_colours(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Background and foreground colour of each CIELAB image (see the module docstring).

    Args:
        lab: ``(N, 3, H, W)`` from :func:`rgb_to_lab`.

    Returns:
        ``(background, foreground)``, each ``(N, 3)`` CIELAB.
    """
    n, _, height, width = lab.shape
    border = min(BORDER_PIXELS, height // 2, width // 2)
    inner = torch.ones(height, width, dtype=torch.bool, device=lab.device)
    inner[border : height - border, border : width - border] = False
    background = lab[:, :, inner].median(dim=-1).values
    pixels = lab.flatten(2)
    distance = (pixels - background.unsqueeze(-1)).norm(dim=1)
    minimum = max(1, math.ceil(MIN_FOREGROUND_FRACTION * height * width))
    foreground = background.clone()
    for i in range(n):
        mask = distance[i] > FOREGROUND_DELTA_E
        if int(mask.sum()) >= minimum:
            foreground[i] = pixels[i][:, mask].median(dim=-1).values
    return background, foreground


def colour_delta_e(full: torch.Tensor, fragment: torch.Tensor) -> list[float]:
    """Per image pair, the larger CIEDE2000 of the backgrounds and of the foregrounds.

    Args:
        full, fragment: checked image batches ``(N, 3, H, W)`` in [0, 1], same seeds in the
            same order (see :func:`~fragjobs.validation.metrics.check_image_batches`).

    Returns:
        One ΔE00 per image, in order; 0 for identical images.
    """
    background_full, foreground_full = dominant_colours(rgb_to_lab(full))
    background_frag, foreground_frag = dominant_colours(rgb_to_lab(fragment))
    delta = torch.maximum(
        ciede2000(background_full, background_frag), ciede2000(foreground_full, foreground_frag)
    )
    return [float(v) for v in delta]
