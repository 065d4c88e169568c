"""``BatchGenerator``: seed variants of a prompt as a ComfyUI ``IMAGE`` batch (step 4)."""

from __future__ import annotations

import logging
import math
from typing import Any

from fragjobs.comfy_nodes.handles import MODEL_TYPE, FragjobsModel
from fragjobs.comfy_nodes.progress import NodeProgress
from fragjobs.comfy_nodes.seed_lists import parse_seed_list, seed_list_error
from fragjobs.errors import FragmentError, InvalidInputError
from fragjobs.keys import normalise_prompt

log = logging.getLogger("fragjobs")


class BatchGenerator:
    """Generate one image per seed, with the model's fragment if one is loaded.

    With a fragment this is ``fragjobs generate --key KEY --seeds ...``: the same call
    (:func:`fragjobs.chain.generate`), so the same images, the job recorded in the catalog and
    its PNGs in the store. Without one the full model runs with the same generation code.
    Each image comes from its own ``torch.Generator`` seeded with its seed, so a seed gives
    the same image whatever else is in the list.
    """

    CATEGORY = "fragjobs"
    DESCRIPTION = (
        "Generate seed variants of the prompt (one image per seed) with the loaded fragment, "
        "or the full model; an IMAGE batch for SaveImage / PreviewImage."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("One image per seed, in the order of seed_list.",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From FragmentLoader or ProfilerModelLoader."}),
                "prompt": (
                    "STRING",
                    {"multiline": True, "default": "a red circle on the left"},
                ),
                "seed_list": (
                    "STRING",
                    {"default": "0-3", "tooltip": 'Seeds: "1,2,3", a range "0-7", or both.'},
                ),
                "steps": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 1000,
                        "tooltip": "0: the fragment's (or the model's default). A fragment "
                        "runs only at the steps it was profiled with.",
                    },
                ),
                "guidance": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 30.0,
                        "step": 0.5,
                        "tooltip": "Classifier-free guidance; 0: the fragment's (or the "
                        "model's default).",
                    },
                ),
                "batch_size": (
                    "INT",
                    {"default": 4, "min": 1, "max": 64, "tooltip": "Images per pipeline call."},
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, seed_list: str | None = None) -> bool | str:
        """Reject a malformed seed list before anything runs (an empty prompt fails at run
        time: a linked prompt is not known before). ComfyUI reports the message under every
        input this method names, so it names one."""
        return seed_list_error(seed_list)

    def generate(
        self,
        model: FragjobsModel,
        prompt: str,
        seed_list: str,
        steps: int,
        guidance: float,
        batch_size: int,
    ) -> tuple[Any]:
        from fragjobs import chain

        normalise_prompt(prompt)
        ws = chain.workspace()
        seeds = parse_seed_list(seed_list, max_seeds=ws.settings.max_variants)
        loaded = chain.base(model.model, ws.settings)
        if model.fragment_key is not None:
            images = _with_fragment(ws, loaded, model, prompt, seeds, steps, guidance, batch_size)
        else:
            images = _with_full_model(loaded, prompt, seeds, steps, guidance, batch_size)
        # ComfyUI's IMAGE: float (B, H, W, C) in [0, 1] on the CPU.
        return (images.permute(0, 2, 3, 1).contiguous().float().cpu(),)


def _with_fragment(ws, loaded, model, prompt, seeds, steps, guidance, batch_size):
    """The images of :func:`fragjobs.chain.generate` with the model's fragment."""
    from fragjobs import chain
    from fragjobs.families import denoiser

    key = model.fragment_key
    _check_fragment_settings(model, steps, guidance)
    try:
        # Built (or found warm) here, before the hooks go on: generate then finds it warm and
        # no hooked UNet is deep-copied.
        _manifest, unet = chain.warm_fragment_unet(ws, loaded, ws.catalog.get_fragment(key))
    except FragmentError:
        unet = None  # generate falls back to the full model and says why
    progress = NodeProgress(total=math.ceil(len(seeds) / batch_size) * model.fragment_steps)

    def batch_done(done: int, _total: int) -> None:
        progress.update(math.ceil(done / batch_size) * model.fragment_steps)
        progress.check_interrupt()

    with progress.per_unet_call(denoiser(loaded.pipe), unet):
        result = chain.generate(
            prompt,
            seeds=seeds,
            model=model.model,
            key=key,
            batch_size=batch_size,
            ws=ws,
            progress=False,
            progress_callback=batch_done,
        )
    if result.used_fallback:
        log.warning("BatchGenerator: full model used: %s", result.fallback_reason)
    log.info("BatchGenerator: job %s, %d images with %s", result.job_id, len(seeds), key)
    return result.images


def _with_full_model(loaded, prompt, seeds, steps, guidance, batch_size):
    """The full model's images, made as ``fragjobs generate`` makes them without a fragment."""
    import torch

    from fragjobs.families import denoiser
    from fragjobs.generation import GenerationConfig, generate_images

    info = loaded.info
    gen = GenerationConfig(
        steps=steps or info.default_steps,
        guidance_scale=guidance or info.default_guidance,
        height=info.height,
        width=info.width,
        batch_size=batch_size,
    )
    progress = NodeProgress(total=math.ceil(len(seeds) / batch_size) * gen.steps)
    out = []
    with progress.per_unet_call(denoiser(loaded.pipe)):
        for start in range(0, len(seeds), batch_size):
            progress.check_interrupt()
            out.append(generate_images(loaded.pipe, prompt, seeds[start : start + batch_size], gen))
    return torch.cat(out)


def _check_fragment_settings(model: FragjobsModel, steps: int, guidance: float) -> None:
    """A fragment runs at the steps and guidance it was profiled with: 0 or those values."""
    wrong = []
    if steps and steps != model.fragment_steps:
        wrong.append(f"steps {steps} (it needs {model.fragment_steps})")
    if guidance and guidance != model.fragment_guidance:
        wrong.append(f"guidance {guidance} (it needs {model.fragment_guidance})")
    if wrong:
        raise InvalidInputError(
            f"fragment {model.fragment_key} was profiled at {model.fragment_steps} steps, "
            f"guidance {model.fragment_guidance}, and its caching schedule only holds there; "
            f"got {' and '.join(wrong)}: set steps and guidance to 0 (the fragment's) or to "
            "those values"
        )
