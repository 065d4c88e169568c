"""int8 weight storage with per-output-channel scales.

A quantised layer keeps ``weight_int8`` (int8) and ``weight_scale`` (float, one per output
channel) and dequantises on the fly, so the loaded fragment holds a quarter of the weight
bytes. Symmetric rounding bounds the error per weight by ``scale / 2 = max|w_row| / 254``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fragjobs.errors import InvalidInputError
from fragjobs.extraction.heads import record_edit
from fragjobs.extraction.lowrank import set_submodule
from fragjobs.keys import check_int

INT8_EDIT = "fragjobs.int8"


@dataclass(frozen=True)
class Int8Config:
    """Which layers store int8 weights.

    Args:
        patterns: fnmatch patterns of qualified names of Linear/Conv2d layers quantised.
        exclude: patterns kept in float (the precision map records them as ``float``).
        min_params: layers with fewer weights stay in float (scales would not pay).
    """

    patterns: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("conv_in", "conv_out", "time_embedding.*")
    min_params: int = 4096

    def __post_init__(self) -> None:
        check_int(self.min_params, "min_params", minimum=1)
        if not self.patterns:
            raise InvalidInputError("int8 patterns must not be empty")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: returns ``(int8 weight, float32 scale)``."""
    flat = weight.detach().float().flatten(1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(weight.shape), scale


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8 + per-row scale."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.out_features, self.in_features = weight_int8.shape

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)


class Int8Conv2d(nn.Module):
    """A Conv2d whose weight is stored as int8 + per-output-channel scale."""

    def __init__(self, conv: nn.Conv2d, weight_int8: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        if conv.padding_mode != "zeros":
            raise InvalidInputError("int8 Conv2d supports zero padding only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None, None, None]
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def plan_int8(unet: nn.Module, config: Int8Config, skip: set[str] = frozenset()) -> dict[str, str]:
    """The precision map: every Linear/Conv2d layer → ``"int8"`` or ``"float"``."""
    plan = {}
    for name, layer in unet.named_modules():
        if not isinstance(layer, nn.Linear | nn.Conv2d) or _inside(name, skip):
            continue
        eligible = (
            any(fnmatch.fnmatchcase(name, p) for p in config.patterns)
            and not any(fnmatch.fnmatchcase(name, p) for p in config.exclude)
            and layer.weight.numel() >= config.min_params
            and (not isinstance(layer, nn.Conv2d) or layer.padding_mode == "zeros")
        )
        plan[name] = "int8" if eligible else "float"
    return plan


def apply_int8_(unet: nn.Module, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace each named layer by its int8 version, given ``{name: (int8 weight, scale)}``."""
    for name, (weight_int8, scale) in quantized.items():
        layer = unet.get_submodule(name)
        if tuple(layer.weight.shape) != tuple(weight_int8.shape):
            raise InvalidInputError(
                f"{name}: int8 weight shape {tuple(weight_int8.shape)} does not match the "
                f"layer's {tuple(layer.weight.shape)}"
            )
        device = layer.weight.device
        weight_int8, scale = weight_int8.to(device), scale.to(device)
        if isinstance(layer, nn.Linear):
            new = Int8Linear(weight_int8, scale, layer.bias)
        elif isinstance(layer, nn.Conv2d):
            new = Int8Conv2d(layer, weight_int8, scale)
        else:
            raise InvalidInputError(f"{name} is neither Linear nor Conv2d")
        set_submodule(unet, name, new)
    record_edit(unet, INT8_EDIT)


def _inside(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)
