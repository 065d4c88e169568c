"""Build a built-in pipeline while keeping only some of its denoiser's tensors.

The denoiser is the pipeline family's (:func:`fragjobs.families.denoiser`: a UNet or a
transformer); "UNet" below stands for either.

A built-in's weights are its modules' default initialisation under a fixed seed, so they
exist only by running the build. :func:`unet_layout` runs it once with every parameter on
the meta device (``accelerate.init_empty_weights``: no memory, no random draws) and records
the order in which modules are attached to their parents. :func:`build_keeping` runs it for
real with a global module-registration hook: when a UNet module is attached, its own
initialisation is finished (and has drawn its numbers from the seeded generator), so the hook
keeps the tensors asked for (or the rows/columns asked for) and puts the rest on the meta
device. The process holds the kept tensors plus one module's at a time, never the whole UNet;
the random stream, and so every tensor, is the one the plain build makes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from fragjobs.errors import FragjobsError
from fragjobs.families import denoiser
from fragjobs.generation.memory import release_freed_heap

Selection = tuple[int, torch.Tensor] | None
"""Which part of a tensor to keep: ``None`` all of it, ``(dim, index)`` those rows/columns."""


def select_tensor(tensor: torch.Tensor, selection: Selection) -> torch.Tensor:
    """``tensor`` itself (``None``) or its ``index`` along ``dim`` (a copy)."""
    if selection is None:
        return tensor
    dim, index = selection
    return tensor.index_select(dim, index.to(tensor.device))


@dataclass(frozen=True)
class UnetLayout:
    """A built-in's UNet on the meta device and, per module attached during the build, in
    order, its qualified name in that UNet (``None``: not part of the UNet) and type."""

    skeleton: nn.Module
    attached: tuple[tuple[str | None, str], ...]


def unet_layout(build: Callable[[], Any]) -> UnetLayout:
    """Run ``build`` with every parameter on the meta device; its UNet and attach order."""
    from accelerate import init_empty_weights

    children: list[nn.Module] = []

    def record(parent: nn.Module, name: str, child: nn.Module | None) -> None:
        if child is not None:
            children.append(child)

    handle = register_module_module_registration_hook(record)
    try:
        with init_empty_weights():
            pipe = build()
    finally:
        handle.remove()
    unet = denoiser(pipe)
    names = {id(module): name for name, module in unet.named_modules()}
    attached = tuple((names.get(id(c)), type(c).__name__) for c in children)
    return UnetLayout(unet, attached)


def build_keeping(
    build: Callable[[], Any], layout: UnetLayout, wanted: Mapping[str, Selection]
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run ``build`` for real, keeping of its UNet only the ``wanted`` tensors.

    Returns:
        The pipeline (its UNet's tensors all on the meta device: replace the denoiser) and
        ``{state-dict name: tensor or its selected rows/columns}``.

    Raises:
        FragjobsError: the build attached other modules than its layout recorded, or a
            wanted tensor was never made (the built-in's code changed; load it in full).
    """
    kept: dict[str, torch.Tensor] = {}
    position = 0

    def empty_out(module: nn.Module, prefix: str) -> None:
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or tensor.is_meta:
                    continue
                key = f"{prefix}{name}"
                if key in wanted:
                    kept[key] = select_tensor(tensor.detach(), wanted[key])
                meta = torch.empty_like(tensor, device="meta")
                if store is module._parameters:
                    meta = nn.Parameter(meta, tensor.requires_grad)
                store[name] = meta

    def on_attach(parent: nn.Module, name: str, child: nn.Module | None) -> None:
        nonlocal position
        if child is None:
            return
        expected = layout.attached[position] if position < len(layout.attached) else None
        if expected is None or expected[1] != type(child).__name__:
            raise FragjobsError(_DIVERGED)
        qualified = expected[0]
        position += 1
        if qualified is not None:
            empty_out(child, f"{qualified}." if qualified else "")

    handle = register_module_module_registration_hook(on_attach)
    try:
        pipe = build()
    finally:
        handle.remove()
    empty_out(denoiser(pipe), "")
    missing = sorted(set(wanted) - set(kept))
    if position != len(layout.attached) or missing:
        raise FragjobsError(_DIVERGED + (f" (never made: {missing[:3]})" if missing else ""))
    release_freed_heap()
    return pipe, kept


_DIVERGED = (
    "the built-in model's build did not follow its recorded layout; load it in full "
    "(fragjobs.load_base) instead of streaming its UNet"
)
