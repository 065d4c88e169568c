"""``FragmentExtractor``: extract a profile's fragment and gate it (the chain's steps 2 and 3)."""

from __future__ import annotations

import logging
import platform
import statistics
from typing import Any

from fragjobs.comfy_nodes.handles import FRAGMENT_TYPE, PROFILE_TYPE, FragmentMetadata
from fragjobs.comfy_nodes.progress import NodeProgress
from fragjobs.comfy_nodes.seed_lists import parse_seed_list, seed_list_error
from fragjobs.config import get_settings
from fragjobs.errors import InvalidInputError
from fragjobs.keys import check_fraction

log = logging.getLogger("fragjobs")


class FragmentExtractor:
    """Extract the prompt's fragment from its profile and validate it against the full model.

    Climbs the same gate ladder as ``fragjobs run`` (a failing fragment is followed by more
    conservative ones); the fragment and its verdict land in the library, so ``fragjobs
    generate --key``, the farm and :class:`FragmentLoader` find it by its key.
    """

    CATEGORY = "fragjobs"
    DESCRIPTION = (
        "Extract the prompt-specialised fragment from the profile (head pruning, low-rank, "
        "int8, block caching), validate it against the full model and store it."
    )
    RETURN_TYPES = (FRAGMENT_TYPE, "STRING")
    RETURN_NAMES = ("fragment_metadata", "summary")
    OUTPUT_TOOLTIPS = (
        "Key, gate verdict, speed-up and heads kept, for FragmentLoader.",
        "The same as one line of text.",
    )
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        settings = get_settings()
        return {
            "required": {
                "profiling_data": (PROFILE_TYPE, {"tooltip": "From ProfilerModelLoader."}),
                "extraction_threshold": (
                    "FLOAT",
                    {
                        "default": settings.default_threshold,
                        "min": 0.01,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Fraction of attention heads kept, in (0, 1].",
                    },
                ),
                "fidelity": (
                    "FLOAT",
                    {
                        "default": settings.default_fidelity,
                        "min": 0.01,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "SSIM against the full model the fragment keeps on every "
                        "profiling seed, in (0, 1].",
                    },
                ),
                "caching": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Search a block-caching schedule."},
                ),
                "validation_seeds": (
                    "STRING",
                    {"default": "1000-1003", "tooltip": "Seeds the quality gate judges on."},
                ),
                "measure_speedup": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Time full model and fragment (warm, one image) and store "
                        "the speed-up in the manifest.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, validation_seeds: str | None = None) -> bool | str:
        """Reject a malformed seed list before anything runs (ComfyUI checks the threshold
        and fidelity against their widgets' bounds; the run checks them again)."""
        return seed_list_error(validation_seeds)

    def extract(
        self,
        profiling_data: Any,
        extraction_threshold: float,
        fidelity: float,
        caching: bool,
        validation_seeds: str,
        measure_speedup: bool,
    ) -> tuple[FragmentMetadata, str]:
        from fragjobs import chain

        if getattr(profiling_data, "profile_id", None) is None:
            raise InvalidInputError(
                "no profile to extract from: turn profiling_enabled on in ProfilerModelLoader, "
                "or load a stored fragment by its key in FragmentLoader"
            )
        check_fraction(extraction_threshold, "extraction_threshold")
        check_fraction(fidelity, "fidelity")
        ws = chain.workspace()
        seeds = parse_seed_list(validation_seeds, max_seeds=ws.settings.max_variants)
        config = chain.extraction_config(extraction_threshold, fidelity=fidelity, caching=caching)
        progress = NodeProgress(total=2 if measure_speedup else 1)
        progress.check_interrupt()
        ext, val, attempts = chain.extract_and_validate(
            profiling_data.profile_id,
            config,
            seeds=seeds,
            ws=ws,
            model=profiling_data.model,
            progress=False,
        )
        progress.advance()
        manifest = val.manifest
        speedup = manifest.performance.measured_speedup if manifest.performance else None
        if measure_speedup and val.passed and speedup is None:
            progress.check_interrupt()
            speedup = measure_fragment_speedup(ext.key, ws)
        progress.finish()
        row = ws.catalog.get_fragment(ext.key)
        metadata = FragmentMetadata(
            key=ext.key,
            model=profiling_data.model,
            prompt=row.prompt,
            passed=val.passed,
            status=row.status,
            ssim=val.metrics.ssim,
            heads_kept=manifest.pruning.heads_kept,
            heads_total=manifest.pruning.heads_total,
            caching=manifest.dynamic_routing.enabled,
            speedup=speedup,
            attempts=len(attempts),
        )
        log.info("FragmentExtractor: %s", metadata.summary())
        return metadata, metadata.summary()


def measure_fragment_speedup(key: str, ws: Any) -> float:
    """Time the full model and fragment ``key`` (warm, one image, the fragment's settings),
    record the figures in its manifest's performance layer and return full / fragment."""
    import torch

    from fragjobs import chain
    from fragjobs.chain.validate_step import generation_config
    from fragjobs.generation import interleaved_latency_ms, with_unet
    from fragjobs.manifest import PerformanceLayer

    row = ws.catalog.get_fragment(key)
    loaded = chain.base_of(ws.catalog.get_base_model(row.base_model_id), ws.settings)
    manifest, unet = chain.warm_fragment_unet(ws, loaded, row)
    gen = generation_config(manifest, batch_size=1)
    prompt = manifest.profiling.prompt
    full, fragment = interleaved_latency_ms(
        [loaded.pipe, with_unet(loaded.pipe, unet)], prompt, gen
    )
    full_ms, fragment_ms = statistics.median(full), statistics.median(fragment)
    device = loaded.pipe.device
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    chain.record_performance(
        key,
        PerformanceLayer(
            device=f"{device.type}: {where}",
            steps=gen.steps,
            batch_size=gen.batch_size,
            measured_latency_full_ms=round(full_ms, 3),
            measured_latency_fragment_ms=round(fragment_ms, 3),
            measured_speedup=round(full_ms / fragment_ms, 4),
        ),
        ws,
    )
    return round(full_ms / fragment_ms, 4)
