"""int8 weight storage with per-output-channel scales.

A quantised layer keeps ``weight_int8`` (int8) and ``weight_scale`` (float, one per output
channel) and dequantises on the fly, so it holds a quarter of the weight bytes but is slower
than float (a float copy per call). A loaded fragment's layers are then set to compute as the
device allows (:mod:`fragjobs.extraction.int8_exec`: an int8 matmul where one is faster,
else dequantised once); the stored format is the same whatever runs it. Symmetric rounding
bounds the error per weight by ``scale / 2 = max|w_row| / 254``.
The float weights are gone afterwards: :func:`remove_int8` refuses; reload the base model.

In a fragment file each quantised layer stores ``INT8_TENSOR`` (``int8.{layer}.{part}``) with
``part`` ``weight`` (int8) and ``scale`` (float32); the manifest's precision map says which
layers are int8.

Example::

    precision = plan_int8(unet, Int8Config())
    quantized = quantize_layers(unet, precision)
    apply_int8_(unet, quantized)
    tensors = int8_tensors(quantized)
    apply_int8_(base_unet, load_int8_tensors(tensors, precision))   # replay
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fragjobs.errors import InvalidInputError
from fragjobs.extraction.edits import (
    check_patterns,
    matches,
    record_edit,
    refuse_removal,
    set_submodule,
)
from fragjobs.keys import check_int
from fragjobs.manifest import Int8Layer

INT8_EDIT = "fragjobs.int8"
INT8_TENSOR = "int8.{layer}.{part}"
INT8, FLOAT = "int8", "float"


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
        check_int(self.min_params, "int8 min_params", minimum=1)
        check_patterns(
            self.patterns,
            "int8 patterns",
            "pass ('*',) to quantise every layer, or set int8=None to turn int8 off",
        )
        if self.exclude:
            check_patterns(self.exclude, "int8 exclude", "pass () to exclude no layer")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: returns ``(int8 weight, float32 scale)``."""
    flat = weight.detach().float().flatten(1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(weight.shape), scale


def dequantize_weight(weight_int8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """``weight_int8 * scale`` per output channel, in ``dtype``."""
    shape = (-1,) + (1,) * (weight_int8.dim() - 1)
    return weight_int8.to(dtype) * scale.to(dtype).view(shape)


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8 + per-row scale."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.out_features, self.in_features = weight_int8.shape

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight the layer computes with, in ``dtype``."""
        return dequantize_weight(self.weight_int8, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)


class Int8Conv2d(nn.Module):
    """A Conv2d whose weight is stored as int8 + per-output-channel scale."""

    def __init__(self, conv: nn.Conv2d, weight_int8: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise InvalidInputError("int8 Conv2d supports zero padding only; keep it in float")
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_weight(self.weight_int8, self.weight_scale, x.dtype)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def plan_int8(unet: nn.Module, config: Int8Config, skip: set[str] = frozenset()) -> dict[str, str]:
    """The plan, a precision map: every Linear/Conv2d layer → ``"int8"`` or ``"float"``.

    Layers inside ``skip`` (e.g. already factorised) are left out of the map.
    """
    plan = {}
    for name, layer in unet.named_modules():
        if not isinstance(layer, nn.Linear | nn.Conv2d) or _inside(name, skip):
            continue
        eligible = (
            matches(name, config.patterns)
            and not matches(name, config.exclude)
            and layer.weight.numel() >= config.min_params
            and (not isinstance(layer, nn.Conv2d) or layer.padding_mode == "zeros")
        )
        plan[name] = INT8 if eligible else FLOAT
    return plan


def quantize_layers(
    unet: nn.Module, precision: dict[str, str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (int8 weight, scale)}`` for the layers the precision map marks int8."""
    return {
        name: quantize_weight(unet.get_submodule(name).weight)
        for name, kind in precision.items()
        if kind == INT8
    }


def apply_int8_(unet: nn.Module, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace each named layer by its int8 version, given ``{name: (int8 weight, scale)}``.

    Raises:
        InvalidInputError: a layer is neither Linear nor Conv2d, or its weight's shape
            differs from the int8 weight's.
    """
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


def remove_int8(unet: nn.Module) -> None:
    """Refuse to undo int8 storage: the float weights were rounded away.

    A no-op on a UNet without int8 layers.

    Raises:
        IrreversibleChangeError: ``unet`` holds int8 layers; reload the base model instead.
    """
    refuse_removal(unet, INT8_EDIT, "int8 storage rounded the float weights away")


def int8_tensors(
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The fragment tensors of quantised layers: ``weight`` (int8) and ``scale``."""
    tensors = {}
    for name, (weight_int8, scale) in quantized.items():
        tensors[INT8_TENSOR.format(layer=name, part="weight")] = weight_int8.cpu().contiguous()
        tensors[INT8_TENSOR.format(layer=name, part="scale")] = scale.cpu().contiguous()
    return tensors


def load_int8_tensors(
    tensors: dict[str, torch.Tensor], precision: dict[str, str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The ``{name: (int8 weight, scale)}`` stored in a fragment's tensors for the layers the
    precision map marks int8, ready for :func:`apply_int8_`."""
    return {
        name: tuple(tensors[INT8_TENSOR.format(layer=name, part=p)] for p in ("weight", "scale"))
        for name, kind in precision.items()
        if kind == INT8
    }


def int8_layer(
    unet: nn.Module,
    precision: dict[str, str],
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> Int8Layer:
    """The manifest's int8 layer: the precision map and the largest rounding error.

    The error is measured against ``unet``'s float weights, so call it before
    :func:`apply_int8_` replaces them.
    """
    error = 0.0
    for name, (weight_int8, scale) in quantized.items():
        weight = unet.get_submodule(name).weight
        restored = dequantize_weight(weight_int8, scale, torch.float32)
        error = max(error, float((restored - weight.float()).abs().max()))
    return Int8Layer(precision_map=precision, max_abs_error=round(error, 8) if quantized else None)


def _inside(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)
