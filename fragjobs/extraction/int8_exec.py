"""How int8 layers compute: an int8 matmul where the device has a fast one, else float.

A fragment stores int8 weights and per-output-channel scales (:mod:`fragjobs.extraction.int8`);
this module decides, once per loaded UNet, how those layers run:

- ``"int_mm"``: W8A8 dynamic. Each Linear's input is quantised per token (symmetric int8,
  one scale per row) on every call and multiplied with the int8 weight by ``torch._int_mm``
  (int32 accumulation), then rescaled. Outputs differ from the float path (the activations
  are rounded too). Conv2d layers have no int8 kernel here and run as ``"float"``.
- ``"qlinear_dynamic"``: the same W8A8 dynamic scheme with torch's CPU kernel
  (``quantized::linear_dynamic``, fbgemm/x86: activations quantised per tensor to 7-bit
  unsigned, the stored int8 weight and per-channel scales prepacked as they are), for Linear
  layers of at least :data:`MIN_QLINEAR_WEIGHTS` weights; smaller Linear layers (where its
  per-call overhead dominates) and Conv2d layers run as ``"float"``. Float32 on CPU only.
- ``"float"``: dequantised once (``int8 · scale``, the very values the per-call path
  computes, so the images are bit-identical) into plain ``nn.Linear`` / ``nn.Conv2d``
  layers. Fast as the base, but the layers hold float weights: 4 bytes per weight in
  float32 instead of one (plus a scale per channel).
- ``"dequantize"``: keep int8 and dequantise on every call (the storage format's own
  modules): the least memory, 4-15 % slower than float on CPU.

``"auto"`` (the default) picks ``"int_mm"`` only on devices where it was measured faster
than float (:data:`FAST_INT_MM_DEVICES`), else ``"float"``. Measured on a 2-core AVX2 CPU
(no VNNI), one thread, per Linear layer against float32: ``torch._int_mm`` 0.01-0.04x,
torchao 0.18's int8 weight-only 0.5-1.0x and dynamic W8A8 0.01-0.04x (it calls
``_int_mm``), ``quantize_dynamic``'s kernel 0.16x on 128x128 but 1.2-2.2x on layers of
320x2560 and 640x640 (hence ``"qlinear_dynamic"``, not chosen by ``"auto"``: it changes the
images the fragment was validated with, and was not measured end to end on a large model).

Example::

    report = set_int8_execution_(unet, "auto")
    report.mode                # "float" on CPU
    int8_execution(unet)       # the same, read back from the UNet
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fragjobs.errors import InvalidInputError
from fragjobs.extraction.edits import set_submodule
from fragjobs.extraction.int8 import Int8Conv2d, Int8Linear

log = logging.getLogger(__name__)

INT_MM, QLINEAR, FLOAT_ONCE, DEQUANTIZE = "int_mm", "qlinear_dynamic", "float", "dequantize"
AUTO = "auto"
INT8_EXECUTION_MODES = (INT_MM, QLINEAR, FLOAT_ONCE, DEQUANTIZE)
# Device types on which W8A8 with torch._int_mm was measured faster than float. Empty: on
# CPU (AVX2, no VNNI) it was 0.2-0.6x of float32; no GPU was lent to measure CUDA.
FAST_INT_MM_DEVICES: frozenset[str] = frozenset()
# Activation dtypes the W8A8 path computes in (it rescales the int32 result in that dtype).
INT_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Linear layers below this many weights run as float in "qlinear_dynamic": measured on CPU,
# the kernel was 0.16x of float32 on a 128x128 layer, 2.2x on 640x640 and 1.2x on 320x2560.
MIN_QLINEAR_WEIGHTS = 256 * 1024
_MODE_ATTR = "_fragjobs_int8_execution"


@dataclass(frozen=True)
class Int8ExecutionReport:
    """What :func:`set_int8_execution_` did.

    Attributes:
        mode: the mode used (``"int_mm"``, ``"float"``, ``"dequantize"``), or ``None`` when
            the UNet holds no int8 layer.
        requested: the mode asked for (``"auto"`` or a mode).
        int_mm_layers: layers computing with ``torch._int_mm``.
        qlinear_layers: layers computing with ``quantized::linear_dynamic``.
        float_layers: layers dequantised once (all of them in ``"float"``; the Conv2d layers
            in ``"int_mm"``).
        dequantize_layers: layers dequantising on every call.
        reason: why this mode, in a sentence (for logs and the benchmark).
    """

    mode: str | None
    requested: str
    int_mm_layers: int = 0
    qlinear_layers: int = 0
    float_layers: int = 0
    dequantize_layers: int = 0
    reason: str = ""


def int_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``torch._int_mm`` runs on ``device`` for activations of ``dtype``.

    Tried for real on a small product (the op's shape rules: M > 16, K and N multiples of 8).
    """
    if dtype not in INT_MM_DTYPES or not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device)
        return int(torch._int_mm(a, a)[0, 0]) == 32
    except (RuntimeError, NotImplementedError):  # no kernel here (or no data: meta)
        return False


