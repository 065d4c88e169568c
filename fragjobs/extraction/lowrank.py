"""Low-rank factorisation: replace a Linear by two thinner ones from its truncated SVD.

``W ≈ U_r diag(s_r) V_rᵀ`` is split as ``up = U_r √s_r`` and ``down = √s_r V_rᵀ``. The rank is
the smallest that keeps ``energy`` of ``Σ s²``; a layer is factorised only when
``r·(in+out) ≤ max_cost · in·out``, i.e. when it saves compute. The discarded singular values
are gone, so it cannot be undone in place: :func:`remove_low_rank` refuses; reload the base.

In a fragment file each factorised layer stores ``LOW_RANK_TENSOR`` (``low_rank.{layer}.{part}``)
with ``part`` one of ``down`` (rank×in), ``up`` (out×rank) and, if the layer had one, ``bias``.

Example::

    plan = plan_low_rank(unet, LowRankConfig(energy=0.9))
    factors = apply_low_rank_(unet, {name: int(p["rank"]) for name, p in plan.items()})
    tensors = low_rank_tensors(factors)
    install_low_rank_(base_unet, load_low_rank_tensors(tensors, plan))   # replay
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fragjobs.errors import InvalidInputError
from fragjobs.extraction.edits import (
    check_patterns,
    matches,
    new_linear,
    record_edit,
    refuse_removal,
    set_submodule,
)
from fragjobs.keys import check_fraction, check_int
from fragjobs.manifest import LowRankLayer

LOW_RANK_EDIT = "fragjobs.low_rank"
LOW_RANK_TENSOR = "low_rank.{layer}.{part}"


@dataclass(frozen=True)
class LowRankConfig:
    """Which Linear layers to factorise and how far.

    Args:
        energy: fraction of squared singular values kept, in (0, 1].
        patterns: fnmatch patterns of qualified layer names considered.
        min_features: skip layers whose smaller side is below this.
        max_cost: factorise only if the factors cost at most this fraction of the layer.
    """

    energy: float = 0.95
    patterns: tuple[str, ...] = ("*.ff.net.0.proj", "*.ff.net.2", "*.proj_in", "*.proj_out")
    min_features: int = 64
    max_cost: float = 0.8

    def __post_init__(self) -> None:
        check_fraction(self.energy, "low-rank energy")
        check_fraction(self.max_cost, "low-rank max_cost")
        check_int(self.min_features, "low-rank min_features", minimum=1)
        check_patterns(
            self.patterns,
            "low-rank patterns",
            "pass e.g. ('*.ff.net.2',), or set low_rank=None to turn low-rank off",
        )


class LowRankLinear(nn.Module):
    """``up(down(x))``: a Linear of rank ``rank`` with the original layer's bias."""

    def __init__(self, down: nn.Linear, up: nn.Linear) -> None:
        super().__init__()
        self.down = down
        self.up = up

    @property
    def rank(self) -> int:
        """The inner dimension (``down``'s output features)."""
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def factorise(layer: nn.Linear, rank: int) -> LowRankLinear:
    """The rank-``rank`` factorisation of ``layer`` (``rank = min(in, out)`` is exact)."""
    weight = layer.weight.data.double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    like = layer.weight
    down = new_linear(layer.in_features, rank, False, like)
    up = new_linear(rank, layer.out_features, layer.bias is not None, like)
    down.weight.data.copy_((root[:, None] * vh[:rank]).to(like.dtype))
    up.weight.data.copy_((u[:, :rank] * root[None, :]).to(like.dtype))
    if layer.bias is not None:
        up.bias.data.copy_(layer.bias.data)
    return LowRankLinear(down, up)


def plan_low_rank(unet: nn.Module, config: LowRankConfig) -> dict[str, dict[str, float]]:
    """The plan: per layer worth factorising, ``{"rank", "energy"}`` (the energy kept).

    A layer is left out when it matches no pattern, is smaller than ``min_features`` or would
    cost more than ``max_cost`` of itself at the rank that keeps ``energy``.
    """
    plan = {}
    for name, layer in unet.named_modules():
        if not isinstance(layer, nn.Linear) or not matches(name, config.patterns):
            continue
        out_f, in_f = layer.weight.shape
        if min(out_f, in_f) < config.min_features:
            continue
        s = torch.linalg.svdvals(layer.weight.data.double())
        cumulative = (s.pow(2).cumsum(0) / s.pow(2).sum()).clamp(max=1.0)
        target = torch.tensor(
            config.energy - 1e-12, dtype=cumulative.dtype, device=cumulative.device
        )
        rank = int(torch.searchsorted(cumulative, target).item()) + 1
        rank = min(rank, len(s))
        if rank * (in_f + out_f) <= config.max_cost * in_f * out_f:
            plan[name] = {"rank": rank, "energy": round(float(cumulative[rank - 1]), 6)}
    return plan


