"""The diffusers pipeline classes fragjobs supports, and what differs between them.

Every technique works on the UNet (``UNet2DConditionModel``) and the pipeline calls it, so
the families differ only where fragjobs reads the text side itself: which tokenizer and text
encoder give the pooled prompt embedding (the similar-prompt lookup and the paraphrase
similarity) and which output field holds it. Everything else — the UNet's added conditioning
(SDXL's ``added_cond_kwargs``), both encoders' cross-attention context — is the pipeline's
own business, because fragjobs never calls the UNet outside its pipeline. A new family is
one more :class:`PipelineFamily` here (and its tests); a pipeline of any other class is
refused before its weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fragjobs.errors import UnknownModelError


@dataclass(frozen=True)
class PipelineFamily:
    """One supported pipeline class.

    Args:
        pipeline_class: the diffusers class name (``_class_name`` in ``model_index.json``).
        label: what users call it, for messages.
        pooled_tokenizer, pooled_encoder: the pipeline components whose pooled output is the
            prompt's embedding.
        pooled_output: the encoder output's field holding it (``None``: the mean of the last
            hidden state when the encoder has no such field).
    """

    pipeline_class: str
    label: str
    pooled_tokenizer: str = "tokenizer"
    pooled_encoder: str = "text_encoder"
    pooled_output: str = "pooler_output"


FAMILIES: tuple[PipelineFamily, ...] = (
    PipelineFamily("StableDiffusionPipeline", "SD 1.x/2.x"),
    # SDXL's pooled embedding is the second encoder's projected one: what the UNet receives
    # as ``text_embeds``, and the stronger of its two encoders.
    PipelineFamily(
        "StableDiffusionXLPipeline",
        "SDXL",
        pooled_tokenizer="tokenizer_2",
        pooled_encoder="text_encoder_2",
        pooled_output="text_embeds",
    ),
)
_BY_CLASS = {family.pipeline_class: family for family in FAMILIES}


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
