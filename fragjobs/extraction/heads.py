"""Head pruning: choose heads from a profile and physically remove the others.

Pruning slices the rows of ``to_q``/``to_k``/``to_v`` and the columns of ``to_out[0]`` that
belong to removed heads and updates ``heads``/``inner_dim``, so the pruned UNet holds fewer
parameters and does fewer FLOPs. It cannot be undone in place (the removed weights are gone):
:func:`remove_head_pruning` refuses; reload the base model instead.

In a fragment file each attention module of the plan stores its kept head indices as one
int64 tensor named ``HEAD_PRUNING_TENSOR`` (``pruning.{module}.keep``).

Example::

    plan = plan_head_pruning(profile, HeadSelectionConfig(threshold=0.5))
    apply_head_pruning_(unet, plan)
    tensors = head_pruning_tensors(plan)          # replay: load_head_pruning(tensors)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fragjobs.config import DEFAULT_THRESHOLD
from fragjobs.errors import InvalidInputError
from fragjobs.extraction.edits import new_linear, record_edit, refuse_removal
from fragjobs.extraction.fidelity import profiling_generation, seed_ssim
from fragjobs.families import denoiser
from fragjobs.keys import check_fraction, check_int
from fragjobs.manifest import PruningLayer
from fragjobs.profiling import PromptProfile, attention_modules

HEAD_PRUNING_EDIT = "fragjobs.head_pruning"
HEAD_PRUNING_TENSOR = "pruning.{module}.keep"
_TENSOR_PREFIX, _TENSOR_SUFFIX = HEAD_PRUNING_TENSOR.split("{module}")


@dataclass(frozen=True)
class HeadSelectionConfig:
    """How heads are chosen from a profile.

    Args:
        threshold: fraction of heads to keep, in (0, 1]: heads scoring at or above the
            ``1 - threshold`` quantile of all head scores are kept (1.0 keeps every head).
        min_heads_per_layer: every attention module keeps at least this many heads.
        rank_margin: a head whose within-module rank moves by more than this fraction of
            the module's heads (std across seeds) is kept as a safety margin.
        min_ssim: fidelity guard, in (0, 1] or ``None`` (off). When set, the extraction
            raises the kept fraction from ``threshold`` toward 1.0 (``guard_steps`` even
            steps, bisected) until the pruned UNet's images keep this SSIM against the full
            model on every profiling seed; keeping every head always passes.
        guard_steps: kept fractions tried between ``threshold`` and 1.0 by the guard.
    """

    threshold: float = DEFAULT_THRESHOLD
    min_heads_per_layer: int = 1
    rank_margin: float = 0.25
    min_ssim: float | None = None
    guard_steps: int = 4

    def __post_init__(self) -> None:
        check_fraction(self.threshold, "threshold")
        if self.min_ssim is not None:
            check_fraction(self.min_ssim, "min_ssim")
        check_int(self.guard_steps, "guard_steps", minimum=1, maximum=64)
        check_int(self.min_heads_per_layer, "min_heads_per_layer", minimum=1, maximum=1024)
        if not isinstance(self.rank_margin, int | float) or not 0 <= self.rank_margin <= 1:
            raise InvalidInputError(f"rank_margin must be in [0, 1], got {self.rank_margin!r}")


@dataclass(frozen=True)
class HeadPruningConfig:
    """The plan: which heads each attention module keeps (module name → sorted head indices).

    ``reasons`` (per module: why each kept head was kept) is reported in the manifest only.
    """

    keep: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reasons: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, heads in self.keep.items():
            if not heads:
                raise InvalidInputError(f"{name}: a module must keep at least one head")
            if list(heads) != sorted(set(heads)):
                raise InvalidInputError(f"{name}: kept heads must be sorted and distinct")


def guard_fractions(config: HeadSelectionConfig) -> list[float]:
    """Kept fractions the fidelity guard may use, from ``threshold`` up (1.0 excluded)."""
    step = (1.0 - config.threshold) / config.guard_steps
    return [round(config.threshold + k * step, 6) for k in range(config.guard_steps)]


def select_heads(
    scores: dict[str, torch.Tensor],
    rank_std: dict[str, torch.Tensor],
    config: HeadSelectionConfig,
) -> HeadPruningConfig:
    """Choose the heads to keep from per-head scores and rank instability."""
    if not scores:
        raise InvalidInputError("the profile has no attention heads to select from")
    everything = torch.cat([s.flatten() for s in scores.values()])
    cut = torch.quantile(everything.double(), 1.0 - config.threshold).item()
    keep, reasons = {}, {}
    for name in sorted(scores):
        score = scores[name]
        by_score = {int(h) for h in torch.nonzero(score >= cut).flatten()}
        unstable = {int(h) for h in torch.nonzero(rank_std[name] > config.rank_margin).flatten()}
        minimum = {int(h) for h in score.argsort(descending=True)[: config.min_heads_per_layer]}
        kept = by_score | unstable | minimum
        keep[name] = tuple(sorted(kept))
        reasons[name] = {
            "score": sorted(by_score),
            "unstable_rank": sorted(unstable - by_score),
            "min_per_layer": sorted(minimum - by_score - unstable),
        }
    return HeadPruningConfig(keep=keep, reasons=reasons)


def plan_head_pruning(profile: PromptProfile, config: HeadSelectionConfig) -> HeadPruningConfig:
    """The heads to keep by the profile's head scores and rank instability (no guard)."""
    return select_heads(profile.head_scores(), profile.rank_std(), config)


