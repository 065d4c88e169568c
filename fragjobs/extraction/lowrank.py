"""Low-rank factorisation: replace a Linear by two thinner ones from its truncated SVD.

``W ≈ U_r diag(s_r) V_rᵀ`` is split as ``up = U_r √s_r`` and ``down = √s_r V_rᵀ``. The rank is
the smallest that keeps ``energy`` of ``Σ s²``; a layer is factorised only when
``r·(in+out) ≤ max_cost · in·out``, i.e. when it saves compute. Irreversible in place.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from fragjobs.errors import InvalidInputError
from fragjobs.extraction.heads import new_linear, record_edit
from fragjobs.keys import check_fraction, check_int

LOW_RANK_EDIT = "fragjobs.low_rank"


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
        check_int(self.min_features, "min_features", minimum=1)
        if not self.patterns:
            raise InvalidInputError("low-rank patterns must not be empty")


class LowRankLinear(nn.Module):
    """``up(down(x))``: a Linear of rank ``rank`` with the original layer's bias."""

    def __init__(self, down: nn.Linear, up: nn.Linear) -> None:
        super().__init__()
        self.down = down
        self.up = up

    @property
    def rank(self) -> int:
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


def select_ranks(unet: nn.Module, config: LowRankConfig) -> dict[str, dict[str, float]]:
    """Per eligible layer: the rank for ``energy`` and the kept energy; layers that would not
    save compute are left out."""
    plan = {}
    for name, layer in unet.named_modules():
        if not isinstance(layer, nn.Linear) or not _matches(name, config.patterns):
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
    """Replace each named Linear by its SVD factorisation of the given rank, in place."""
    factors = {}
    for name, rank in ranks.items():
        layer = _linear(unet, name)
        check_int(rank, f"rank of {name}", minimum=1, maximum=min(layer.weight.shape))
        factors[name] = factorise(layer, rank)
    install_low_rank_(unet, factors)
    return factors


def low_rank_from_factors(
    down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor
) -> LowRankLinear:
    """A LowRankLinear holding stored factors (``down``: rank×in, ``up``: out×rank)."""
    down_layer = new_linear(down.shape[1], down.shape[0], False, like)
    up_layer = new_linear(up.shape[1], up.shape[0], bias is not None, like)
    down_layer.weight.data.copy_(down)
    up_layer.weight.data.copy_(up)
    if bias is not None:
        up_layer.bias.data.copy_(bias)
    return LowRankLinear(down_layer, up_layer)


def install_low_rank_(unet: nn.Module, factors: dict[str, LowRankLinear]) -> None:
    """Put factorised layers in place of the named Linear layers (shapes must agree)."""
    for name, low_rank in factors.items():
        layer = _linear(unet, name)
        if (low_rank.down.in_features, low_rank.up.out_features) != (
            layer.in_features,
            layer.out_features,
        ):
            raise InvalidInputError(f"{name}: low-rank factors do not match the layer's shape")
        set_submodule(unet, name, low_rank)
    record_edit(unet, LOW_RANK_EDIT)


def _linear(unet: nn.Module, name: str) -> nn.Linear:
    layer = unet.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise InvalidInputError(f"{name} is not a Linear layer")
    return layer


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
