"""Break-even: after how many variants a fragment has paid for the work of making it.

Two definitions, both ``cost ÷ saving`` with ``saving = full_s_per_image -
fragment_s_per_image`` (seconds the fragment saves on each image it generates instead of the
full model); both are ``None`` when the fragment saves nothing (``saving <= 0``: it never pays
back).

- **old** (the seed's, :func:`break_even_old`): *all* the chain's one-off seconds (profile +
  extract + validate) are overhead, as if none of the images they computed were of use:
  ``overhead_s / saving``.
- **delivered** (:func:`break_even_delivered`): the full-model images the chain computes anyway
  (the profiling seeds' and the validation seeds' reference images) are delivered as variants,
  so only the seconds spent *beyond delivering them* are overhead. Delivering an image costs
  the full model's per-image time, so ``max(0, chain_s - delivered_full * full_s_per_image) /
  saving``. It is the number of fragment-generated variants, after the ``delivered_full``
  full-model ones, at which the chain's total time equals the full model's alone:
  ``chain_s + k * fragment = (delivered_full + k) * full`` solves to ``k = (chain_s -
  delivered_full * full) / saving``. Clamped at 0: a chain that spent less than the full model
  would have on the images it delivered has paid back before its first fragment image.

Which seconds count is the caller's choice and must be stated where the figure is shown; the
report counts the profile, extract and validate steps and *not* the latency measurement (it is
a measurement for the report, not a cost of delivering variants).

Example::

    >>> break_even_old(12.0, 0.5, 0.2)
    40.0
    >>> break_even_delivered(12.0, 8, 0.5, 0.2)
    26.666666666666668
"""

from __future__ import annotations

import math

from fragjobs.errors import InvalidInputError


def saving_per_image(full_s_per_image: float, fragment_s_per_image: float) -> float | None:
    """Seconds the fragment saves per image, or ``None`` when it saves nothing.

    Args:
        full_s_per_image: the full model's seconds per image (> 0).
        fragment_s_per_image: the fragment's seconds per image (> 0), same steps, same batch.

    Raises:
        InvalidInputError: a time is not a finite number > 0.
    """
    full = _seconds(full_s_per_image, "full_s_per_image", positive=True)
    fragment = _seconds(fragment_s_per_image, "fragment_s_per_image", positive=True)
    saving = full - fragment
    return saving if saving > 0 else None


def break_even_old(
    overhead_s: float, full_s_per_image: float, fragment_s_per_image: float
) -> float | None:
    """The seed's break-even: all one-off seconds ÷ seconds saved per image.

    Args:
        overhead_s: every second the chain spent before generating variants (>= 0).
        full_s_per_image: the full model's seconds per image (> 0).
        fragment_s_per_image: the fragment's seconds per image (> 0).

    Returns:
        ``overhead_s / (full - fragment)``, or ``None`` when the fragment is not faster.

    Raises:
        InvalidInputError: a time is not finite, or negative (or zero for a per-image time).
    """
    overhead = _seconds(overhead_s, "overhead_s")
    saving = saving_per_image(full_s_per_image, fragment_s_per_image)
    return None if saving is None else overhead / saving


def break_even_delivered(
    chain_s: float, delivered_full: int, full_s_per_image: float, fragment_s_per_image: float
) -> float | None:
    """Break-even counted honestly: seconds beyond delivering the full-model images ÷ saving.

    Args:
        chain_s: the seconds the chain spent before the fragment generates variants (>= 0),
            including the work that produced the delivered full-model images.
        delivered_full: how many of the chain's full-model images were delivered as variants
            (>= 0); each is credited at ``full_s_per_image``, what delivering it would cost.
        full_s_per_image: the full model's seconds per image (> 0).
        fragment_s_per_image: the fragment's seconds per image (> 0).

    Returns:
        ``max(0, chain_s - delivered_full * full) / (full - fragment)``: the fragment variants
        needed after the delivered ones; ``None`` when the fragment is not faster.

    Raises:
        InvalidInputError: a time is not finite or negative, or ``delivered_full`` is not an
            integer >= 0.
    """
    chain = _seconds(chain_s, "chain_s")
    if isinstance(delivered_full, bool) or not isinstance(delivered_full, int):
        raise InvalidInputError(f"delivered_full must be an integer, got {delivered_full!r}")
    if delivered_full < 0:
        raise InvalidInputError(f"delivered_full must be >= 0, got {delivered_full}")
    saving = saving_per_image(full_s_per_image, fragment_s_per_image)
    if saving is None:
        return None
    beyond = chain - delivered_full * full_s_per_image
    return max(0.0, beyond) / saving


def _seconds(value: float, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise InvalidInputError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)
