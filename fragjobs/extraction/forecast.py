"""Forecasting a skipped block's output from its last computed outputs (TaylorSeer-style).

A block cached by :mod:`fragjobs.extraction.routing_hooks` keeps its last few computed
outputs with their step indices. On a skipped step its output is extrapolated in the step
index by the polynomial through the last ``order + 1`` of them (``order`` 0: plain reuse,
1: linear, 2: quadratic); the steps need not be evenly spaced (Lagrange weights, which are
the finite differences of TaylorSeer for even spacing).

While a search runs, each cache measures what every order would have predicted at the steps
it recomputes after a skip (the forecast of the longest gap, the worst case), against the
output it then computes: :class:`ForecastErrors` keeps the relative errors, and
:meth:`ForecastErrors.best_orders` chooses each block's order from them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

MAX_ORDER = 2


def lagrange_weights(steps: list[int], step: int) -> list[float]:
    """Weights of the outputs at ``steps`` whose sum is the polynomial's value at ``step``."""
    weights = []
    for i, si in enumerate(steps):
        w = 1.0
        for j, sj in enumerate(steps):
            if j != i:
                w *= (step - sj) / (si - sj)
        weights.append(w)
    return weights


def combine(outputs: list[Any], weights: list[float]) -> Any:
    """``sum(w * output)`` through nested tuples/lists of tensors (a block's output)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        total = first * weights[0]
        for out, w in zip(outputs[1:], weights[1:], strict=True):
            total = total + out * w
        return total
    if isinstance(first, tuple | list):
        return type(first)(combine([o[i] for o in outputs], weights) for i in range(len(first)))
    return first  # not a tensor (None, a flag): whatever the last computed step returned


def map_tensors(fn: Any, output: Any) -> Any:
    """``fn`` applied to each tensor of a block's (possibly nested) output."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple | list):
        return type(output)(map_tensors(fn, o) for o in output)
    return output


def zip_tensors(fn: Any, a: Any, b: Any) -> Any:
    """``fn(x, y)`` on matching tensors of two outputs of the same structure."""
    if isinstance(a, torch.Tensor):
        return fn(a, b)
    if isinstance(a, tuple | list):
        return type(a)(zip_tensors(fn, x, y) for x, y in zip(a, b, strict=True))
    return a


def first_tensor(output: Any) -> torch.Tensor:
    """The block's main output (its hidden states): the first tensor in it."""
    while not isinstance(output, torch.Tensor):
        output = output[0]
    return output


def forecast(history: list[tuple[int, Any]], step: int, order: int) -> Any:
    """The output at ``step`` extrapolated from ``(step, output)`` pairs, oldest first.

    Uses the last ``order + 1`` pairs (fewer when fewer were computed: a lower order).
    """
    points = history[-(order + 1) :]
    if len(points) == 1:
        return points[0][1]
    weights = lagrange_weights([s for s, _ in points], step)
    return combine([o for _, o in points], weights)


class ForecastErrors:
    """Relative error of each order's forecast, per block, at its recompute steps."""

    def __init__(self) -> None:
        self.total: dict[str, list[float]] = defaultdict(lambda: [0.0] * (MAX_ORDER + 1))
        self.count: dict[str, int] = defaultdict(int)

    def record(self, block: str, history: list[tuple[int, Any]], step: int, fresh: Any) -> None:
        """Score every order's forecast of ``fresh`` (computed at ``step``) from ``history``."""
        if len(history) < MAX_ORDER + 1 or step - history[-1][0] < 2:
            return  # only gaps that were forecast, with every order possible, count
        target = first_tensor(fresh).float()
        norm = float(target.norm()) or 1.0
        for order in range(MAX_ORDER + 1):
            guess = first_tensor(forecast(history, step, order)).float()
            self.total[block][order] += float((guess - target).norm()) / norm
        self.count[block] += 1

    def best_orders(self, blocks: list[str], default: int) -> dict[str, int]:
        """Per block, the order of least mean error (``default`` where none was measured)."""
        orders = {}
        for block in blocks:
            if self.count.get(block):
                errors = self.total[block]
                orders[block] = min(range(MAX_ORDER + 1), key=lambda o: (errors[o], o))
            else:
                orders[block] = default
        return orders
