"""The Stable Diffusion families: SD 1.x/2.x and SDXL, both on the UNet layout.

They differ only in the text side fragjobs reads itself: SDXL's pooled prompt embedding is
its second encoder's projected one (what its UNet receives as ``text_embeds``). Its added
time/text conditioning and the two encoders' cross-attention context are the pipeline's own
business, because fragjobs never calls the UNet outside its pipeline.
"""

from __future__ import annotations

from fragjobs.families import unet
from fragjobs.families.base import PipelineFamily

_UNET = {
    "denoiser": "unet",
    "denoiser_class": "UNet2DConditionModel",
    "blocks": unet.unet_blocks,
    "block_key": unet.block_key,
    "block_levels": unet.block_levels,
    "residual_cache": False,
    "sample_bytes": unet.unet_sample_bytes,
}

SD = PipelineFamily("StableDiffusionPipeline", "SD 1.x/2.x", **_UNET)
SDXL = PipelineFamily(
    "StableDiffusionXLPipeline",
    "SDXL",
    **_UNET,
    pooled_tokenizer="tokenizer_2",
    pooled_encoder="text_encoder_2",
    pooled_output="text_embeds",
)