def qlinear_dynamic_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``quantized::linear_dynamic`` runs on ``device`` for activations of ``dtype``.

    Tried for real: a per-channel int8 weight prepacked and applied to a small input.
    """
    try:
        weight = torch.ones(8, 8, dtype=torch.int8)
        packed = _prepack(weight, torch.ones(8), None)
        x = torch.ones(2, 8, dtype=dtype, device=device)
        return float(torch.ops.quantized.linear_dynamic(x, packed, True)[0, 0]) == 8.0
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def choose_int8_execution(device: torch.device | str, dtype: torch.dtype) -> tuple[str, str]:
    """The mode ``"auto"`` means on ``device`` for ``dtype``, and why."""
    device = torch.device(device)
    if device.type not in FAST_INT_MM_DEVICES:
        return FLOAT_ONCE, f"no int8 matmul measured faster than float on {device.type}"
    if not int_mm_available(device, dtype):
        return FLOAT_ONCE, f"torch._int_mm does not run on {device} with {dtype}"
    return INT_MM, f"torch._int_mm measured faster than float on {device.type}"


def int8_computes_as_float(module: nn.Module) -> bool:
    """Whether int8 layers of ``module`` (by its first parameter's device and dtype) would
    compute as float under ``"auto"``: dequantised once at load, no faster than float."""
    param = next(module.parameters())
    return choose_int8_execution(param.device, param.dtype)[0] == FLOAT_ONCE


class Int8DynamicLinear(nn.Module):
    """A Linear computed by torch's ``quantized::linear_dynamic`` (fbgemm/x86, CPU float32).

    Holds only the prepacked weight (the stored int8 values and per-channel scales); the
    input is quantised per call (per tensor, 7-bit unsigned) inside the kernel.
    """

    def __init__(self, layer: Int8Linear) -> None:
        super().__init__()
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self._packed = _prepack(layer.weight_int8, layer.weight_scale, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.quantized.linear_dynamic(rows, self._packed, True)
        return out.reshape(*x.shape[:-1], self.out_features)


def _prepack(weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    rows = weight_int8.shape[0]
    zero = torch.zeros(rows, dtype=torch.long)
    with warnings.catch_warnings():  # torch flags quantized tensors as deprecated; still here
        warnings.simplefilter("ignore")
        quantized = torch._make_per_channel_quantized_tensor(
            weight_int8.cpu(), scale.double().cpu(), zero, 0
        )
        return torch.ops.quantized.linear_prepack(
            quantized, None if bias is None else bias.detach().float().cpu()
        )


class Int8MatmulLinear(nn.Module):
    """A Linear computing ``x @ W`` in int8 (W8A8 dynamic, ``torch._int_mm``).

    Holds the int8 weight transposed (in × out, what ``_int_mm`` takes) and the per-output
    scale. Inputs whose row count or features do not meet ``_int_mm``'s shape rules
    (more than 16 rows; features multiples of 8) are computed by dequantising the weight.
    """

    def __init__(self, layer: Int8Linear) -> None:
        super().__init__()
        self.register_buffer("weight_int8_t", layer.weight_int8.t().contiguous())
        self.register_buffer("weight_scale", layer.weight_scale.float())
        self.bias = layer.bias
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self._shapes_ok = self.in_features % 8 == 0 and self.out_features % 8 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not self._shapes_ok or rows.shape[0] <= 16:
            weight = self.weight_int8_t.t().to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
            return F.linear(x, weight, self.bias)
        out = int8_matmul(rows, self.weight_int8_t, self.weight_scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of a 2-D float tensor: ``(int8 rows, float32 scale (rows, 1))``."""
    rows = x.float()
    scale = (rows.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
    return torch.round(rows / scale).clamp_(-127, 127).to(torch.int8), scale


def int8_matmul(x: torch.Tensor, weight_int8_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (weight_int8_t · scale)`` with ``x`` quantised per row; float32 result."""
    xq, x_scale = quantize_rows(x)
    return torch._int_mm(xq, weight_int8_t).float() * x_scale * scale[None, :]


def set_int8_execution_(unet: nn.Module, mode: str = AUTO) -> Int8ExecutionReport:
    """Choose how the UNet's int8 layers compute, in place (see the module).

    ``"float"`` and ``"int_mm"`` replace the int8 storage modules; like int8 itself this
    cannot be undone (reload the fragment to get another mode).

    Args:
        unet: a UNet whose int8 layers are :class:`~fragjobs.extraction.int8.Int8Linear` /
            :class:`~fragjobs.extraction.int8.Int8Conv2d` (e.g. a built fragment UNet).
        mode: ``"auto"`` or one of :data:`INT8_EXECUTION_MODES`.

    Returns:
        What was done; the mode is also kept on ``unet`` (:func:`int8_execution`).

    Raises:
        InvalidInputError: an unknown mode, ``"int_mm"`` on a device/dtype where
            ``torch._int_mm`` does not run, or layers already set to another mode.
    """
    if mode not in (AUTO, *INT8_EXECUTION_MODES):
        raise InvalidInputError(
            f"int8 execution must be one of {(AUTO, *INT8_EXECUTION_MODES)}, got {mode!r}"
        )
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, Int8Linear | Int8Conv2d)]
    previous = int8_execution(unet)
    if not layers:
        if previous is not None and mode not in (AUTO, previous):
            raise InvalidInputError(
                f"the UNet's int8 layers already run as {previous!r}; reload the fragment "
                f"to run them as {mode!r}"
            )
        return Int8ExecutionReport(previous, mode, reason="no int8 layer to set")
    weight = layers[0][1].weight_scale
    dtype = _compute_dtype(unet)
    requested, reason = mode, f"asked for {mode}"
    if mode == AUTO:
        mode, reason = choose_int8_execution(weight.device, dtype)
    elif mode == INT_MM and not int_mm_available(weight.device, dtype):
        raise InvalidInputError(
            f"torch._int_mm does not run on {weight.device} with {dtype}; use int8 "
            "execution 'auto' or 'float'"
        )
    elif mode == QLINEAR and not qlinear_dynamic_available(weight.device, dtype):
        raise InvalidInputError(
            f"quantized::linear_dynamic does not run on {weight.device} with {dtype}; use "
            "int8 execution 'auto' or 'float'"
        )
    counts = {INT_MM: 0, QLINEAR: 0, FLOAT_ONCE: 0, DEQUANTIZE: 0}
    for name, layer in layers:
        kind = _layer_kind(mode, layer)
        if kind == INT_MM:
            set_submodule(unet, name, Int8MatmulLinear(layer))
        elif kind == QLINEAR:
            set_submodule(unet, name, Int8DynamicLinear(layer))
        elif kind == FLOAT_ONCE:
            set_submodule(unet, name, float_layer(layer, dtype))
        counts[kind] += 1
    setattr(unet, _MODE_ATTR, mode)
    report = Int8ExecutionReport(
        mode,
        requested,
        int_mm_layers=counts[INT_MM],
        qlinear_layers=counts[QLINEAR],
        float_layers=counts[FLOAT_ONCE],
        dequantize_layers=counts[DEQUANTIZE],
        reason=reason,
    )
    log.info(
        "int8 layers run as %s (%s): %d int_mm, %d qlinear_dynamic, %d float, %d dequantize",
        mode,
        reason,
        report.int_mm_layers,
        report.qlinear_layers,
        report.float_layers,
        report.dequantize_layers,
    )
    return report


def int8_execution(unet: nn.Module) -> str | None:
    """The mode :func:`set_int8_execution_` chose for ``unet`` (``None``: never set)."""
    return getattr(unet, _MODE_ATTR, None)


@torch.no_grad()
def float_layer(layer: Int8Linear | Int8Conv2d, dtype: torch.dtype) -> nn.Linear | nn.Conv2d:
    """A plain float layer with the int8 layer's dequantised weight (the same values)."""
    from fragjobs.extraction.int8 import dequantize_weight

    weight = dequantize_weight(layer.weight_int8, layer.weight_scale, dtype)
    bias = layer.bias is not None
    if isinstance(layer, Int8Linear):
        new = nn.Linear(layer.in_features, layer.out_features, bias=bias, device="meta")
    else:
        new = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=bias,
            device="meta",
        )
    new.weight = nn.Parameter(weight, requires_grad=False)
    if bias:
        new.bias = layer.bias
    return new


def _layer_kind(mode: str, layer: nn.Module) -> str:
    """How one layer runs in ``mode``: int8 kernels take Linear layers only (and
    ``"qlinear_dynamic"`` only those large enough to pay); the rest run as float."""
    if mode not in (INT_MM, QLINEAR):
        return mode
    if not isinstance(layer, Int8Linear):
        return FLOAT_ONCE
    if mode == QLINEAR and layer.weight_int8.numel() < MIN_QLINEAR_WEIGHTS:
        return FLOAT_ONCE
    return mode


def _compute_dtype(unet: nn.Module) -> torch.dtype:
    """The UNet's float dtype (that of its first floating-point parameter)."""
    for param in unet.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32