def apply_low_rank_(unet: nn.Module, ranks: dict[str, int]) -> dict[str, LowRankLinear]:
    """Replace each named Linear by its SVD factorisation of the given rank, in place.

    Returns:
        The factorised layers by name (what :func:`low_rank_tensors` stores).

    Raises:
        InvalidInputError: a name is not a Linear layer or a rank is out of range.
    """
    factors = {}
    for name, rank in ranks.items():
        layer = _linear(unet, name)
        check_int(rank, f"rank of {name}", minimum=1, maximum=min(layer.weight.shape))
        factors[name] = factorise(layer, rank)
    install_low_rank_(unet, factors)
    return factors


def install_low_rank_(unet: nn.Module, factors: dict[str, LowRankLinear]) -> None:
    """Put factorised layers in place of the named Linear layers, in place.

    Each one is moved to its layer's device and dtype.

    Raises:
        InvalidInputError: a name is not a Linear layer or its factors' shape differs.
    """
    for name, low_rank in factors.items():
        layer = _linear(unet, name)
        if (low_rank.down.in_features, low_rank.up.out_features) != (
            layer.in_features,
            layer.out_features,
        ):
            raise InvalidInputError(f"{name}: low-rank factors do not match the layer's shape")
        set_submodule(unet, name, low_rank.to(layer.weight.device, layer.weight.dtype))
    record_edit(unet, LOW_RANK_EDIT)


def remove_low_rank(unet: nn.Module) -> None:
    """Refuse to undo factorisation: the discarded singular values are gone.

    A no-op on a UNet that was not factorised.

    Raises:
        IrreversibleChangeError: ``unet`` was factorised; reload the base model instead.
    """
    refuse_removal(
        unet, LOW_RANK_EDIT, "low-rank factorisation discarded the weights' small singular values"
    )


def low_rank_tensors(factors: dict[str, LowRankLinear]) -> dict[str, torch.Tensor]:
    """The fragment tensors of factorised layers: ``down``, ``up`` and ``bias`` (if any)."""
    tensors = {}
    for name, layer in factors.items():
        parts = {"down": layer.down.weight, "up": layer.up.weight, "bias": layer.up.bias}
        for part, tensor in parts.items():
            if tensor is not None:
                key = LOW_RANK_TENSOR.format(layer=name, part=part)
                tensors[key] = tensor.detach().cpu().contiguous()
    return tensors


def load_low_rank_tensors(
    tensors: dict[str, torch.Tensor], layers: Iterable[str]
) -> dict[str, LowRankLinear]:
    """The factorised ``layers`` stored in a fragment's tensors, ready for
    :func:`install_low_rank_` (on the CPU, in the stored dtype)."""
    factors = {}
    for name in layers:
        down, up = (tensors[LOW_RANK_TENSOR.format(layer=name, part=p)] for p in ("down", "up"))
        bias = tensors.get(LOW_RANK_TENSOR.format(layer=name, part="bias"))
        down_layer = new_linear(down.shape[1], down.shape[0], False, down)
        up_layer = new_linear(up.shape[1], up.shape[0], bias is not None, up)
        down_layer.weight.data.copy_(down)
        up_layer.weight.data.copy_(up)
        if bias is not None:
            up_layer.bias.data.copy_(bias)
        factors[name] = LowRankLinear(down_layer, up_layer)
    return factors


def low_rank_layer(config: LowRankConfig, plan: dict[str, dict[str, float]]) -> LowRankLayer:
    """The manifest's low-rank layer: the config's knobs and the plan, layer by layer."""
    return LowRankLayer(energy=config.energy, max_cost=config.max_cost, layers=plan)


def _linear(unet: nn.Module, name: str) -> nn.Linear:
    layer = unet.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise InvalidInputError(f"{name} is not a Linear layer")
    return layer