@torch.no_grad()
def guard_head_selection(
    pipe: Any,
    profile: PromptProfile,
    config: HeadSelectionConfig,
    *,
    reference: torch.Tensor,
    height: int,
    width: int,
) -> tuple[HeadSelectionConfig, list[dict[str, float | None]]]:
    """The fidelity guard: the smallest kept fraction whose pruned UNet keeps ``min_ssim``.

    The fractions of :func:`guard_fractions` are bisected; each trial prunes a copy of
    the pipeline's denoiser and compares its images with ``reference`` (the full model's) on every
    profiling seed, the worst seed deciding. Keeping every head always passes.

    Returns:
        ``(config with the chosen threshold, one row per trial: threshold, heads_kept,
        ssim_min, ssim_mean)``.

    Raises:
        InvalidInputError: ``config.min_ssim`` is None (the guard is off).
    """
    if config.min_ssim is None:
        raise InvalidInputError("the head guard needs min_ssim; set it or skip the guard")
    gen = profiling_generation(profile, height, width)
    fractions = guard_fractions(config)
    rows: list[dict[str, float | None]] = []
    chosen, low, high = 1.0, 0, len(fractions) - 1
    while low <= high:
        middle = (low + high) // 2
        unet = copy.deepcopy(denoiser(pipe))
        candidate = replace(config, threshold=fractions[middle])
        report = apply_head_pruning_(unet, plan_head_pruning(profile, candidate))
        worst, mean = seed_ssim(pipe, unet, profile, reference, gen)
        del unet
        rows.append(
            {
                "threshold": fractions[middle],
                "heads_kept": report["heads_after"],
                "ssim_min": round(worst, 6),
                "ssim_mean": round(mean, 6),
            }
        )
        if worst >= config.min_ssim:
            chosen, high = fractions[middle], middle - 1
        else:
            low = middle + 1
    return replace(config, threshold=chosen), rows


def apply_head_pruning_(unet: nn.Module, config: HeadPruningConfig) -> dict[str, int]:
    """Physically remove the heads not kept by ``config``, in place.

    Returns:
        ``{"heads_before", "heads_after", "params_before", "params_after"}``.

    Raises:
        InvalidInputError: a module name is unknown or a head index is out of range.
    """
    modules = attention_modules(unet)
    unknown = sorted(set(config.keep) - set(modules))
    if unknown:
        raise InvalidInputError(f"unknown attention modules in pruning config: {unknown[:3]}")
    params_before = sum(p.numel() for p in unet.parameters())
    heads_before = sum(m.heads for m in modules.values())
    for name, kept in config.keep.items():
        attn = modules[name]
        if max(kept) >= attn.heads:
            raise InvalidInputError(f"{name}: head {max(kept)} out of range ({attn.heads} heads)")
        if len(kept) < attn.heads:
            _prune_attention(attn, list(kept))
    record_edit(unet, HEAD_PRUNING_EDIT)
    return {
        "heads_before": heads_before,
        "heads_after": sum(m.heads for m in modules.values()),
        "params_before": params_before,
        "params_after": sum(p.numel() for p in unet.parameters()),
    }


