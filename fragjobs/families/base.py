"""What one denoiser family is: the shape of a pipeline-family adapter.

A :class:`PipelineFamily` says everything fragjobs needs to know about a diffusers pipeline
class that differs from one family to another: which component is the denoiser (``unet`` or
``transformer``) and its class, which of its modules are the *blocks* the caching schedule
skips and how they pair into depth levels, whether a skipped block reuses its output or its
residual, how the prompt's pooled embedding is read, the text length the denoiser attends
to, what the pipeline must be called with, and a rough memory estimate per image. The
techniques (profiling, head pruning, low-rank, int8, caching) and the chain ask the family
through :mod:`fragjobs.families`; they never branch on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BlockKey = Callable[[str], "tuple[int, int] | None"]
"""A block name → its place in execution order (``None``: not a block of this family)."""

SampleBytes = Callable[..., int]
"""``(config, latent_h, latent_w, *, element_bytes, guidance, sliced)`` → estimated bytes of
activations one image adds in the denoiser (see :func:`fragjobs.generation.budget`)."""


@dataclass(frozen=True)
class PipelineFamily:
    """One supported pipeline class and how fragjobs handles it.

    Args:
        pipeline_class: the diffusers class name (``_class_name`` in ``model_index.json``).
        label: what users call it, for messages.
        denoiser: the pipeline component fragjobs edits (``"unet"``, ``"transformer"``).
        denoiser_class: its diffusers class name (built empty from its config).
        blocks: the denoiser's blocks by qualified name, in execution order.
        block_key: sorts block names into execution order; ``None`` for other families'.
        block_levels: block name → depth level (level 0 is the shallowest; a deeper level
            is recomputed only on steps where every shallower one is).
        residual_cache: a skipped block returns its input plus its cached residual (blocks
            in sequence, a transformer's) instead of its cached output (a UNet's).
        pooled_tokenizer, pooled_encoder: the components whose pooled output is the prompt's
            embedding; ``pooled_output``: the output field holding it (``None``: the mean of
            the last hidden state, for encoders without one).
        text_tokens: how many text tokens the pipeline encodes (``None``: the tokenizer's
            ``model_max_length``).
        call_kwargs: extra arguments of every pipeline call.
        sample_bytes: the per-image activation estimate of the denoiser.
    """

    pipeline_class: str
    label: str
    denoiser: str
    denoiser_class: str
    blocks: Callable[[torch.nn.Module], dict[str, torch.nn.Module]]
    block_key: BlockKey
    block_levels: Callable[[list[str]], dict[str, int]]
    residual_cache: bool
    sample_bytes: SampleBytes
    pooled_tokenizer: str = "tokenizer"
    pooled_encoder: str = "text_encoder"
    pooled_output: str | None = "pooler_output"
    text_tokens: int | None = None
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
