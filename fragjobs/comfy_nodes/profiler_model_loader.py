"""``ProfilerModelLoader``: load a base model and profile it on a prompt (the chain's step 1)."""

from __future__ import annotations

from typing import Any

from fragjobs.comfy_nodes.handles import MODEL_TYPE, PROFILE_TYPE, FragjobsModel, ProfilingData
from fragjobs.comfy_nodes.model_choices import model_choices, resolve_model
from fragjobs.comfy_nodes.progress import NodeProgress
from fragjobs.comfy_nodes.seed_lists import parse_seed_list, seed_list_error
from fragjobs.keys import normalise_prompt


class ProfilerModelLoader:
    """Load a fragjobs base model and record how it works on a prompt.

    Outputs the model (for :class:`FragmentLoader` or :class:`BatchGenerator`) and the
    profiling data (for :class:`FragmentExtractor`). Profiling is stored in the library
    (``FRAGJOBS_*`` settings) and reused when the same profile is asked again.
    """

    CATEGORY = "fragjobs"
    DESCRIPTION = (
        "Load a base model (a fragjobs built-in or a diffusers folder) and profile it on the "
        "prompt: per-head and per-block statistics, stored in the fragjobs library."
    )
    RETURN_TYPES = (MODEL_TYPE, PROFILE_TYPE)
    RETURN_NAMES = ("model", "profiling_data")
    OUTPUT_TOOLTIPS = (
        "The full base model.",
        "The stored profile, for FragmentExtractor (empty when profiling is off).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model_name": (
                    model_choices(),
                    {"tooltip": "fragjobs built-in, or a diffusers folder in models/diffusers"},
                ),
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "a red circle on the left",
                        "tooltip": "The prompt to profile (and later generate variants of).",
                    },
                ),
                "profiling_enabled": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Off: only load the model."},
                ),
                "steps": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 1000,
                        "tooltip": "Denoising steps of profiling, and so of the fragment "
                        "(0: the model's default).",
                    },
                ),
                "profile_seeds": (
                    "STRING",
                    {"default": "0-3", "tooltip": 'Seeds profiled, e.g. "0-3" or "0,1,2,3".'},
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, profile_seeds: str | None = None) -> bool | str:
        """Reject a malformed seed list before anything runs (an empty prompt fails at run
        time: a linked prompt is not known before). ComfyUI reports the message under every
        input this method names, so it names one."""
        return seed_list_error(profile_seeds)

    def load(
        self,
        model_name: str,
        prompt: str,
        profiling_enabled: bool,
        steps: int,
        profile_seeds: str,
    ) -> tuple[FragjobsModel, ProfilingData]:
        from fragjobs import chain
        from fragjobs.families import denoiser

        if profiling_enabled:
            normalise_prompt(prompt)
        ws = chain.workspace()
        seeds = parse_seed_list(profile_seeds, max_seeds=ws.settings.max_variants)
        model = resolve_model(model_name)
        loaded = chain.base(model, ws.settings)
        handle = FragjobsModel(model=model, name=loaded.info.name, sha256=loaded.info.sha256)
        if not profiling_enabled:
            return handle, ProfilingData(None, model, prompt.strip())
        progress = NodeProgress(total=steps or loaded.info.default_steps)
        with progress.per_unet_call(denoiser(loaded.pipe)):
            result = chain.profile(
                prompt, model=model, seeds=seeds, steps=steps or None, ws=ws, progress=False
            )
        progress.finish()
        return handle, ProfilingData(result.profile_id, model, prompt.strip(), result.reused)
