"""Build a fragment's UNet without first holding the base UNet it edits.

:func:`build_fragment_unet` takes the base UNet on the meta device (structure, no weights),
replays the fragment's structural edits on it (pruned heads, low-rank factors, int8 layers:
shapes only), then gives every tensor of the result its values: int8 weights, scales and
low-rank factors straight from the fragment's tensors, the rest from the base through a
reader that returns only what is asked for, and of a pruned projection only the kept
rows/columns. The int8 layers then get their execution mode
(:mod:`fragjobs.extraction.int8_exec`: an int8 matmul where the device has a fast one, else
dequantised once, float weights held; ``int8_execution="dequantize"`` keeps int8 only). The
result computes what :func:`~fragjobs.extraction.fragment.apply_fragment_to_unet_` makes on
a copy of the base (bit-identical except in ``"int_mm"``, whose activations are int8 too).

Readers: :func:`module_reader` (a loaded base UNet; the fragment shares its unchanged
tensors, copying nothing) and those of :func:`fragjobs.base_models.load_base` with ``unet=``
(a folder's safetensors files, a built-in's seeded build). :func:`load_fragment_pipeline` is
the base pipeline with the fragment's UNet, loaded so (the base UNet's weights never all in
memory), optionally with diffusers' group offloading or layerwise casting on the UNet.

Example::

    loaded = load_fragment_pipeline("sd15-shape", load_fragment_folder(folder))
    images = loaded.pipe("a red circle", num_inference_steps=8).images
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fragjobs.base_folders import UnetReader
from fragjobs.base_models import LoadedBase, load_base
from fragjobs.builtin.streaming import Selection, select_tensor
from fragjobs.config import Settings
from fragjobs.errors import BaseModelMismatchError, FragmentIntegrityError, InvalidInputError
from fragjobs.extraction.caching import apply_block_caching, caching_schedule
from fragjobs.extraction.fragment import Fragment, check_base
from fragjobs.extraction.heads import (
    apply_head_pruning_,
    head_pruning_selections,
    load_head_pruning,
)
from fragjobs.extraction.int8 import INT8, INT8_TENSOR, apply_int8_, load_int8_tensors
from fragjobs.extraction.int8_exec import AUTO, set_int8_execution_
from fragjobs.extraction.lowrank import (
    LOW_RANK_TENSOR,
    install_low_rank_,
    load_low_rank_tensors,
)
from fragjobs.families import family_of

GROUP_OFFLOAD_TYPES = ("block_level", "leaf_level")


@dataclass(frozen=True)
class UnetPlacement:
    """How the fragment's UNet sits on the device, with diffusers' own hooks.

    Args:
        group_offload: ``None`` (the UNet moves to the device whole), ``"block_level"`` or
            ``"leaf_level"``: ``diffusers.hooks.apply_group_offloading`` keeps the UNet on
            the CPU and moves groups of layers to the device only while they run.
        blocks_per_group: blocks moved together with ``"block_level"``.
        storage_dtype: with ``diffusers.hooks.apply_layerwise_casting``, float weights are
            stored in this dtype (e.g. ``torch.float8_e4m3fn``) and cast to the pipeline's
            dtype per layer while it runs; int8 layers are left as they are.
    """

    group_offload: str | None = None
    blocks_per_group: int = 1
    storage_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.group_offload not in (None, *GROUP_OFFLOAD_TYPES):
            raise InvalidInputError(
                f"group_offload must be one of {GROUP_OFFLOAD_TYPES} or None, "
                f"got {self.group_offload!r}"
            )
        if not isinstance(self.blocks_per_group, int) or self.blocks_per_group < 1:
            raise InvalidInputError(
                f"blocks_per_group must be a positive int, got {self.blocks_per_group!r}"
            )


def module_reader(unet: nn.Module) -> UnetReader:
    """Reads a loaded UNet's tensors; unselected ones are shared with it, not copied."""
    state = unet.state_dict()

    def read(wanted: Mapping[str, Selection]) -> dict[str, torch.Tensor]:
        return {k: select_tensor(state[k], sel) for k, sel in wanted.items() if k in state}

    return read


