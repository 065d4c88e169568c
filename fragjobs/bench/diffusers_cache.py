"""diffusers 0.42's cache hooks, fitted to a UNet pipeline (``StableDiffusionPipeline``).

The hooks (``diffusers.hooks``) are written for transformer denoisers whose pipelines wrap
each denoiser call in ``transformer.cache_context("cond")`` and reset the hooks' state after
each generation. A UNet has no ``CacheMixin`` and its pipeline does neither, so
:class:`DenoisingRunHook` (registered on the UNet, outermost) does it: it passes ``sample`` and
``timestep`` as keywords (FasterCache splits only batch-concatenated *keyword* inputs), sets the
cache context, exposes the current timestep to the hooks that ask for it, and resets every
stateful hook when a new generation starts (the timestep stops decreasing). The techniques
themselves are diffusers' own ``apply_*`` functions, with identifiers that name UNet modules:

* **TaylorSeer**: every resnet and transformer block of the down, mid and up blocks is
  forecast (``cache_identifiers``); its default patterns (``^transformer_blocks.*attn``)
  match nothing in a UNet.
* **PAB**: its default ``transformer_blocks`` patterns already find the UNet's self (attn1)
  and cross (attn2) attention; cross attention is broadcast twice as long as self attention.
* **MagCache**: on each Transformer2DModel (its ``transformer_blocks`` list holds the UNet's
  only repeated blocks), with magnitude ratios calibrated by its own calibration mode on the
  profiling seeds.
* **FasterCache**: the CFG unconditional branch is reused (``unconditional_batch_skip_range``);
  its attention reuse is filtered by fixed ``^blocks``/``^transformer_blocks`` patterns inside
  ``apply_faster_cache`` that no UNet module name matches, so only the CFG part runs.
* **First-Block-Cache**: needs a list of >= 2 same-shape transformer blocks; it is applied to
  each Transformer2DModel that has one, else the peer is unavailable with that reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.hooks import ModelHook

from fragjobs.errors import FragjobsError

RUN_HOOK = "fragjobs_denoising_run"
# resnets and the transformer blocks inside each Transformer2DModel: modules that return one
# tensor (a Transformer2DModel returns a tuple its block indexes, which a forecast would break)
UNET_BLOCKS = (
    r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
    r"\.(resnets\.\d+|attentions\.\d+\.transformer_blocks\.\d+)"
)


class PeerUnavailableError(FragjobsError):
    """A peer method cannot run on this pipeline; the message says why."""


class DenoisingRunHook(ModelHook):
    """Gives a UNet's cache hooks what a transformer pipeline gives its denoiser's.

    ``timestep``: the current denoising call's timestep (for ``current_timestep_callback``);
    ``step``: its index within the generation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.timestep: float | None = None
        self.step = -1

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        for name, value in zip(("sample", "timestep"), args, strict=False):
            kwargs[name] = value
        args = args[2:]
        t = float(torch.as_tensor(kwargs["timestep"]).flatten()[0])
        if self.timestep is None or t >= self.timestep:  # timesteps decrease within one run
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
            self.step = -1
        self.timestep = t
        self.step += 1
        _set_cache_context(module, CacheContext("cond", step_index=self.step, timestep=t))
        return args, kwargs


def cache_hook_names(family: str) -> tuple[str, ...]:
    """The diffusers hook names one technique registers (what removing it removes)."""
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    return {
        "taylorseer": (_TAYLORSEER_CACHE_HOOK,),
        "pab": (_PYRAMID_ATTENTION_BROADCAST_HOOK,),
        "magcache": (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK),
        "fastercache": (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK),
        "fbc": (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK),
    }[family]


