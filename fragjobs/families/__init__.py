"""The supported pipeline families, and the questions the techniques ask about them.

One adapter module per family (:mod:`fragjobs.families.sd`: SD 1.x/2.x and SDXL on the UNet
layout of :mod:`fragjobs.families.unet`; :mod:`fragjobs.families.pixart`: PixArt-α, a
diffusion transformer), each a :class:`~fragjobs.families.base.PipelineFamily`. The
techniques and the chain ask here — which component is the denoiser, which modules are its
blocks and in what order, how they pair into levels, whether a skipped block reuses its output
or its residual — and never branch on the family. A new family is one more module and its
entry in :data:`FAMILIES`; a pipeline of any other class is refused before its weights are
loaded, with the supported ones named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from fragjobs.errors import InvalidInputError, UnknownModelError
from fragjobs.families.base import PipelineFamily
from fragjobs.families.pixart import PIXART_ALPHA
from fragjobs.families.sd import SD, SDXL

FAMILIES: tuple[PipelineFamily, ...] = (SD, SDXL, PIXART_ALPHA)
_BY_CLASS = {family.pipeline_class: family for family in FAMILIES}
_BY_DENOISER: dict[str, PipelineFamily] = {}
for _family in FAMILIES:  # the first family of each denoiser class (SD and SDXL share one)
    _BY_DENOISER.setdefault(_family.denoiser_class, _family)

__all__ = [
    "FAMILIES",
    "SD",
    "SDXL",
    "PIXART_ALPHA",
    "PipelineFamily",
    "block_levels",
    "blocks_family",
    "denoiser",
    "denoiser_blocks",
    "denoiser_family",
    "execution_order",
    "family_of",
    "family_of_class",
    "first_block",
    "level_output_block",
    "level_output_blocks",
    "supported_pipelines",
]


def supported_pipelines() -> str:
    """The supported classes, for messages: ``StableDiffusionPipeline (SD 1.x/2.x), …``."""
    return ", ".join(f"{f.pipeline_class} ({f.label})" for f in FAMILIES)


def family_of_class(class_name: str | None, where: str) -> PipelineFamily:
    """The family of pipeline class ``class_name``, found in ``where`` (for the message).

    Raises:
        UnknownModelError: the class is not supported (one line naming the supported ones).
    """
    family = _BY_CLASS.get(class_name or "")
    if family is None:
        raise UnknownModelError(
            f"{where} is a {class_name or 'pipeline of unknown class'}, which fragjobs does not "
            f"support; supported: {supported_pipelines()}"
        )
    return family


def family_of(pipe: Any) -> PipelineFamily:
    """The family of a loaded pipeline (by its class or a supported base class).

    Raises:
        UnknownModelError: the pipeline's class is not supported.
    """
    for cls in type(pipe).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    return family_of_class(type(pipe).__name__, "this pipeline")


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser, the module fragjobs profiles and edits (UNet or transformer).

    Raises:
        UnknownModelError: the pipeline's class is not supported, or it has no denoiser.
    """
    family = family_of(pipe)
    module = getattr(pipe, family.denoiser, None)
    if module is None:
        raise UnknownModelError(f"this {family.label} pipeline has no {family.denoiser}")
    return module


def denoiser_family(module: torch.nn.Module) -> PipelineFamily:
    """A family whose denoiser class ``module`` is (the layout is what matters: SD and SDXL
    share theirs).

    Raises:
        UnknownModelError: not a supported denoiser class.
    """
    for cls in type(module).__mro__:
        if cls.__name__ in _BY_DENOISER:
            return _BY_DENOISER[cls.__name__]
    supported = ", ".join(sorted(_BY_DENOISER))
    raise UnknownModelError(
        f"{type(module).__name__} is not a denoiser fragjobs supports; supported: {supported}"
    )


def denoiser_blocks(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The denoiser's blocks by qualified name, in execution order."""
    return denoiser_family(module).blocks(module)


def blocks_family(names: Any) -> PipelineFamily:
    """The family whose block names ``names`` are (all of them).

    Raises:
        InvalidInputError: no family has blocks of these names.
    """
    names = list(names)
    for family in FAMILIES:
        if names and all(family.block_key(n) is not None for n in names):
            return family
    raise InvalidInputError(f"not the block names of a supported denoiser: {sorted(names)}")


def execution_order(names: Any) -> list[str]:
    """Block names sorted in the order the denoiser runs them."""
    names = list(names)
    return sorted(names, key=blocks_family(names).block_key)


def block_levels(names: Any) -> dict[str, int]:
    """Depth level of each block (0: shallowest), by the family's pairing of its blocks.

    Raises:
        InvalidInputError: not the blocks of a supported denoiser, or not a complete set.
    """
    names = list(names)
    return blocks_family(names).block_levels(names)


def first_block(names: Any) -> str:
    """The block that runs first (the run-time probe's)."""
    return execution_order(names)[0]


def level_output_blocks(names: Any) -> list[str]:
    """The block handing on each level's result (a UNet's up blocks, a transformer's later
    half), in execution order: the blocks whose skipped outputs are worth forecasting."""
    levels = block_levels(names)
    return execution_order(level_output_block(levels, lv) for lv in sorted(set(levels.values())))


def level_output_block(levels: dict[str, int], level: int) -> str:
    """The block that hands a level's result on: its last in execution order (a UNet's up
    block, a transformer's later block of the pair)."""
    return execution_order([b for b, lv in levels.items() if lv == level])[-1]