def remove_head_pruning(unet: nn.Module) -> None:
    """Refuse to undo head pruning: the pruned weights are gone (a no-op on an unpruned UNet).

    Raises:
        IrreversibleChangeError: ``unet`` was pruned; reload the base model instead.
    """
    refuse_removal(unet, HEAD_PRUNING_EDIT, "head pruning removed weights physically")


def head_pruning_tensors(config: HeadPruningConfig) -> dict[str, torch.Tensor]:
    """The fragment tensors of a plan: per module, its kept head indices (int64)."""
    return {
        HEAD_PRUNING_TENSOR.format(module=name): torch.tensor(kept, dtype=torch.int64)
        for name, kept in config.keep.items()
    }


def load_head_pruning(tensors: dict[str, torch.Tensor]) -> HeadPruningConfig:
    """The plan stored in a fragment's tensors (other techniques' tensors are ignored)."""
    keep = {
        name[len(_TENSOR_PREFIX) : -len(_TENSOR_SUFFIX)]: tuple(int(h) for h in tensor.tolist())
        for name, tensor in tensors.items()
        if name.startswith(_TENSOR_PREFIX) and name.endswith(_TENSOR_SUFFIX)
    }
    return HeadPruningConfig(keep=keep)


def pruning_layer(
    plan: HeadPruningConfig,
    report: dict[str, int],
    *,
    requested: HeadSelectionConfig,
    used: HeadSelectionConfig,
    search: list[dict[str, float | None]],
) -> PruningLayer:
    """The manifest's pruning layer.

    Args:
        plan: the applied plan; ``report``: what :func:`apply_head_pruning_` returned for it.
        requested: the selection asked for; ``used``: the one applied (the guard may have
            raised its threshold); ``search``: the guard's trials.
    """
    return PruningLayer(
        threshold=used.threshold,
        min_heads_per_layer=used.min_heads_per_layer,
        rank_margin=used.rank_margin,
        requested_threshold=requested.threshold,
        min_ssim=used.min_ssim,
        search=search,
        heads_total=report["heads_before"],
        heads_kept=report["heads_after"],
        keep={n: list(k) for n, k in plan.keep.items()},
        reasons=plan.reasons,
        params_before=report["params_before"],
        params_after=report["params_after"],
    )


def head_pruning_selections(
    unet: nn.Module, config: HeadPruningConfig
) -> dict[str, tuple[int, torch.Tensor]]:
    """What a pruned UNet keeps of the unpruned one's tensors, for building it without them.

    Returns:
        ``{state-dict name: (dim, index)}``: the kept rows of ``to_q``/``to_k``/``to_v``
        (weights and biases) and the kept columns of ``to_out.0.weight``, per module that
        loses heads. ``unet`` may be on the meta device (only its shapes are read).
    """
    modules = attention_modules(unet)
    selections = {}
    for name, kept in config.keep.items():
        attn = modules.get(name)
        if attn is None or len(kept) >= attn.heads:
            continue  # apply_head_pruning_ reports unknown modules; nothing to cut here
        index = _head_index(attn, list(kept))
        for proj in ("to_q", "to_k", "to_v"):
            selections[f"{name}.{proj}.weight"] = (0, index)
            if getattr(attn, proj).bias is not None:
                selections[f"{name}.{proj}.bias"] = (0, index)
        selections[f"{name}.to_out.0.weight"] = (1, index)
    return selections


def _head_index(attn: nn.Module, kept: list[int]) -> torch.Tensor:
    head_dim = attn.to_q.out_features // attn.heads
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])


def _prune_attention(attn: nn.Module, kept: list[int]) -> None:
    index = _head_index(attn, kept).to(attn.to_q.weight.device)
    for proj in ("to_q", "to_k", "to_v"):
        setattr(attn, proj, _slice_linear(getattr(attn, proj), rows=index))
    attn.to_out[0] = _slice_linear(attn.to_out[0], cols=index)
    attn.heads = len(kept)
    attn.inner_dim = len(index)
    attn.inner_kv_dim = len(index)


def _slice_linear(layer: nn.Linear, *, rows=None, cols=None) -> nn.Linear:
    weight = layer.weight.data
    bias = layer.bias.data if layer.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols)
    new = new_linear(weight.shape[1], weight.shape[0], bias is not None, weight)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new