def transformer_models(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's Transformer2DModels (modules holding a ``transformer_blocks`` list)."""
    return [
        (name, module)
        for name, module in unet.named_modules()
        if isinstance(getattr(module, "transformer_blocks", None), torch.nn.ModuleList)
    ]


def count_hooks(unet: torch.nn.Module, names: tuple[str, ...]) -> int:
    """How many of the UNet's modules carry one of the hooks ``names``."""
    return sum(
        any(n in module._diffusers_hook.hooks for n in names)
        for module in unet.modules()
        if hasattr(module, "_diffusers_hook")
    )


@contextlib.contextmanager
def cache_hooks(
    pipe: Any, family: str, setting: str, calibration: Any = None
) -> Iterator[dict[str, Any]]:
    """The pipeline's UNet with one diffusers cache technique on; removed afterwards.

    Yields ``{"hooked_modules": n, "note": ...}`` (what was hooked, for the row).

    Raises:
        PeerUnavailableError: the technique cannot run on this UNet (First-Block-Cache
            without a list of >= 2 transformer blocks) or finds nothing to hook.
    """
    from diffusers.hooks import HookRegistry

    unet = pipe.unet
    run = DenoisingRunHook()
    names = cache_hook_names(family)
    try:
        note = _apply(unet, family, setting, run, calibration)
        hooked = count_hooks(unet, names)
        if hooked == 0:
            raise PeerUnavailableError(f"{family}: diffusers hooked no module of this UNet")
        HookRegistry.check_if_exists_or_initialize(unet).register_hook(run, RUN_HOOK)
        yield {"hooked_modules": hooked, "note": note}
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        registry.remove_hook(RUN_HOOK, recurse=False)
        for name in names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


def _apply(unet, family: str, setting: str, run: DenoisingRunHook, calibration: Any) -> str:
    import diffusers.hooks as dh

    def timestep() -> float:
        return run.timestep

    if family == "taylorseer":
        interval, _, order = setting.partition("o")
        dh.apply_taylorseer_cache(
            unet,
            dh.TaylorSeerCacheConfig(
                cache_interval=int(interval),
                max_order=int(order or 1),
                taylor_factors_dtype=torch.float32,
                cache_identifiers=[UNET_BLOCKS],
            ),
        )
        return f"forecast resnets and transformer blocks, interval {interval}, order {order or 1}"
    if family == "pab":
        skip = int(setting)
        dh.apply_pyramid_attention_broadcast(
            unet,
            dh.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=skip,
                cross_attention_block_skip_range=2 * skip,
                current_timestep_callback=timestep,
            ),
        )
        return f"self attention every {skip}, cross every {2 * skip} steps, t in (100, 800)"
    if family == "fastercache":
        dh.apply_faster_cache(
            unet,
            dh.FasterCacheConfig(
                unconditional_batch_skip_range=int(setting),
                spatial_attention_block_identifiers=("transformer_blocks.*attn1",),
                current_timestep_callback=timestep,
                tensor_format="BCHW",
                _unconditional_conditional_input_kwargs_identifiers=[
                    "sample",
                    "encoder_hidden_states",
                ],
            ),
        )
        return f"CFG unconditional branch computed every {setting} steps for t < 641"
    if family == "magcache":
        if calibration is None:
            raise PeerUnavailableError("magcache needs its calibration run (calibrate_magcache)")
        for name, module in transformer_models(unet):
            dh.apply_mag_cache(
                module,
                dh.MagCacheConfig(
                    threshold=float(setting),
                    num_inference_steps=calibration["steps"],
                    mag_ratios=calibration["ratios"][name],
                ),
            )
        return f"skip each Transformer2DModel on accumulated ratio error <= {setting}"
    if family == "fbc":
        chains = [(n, m) for n, m in transformer_models(unet) if len(m.transformer_blocks) >= 2]
        if not chains:
            raise PeerUnavailableError(_fbc_reason(unet))
        for _name, module in chains:
            dh.apply_first_block_cache(module, dh.FirstBlockCacheConfig(threshold=float(setting)))
        return f"first-block probe on {len(chains)} transformer-block lists, threshold {setting}"
    raise PeerUnavailableError(f"unknown diffusers cache technique {family!r}")


def _fbc_reason(unet: torch.nn.Module) -> str:
    """Why First-Block-Cache cannot run here, from a real attempt on the UNet itself."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    try:
        apply_first_block_cache(unet, FirstBlockCacheConfig())
        attempt = "applied"
    except Exception as exc:  # noqa: BLE001 - the error is the reason we report
        attempt = f"{type(exc).__name__}: {exc}"
    finally:
        for name in cache_hook_names("fbc"):
            HookRegistry.check_if_exists_or_initialize(unet).remove_hook(name, recurse=True)
    sizes = sorted({len(m.transformer_blocks) for _, m in transformer_models(unet)})
    return (
        "First-Block-Cache skips a chain of same-shape transformer blocks (a ModuleList named "
        "blocks/transformer_blocks/layers) and reuses the chain's residual; this UNet's "
        "top-level down/mid/up blocks change resolution and pass skip tensors (applying it to "
        f"the UNet: {attempt}), and each of its Transformer2DModels holds {sizes} transformer "
        "block(s), fewer than the 2 a head and a tail need"
    )


def calibrate_magcache(pipe: Any, steps: int, generate: Callable[[Any], Any]) -> dict[str, Any]:
    """MagCache's magnitude ratios of each Transformer2DModel, from its calibration mode.

    ``generate(pipe)`` runs the pipeline once (the profiling seeds); MagCache logs each
    module's ratios at the end of a calibrated run, which are read back here.

    Returns:
        ``{"steps": steps, "ratios": {module name: [ratio per step]}}``.

    Raises:
        FragjobsError: a module logged no ratios.
    """
    import diffusers.hooks as dh
    from diffusers.hooks import HookRegistry

    unet = pipe.unet
    modules = transformer_models(unet)
    current: list[str] = []
    ratios: dict[str, list[float]] = {}

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("MagCache Calibration Results:") and current:
                ratios[current[-1]] = json.loads(message.partition(":")[2])

    handles = [
        module.register_forward_pre_hook(lambda _m, _a, n=name: current.append(n))
        for name, module in modules
    ]
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level, propagate = Capture(), logger.level, logger.propagate
    run = DenoisingRunHook()
    try:
        for _name, module in modules:
            dh.apply_mag_cache(module, dh.MagCacheConfig(calibrate=True, num_inference_steps=steps))
        HookRegistry.check_if_exists_or_initialize(unet).register_hook(run, RUN_HOOK)
        # the ratios are logged at INFO and printed: read the log record, keep both quiet
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        with contextlib.redirect_stdout(None):
            generate(pipe)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        for handle in handles:
            handle.remove()
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        registry.remove_hook(RUN_HOOK, recurse=False)
        for name in cache_hook_names("magcache"):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
    missing = [name for name, _ in modules if name not in ratios]
    if missing:
        raise FragjobsError(f"MagCache calibration logged no ratios for {', '.join(missing)}")
    return {"steps": steps, "ratios": ratios}