def empty_unet_like(unet: nn.Module) -> nn.Module:
    """A UNet of ``unet``'s class and config with its parameters on the meta device."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return type(unet).from_config(unet.config)


@torch.no_grad()
def build_fragment_unet(
    skeleton: nn.Module, fragment: Fragment, read: UnetReader, *, int8_execution: str = AUTO
) -> nn.Module:
    """The fragment's UNet, made from the base UNet on the meta device (edited in place).

    Args:
        skeleton: the base UNet with its parameters on the meta device (e.g. built from its
            config under ``accelerate.init_empty_weights``).
        fragment: the fragment (its base already checked, see :func:`check_base`).
        read: the base's tensors (:data:`~fragjobs.base_folders.UnetReader`); asked once,
            for exactly the tensors the fragment keeps from the base.
        int8_execution: how int8 layers compute
            (:func:`~fragjobs.extraction.int8_exec.set_int8_execution_`): ``"auto"`` (an
            int8 matmul where the device has a fast one, else dequantised once at load),
            ``"int_mm"``, ``"float"`` or ``"dequantize"`` (int8 held, dequantised per call).
            The mode used is logged and read back with
            :func:`~fragjobs.extraction.int8_exec.int8_execution`.

    Returns:
        ``skeleton``, now the fragment's UNet on the reader's device, with its base's float
        dtype (int8 layers as ``int8_execution`` says, scales as stored).

    Raises:
        FragmentIntegrityError: the fragment's tensors do not fit its manifest.
        BaseModelMismatchError: the base lacks a tensor the fragment keeps from it.
    """
    tensors, compression = fragment.tensors, fragment.manifest.compression
    shapes = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    pruning = load_head_pruning(tensors)
    selections = head_pruning_selections(skeleton, pruning)
    apply_head_pruning_(skeleton, pruning)
    low_rank = dict(compression.low_rank.layers) if compression.low_rank is not None else {}
    precision = compression.int8.precision_map if compression.int8 is not None else {}
    try:
        if low_rank:
            install_low_rank_(skeleton, load_low_rank_tensors(shapes, low_rank))
        if compression.int8 is not None:
            apply_int8_(skeleton, load_int8_tensors(shapes, precision))
    except KeyError as exc:
        raise FragmentIntegrityError(f"{fragment.key}: the file lacks tensor {exc}") from None

    from_fragment = _fragment_names(low_rank, precision)
    keys = list(skeleton.state_dict(keep_vars=True))
    base = read({k: selections.get(k) for k in keys if k not in from_fragment})
    missing = [k for k in keys if k not in from_fragment and k not in base]
    if missing:
        raise BaseModelMismatchError(
            f"fragment {fragment.key}: the base UNet has no tensor {missing[0]} "
            f"({len(missing)} missing); it is not the fragment's base"
        )
    floats = [t for t in base.values() if t.is_floating_point()]
    device = floats[0].device if floats else torch.device("cpu")
    dtype = floats[0].dtype if floats else torch.float32
    state = {}
    for key in keys:
        if key in base:
            state[key] = base[key]
            continue
        tensor = tensors[from_fragment[key]].to(device)
        low_rank_factor = from_fragment[key].startswith(LOW_RANK_TENSOR.split("{", 1)[0])
        state[key] = tensor.to(dtype) if low_rank_factor else tensor
    skeleton.load_state_dict(state, strict=True, assign=True)
    set_int8_execution_(skeleton, int8_execution)
    schedule = caching_schedule(fragment.manifest)
    if schedule is not None:
        apply_block_caching(skeleton, schedule)
    return skeleton


def load_fragment_pipeline(
    model: str,
    fragment: Fragment,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    settings: Settings | None = None,
    placement: UnetPlacement | None = None,
    int8_execution: str = AUTO,
) -> LoadedBase:
    """The base pipeline ``model`` with the fragment's UNet, never holding the base UNet.

    The other components load as in :func:`~fragjobs.base_models.load_base`. ``placement``
    puts diffusers' group offloading or layerwise casting on the UNet; ``int8_execution``
    is :func:`build_fragment_unet`'s (read the mode used back with
    ``int8_execution(fragjobs.families.denoiser(loaded.pipe))``).

    Raises:
        BaseModelMismatchError: ``model`` is not the fragment's base (checked by sha256
            before any UNet tensor is read).
        FragmentIntegrityError: the fragment's tensors do not fit its manifest.
    """

    def build(info: Any, skeleton: nn.Module, read: UnetReader) -> nn.Module:
        check_base(fragment, info)
        return build_fragment_unet(skeleton, fragment, read, int8_execution=int8_execution)

    placement = placement or UnetPlacement()
    offloaded = placement.group_offload is not None
    loaded = load_base(
        model,
        device="cpu" if offloaded else device,
        dtype=dtype,
        settings=settings,
        unet=build,
    )
    place_unet(loaded, placement, device=device, settings=settings)
    return loaded


def place_unet(
    loaded: LoadedBase,
    placement: UnetPlacement,
    *,
    device: str | None = None,
    settings: Settings | None = None,
) -> None:
    """Put ``placement``'s diffusers hooks on a loaded pipeline's UNet (a no-op by default).

    With group offloading the other components move to ``device`` and the UNet stays on the
    CPU, its groups moved to ``device`` while they run.
    """
    from diffusers.hooks import apply_group_offloading, apply_layerwise_casting

    from fragjobs.base_models import resolve_device
    from fragjobs.config import get_settings

    pipe = loaded.pipe
    family = family_of(pipe)
    unet = getattr(pipe, family.denoiser)
    if placement.storage_dtype is not None:
        apply_layerwise_casting(
            unet, storage_dtype=placement.storage_dtype, compute_dtype=unet.dtype
        )
    if placement.group_offload is not None:
        target = resolve_device(device or (settings or get_settings()).device)
        for name, component in pipe.components.items():
            if name != family.denoiser and isinstance(component, nn.Module):
                component.to(target)
        apply_group_offloading(
            unet,
            onload_device=target,
            offload_device=torch.device("cpu"),
            offload_type=placement.group_offload,
            num_blocks_per_group=placement.blocks_per_group
            if placement.group_offload == "block_level"
            else None,
        )


def _fragment_names(low_rank: Mapping[str, Any], precision: Mapping[str, str]) -> dict[str, str]:
    """State-dict name in the fragment's UNet → name of the fragment tensor that fills it."""
    names = {}
    for layer in low_rank:
        for key, part in (("down.weight", "down"), ("up.weight", "up"), ("up.bias", "bias")):
            names[f"{layer}.{key}"] = LOW_RANK_TENSOR.format(layer=layer, part=part)
    for layer, kind in precision.items():
        if kind == INT8:
            names[f"{layer}.weight_int8"] = INT8_TENSOR.format(layer=layer, part="weight")
            names[f"{layer}.weight_scale"] = INT8_TENSOR.format(layer=layer, part="scale")
    return names
