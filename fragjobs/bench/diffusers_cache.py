"""diffusers 0.42's cache hooks, fitted to the pipelines fragjobs benchmarks.

The hooks (``diffusers.hooks``) are written for transformer denoisers whose pipelines wrap
each denoiser call in ``transformer.cache_context("cond")`` and reset the hooks' state after
each generation. Neither the UNet pipelines (SD, SDXL) nor PixArt's do that, and a UNet has no
``CacheMixin``, so :class:`DenoisingRunHook` (registered on the denoiser, outermost) does it:
it passes every positional input as a keyword (FasterCache splits only batch-concatenated
*keyword* inputs), sets the cache context, exposes the current timestep to the hooks that ask
for it, and resets every stateful hook when a new generation starts (the timestep stops
decreasing). The techniques themselves are diffusers' own ``apply_*`` functions, with
identifiers that name the denoiser's modules (:mod:`fragjobs.bench.denoisers`):

* **TaylorSeer**: on a UNet, every resnet and transformer block of the down, mid and up
  blocks is forecast; on a transformer, every block of ``transformer_blocks``. Its default
  patterns (``^transformer_blocks.*attn``, matched whole) name Flux's ``attn`` modules and
  match nothing in a UNet or in PixArt (``attn1``/``attn2``).
* **PAB**: its default ``transformer_blocks`` patterns already find self (attn1) and cross
  (attn2) attention in both layouts; cross attention is broadcast twice as long as self.
* **MagCache**: on each module holding a ``transformer_blocks`` list (each Transformer2DModel
  of a UNet; a DiT itself), with magnitude ratios calibrated by its own calibration mode on
  the profiling seeds.
* **FasterCache**: the CFG unconditional branch is reused (``unconditional_batch_skip_range``);
  SDXL's added conditioning (``added_cond_kwargs``, a dict FasterCache does not split) is
  halved with it by :class:`AddedConditionHalfHook`. On a UNet its attention reuse is filtered
  by fixed ``^blocks``/``^transformer_blocks`` patterns inside ``apply_faster_cache`` that no
  UNet module name matches, so only the CFG part runs; on a transformer both parts run.
* **First-Block-Cache**: needs a list of >= 2 same-shape transformer blocks; it is applied to
  each module that has one (a DiT itself, SDXL's deeper Transformer2DModels), else the peer
  is unavailable with that reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.hooks import ModelHook

from fragjobs.bench.denoisers import input_names, is_unet
from fragjobs.errors import FragjobsError
from fragjobs.families import denoiser

RUN_HOOK = "fragjobs_denoising_run"
ADDED_CONDITION_HOOK = "fragjobs_added_condition_half"
# resnets and the transformer blocks inside each Transformer2DModel: modules that return one
# tensor (a Transformer2DModel returns a tuple its block indexes, which a forecast would break)
UNET_BLOCKS = (
    r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
    r"\.(resnets\.\d+|attentions\.\d+\.transformer_blocks\.\d+)"
)
# a diffusion transformer's blocks: each returns the hidden states (one tensor)
TRANSFORMER_BLOCKS = r"transformer_blocks\.\d+"


class PeerUnavailableError(FragjobsError):
    """A peer method cannot run on this pipeline; the message says why."""


class DenoisingRunHook(ModelHook):
    """Gives a denoiser's cache hooks what a ``CacheMixin`` pipeline gives its transformer's.

    ``timestep``: the current denoising call's timestep (for ``current_timestep_callback``);
    ``step``: its index within the generation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.timestep: float | None = None
        self.step = -1
        self.names: tuple[str, ...] = ()

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.names = input_names(module)
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        kwargs.update(zip(self.names, args, strict=False))
        t = float(torch.as_tensor(kwargs["timestep"]).flatten()[0])
        if self.timestep is None or t >= self.timestep:  # timesteps decrease within one run
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
            self.step = -1
        self.timestep = t
        self.step += 1
        _set_cache_context(module, CacheContext("cond", step_index=self.step, timestep=t))
        return (), kwargs


class AddedConditionHalfHook(ModelHook):
    """Keeps ``added_cond_kwargs`` (SDXL's ``text_embeds`` and ``time_ids``) batched like the
    latents when FasterCache (outside this hook) passed on only their conditional half.

    FasterCache splits the keyword tensors it is told of; the added conditioning is a dict,
    so its tensors would stay twice the latents' batch. Their second half is the conditional
    one, as for the latents (the pipeline concatenates unconditional, then conditional).
    """

    def __init__(self, latents: str) -> None:
        super().__init__()
        self.latents = latents

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        batch = kwargs[self.latents].shape[0]
        added = kwargs.get("added_cond_kwargs")
        if added:
            kwargs["added_cond_kwargs"] = {
                key: value.chunk(2)[1]
                if torch.is_tensor(value) and value.shape[0] == 2 * batch
                else value
                for key, value in added.items()
            }
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


def transformer_models(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules holding a ``transformer_blocks`` list: a UNet's Transformer2DModels, or a
    diffusion transformer itself (named ``""``)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "transformer_blocks", None), torch.nn.ModuleList)
    ]


def count_hooks(model: torch.nn.Module, names: tuple[str, ...]) -> int:
    """How many of the denoiser's modules carry one of the hooks ``names``."""
    return sum(
        any(n in module._diffusers_hook.hooks for n in names)
        for module in model.modules()
        if hasattr(module, "_diffusers_hook")
    )


@contextlib.contextmanager
def cache_hooks(
    pipe: Any, family: str, setting: str, calibration: Any = None
) -> Iterator[dict[str, Any]]:
    """The pipeline's denoiser with one diffusers cache technique on; removed afterwards.

    Yields ``{"hooked_modules": n, "note": ...}`` (what was hooked, for the row).

    Raises:
        PeerUnavailableError: the technique cannot run on this denoiser (First-Block-Cache
            without a list of >= 2 transformer blocks) or finds nothing to hook.
    """
    from diffusers.hooks import HookRegistry

    model = denoiser(pipe)
    run = DenoisingRunHook()
    names = cache_hook_names(family)
    try:
        note = _apply(model, family, setting, run, calibration)
        hooked = count_hooks(model, names)
        if hooked == 0:
            raise PeerUnavailableError(
                f"{family}: diffusers hooked no module of this {type(model).__name__}"
            )
        HookRegistry.check_if_exists_or_initialize(model).register_hook(run, RUN_HOOK)
        yield {"hooked_modules": hooked, "note": note}
    finally:
        # outermost first: removing a hook from under one with its own forward (FasterCache's)
        # would relink the wrong reference and leave a stale forward behind
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.remove_hook(RUN_HOOK, recurse=False)
        for name in names:
            registry.remove_hook(name, recurse=True)
        registry.remove_hook(ADDED_CONDITION_HOOK, recurse=False)
        registry.invalidate_child_registries_cache()


def _apply(model, family: str, setting: str, run: DenoisingRunHook, calibration: Any) -> str:
    import diffusers.hooks as dh

    def timestep() -> float:
        return run.timestep

    on_unet = is_unet(model)
    if family == "taylorseer":
        interval, _, order = setting.partition("o")
        dh.apply_taylorseer_cache(
            model,
            dh.TaylorSeerCacheConfig(
                cache_interval=int(interval),
                max_order=int(order or 1),
                taylor_factors_dtype=torch.float32,
                cache_identifiers=[UNET_BLOCKS if on_unet else TRANSFORMER_BLOCKS],
            ),
        )
        blocks = "resnets and transformer blocks" if on_unet else "transformer blocks"
        return f"forecast {blocks}, interval {interval}, order {order or 1}"
    if family == "pab":
        skip = int(setting)
        dh.apply_pyramid_attention_broadcast(
            model,
            dh.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=skip,
                cross_attention_block_skip_range=2 * skip,
                current_timestep_callback=timestep,
            ),
        )
        return f"self attention every {skip}, cross every {2 * skip} steps, t in (100, 800)"
    if family == "fastercache":
        latents = input_names(model)[0]
        # inside FasterCache's denoiser hook (registered first, so it runs after the split)
        dh.HookRegistry.check_if_exists_or_initialize(model).register_hook(
            AddedConditionHalfHook(latents), ADDED_CONDITION_HOOK
        )
        inputs = [latents, "encoder_hidden_states"]
        if not on_unet:  # a DiT's batched timestep and text mask are split with the latents
            inputs += ["timestep", "encoder_attention_mask"]
        config = dh.FasterCacheConfig(
            unconditional_batch_skip_range=int(setting),
            spatial_attention_block_identifiers=("transformer_blocks.*attn1",),
            attention_weight_callback=lambda _module: 0.5,  # diffusers' default, unlogged
            current_timestep_callback=timestep,
            tensor_format="BCHW",
            _unconditional_conditional_input_kwargs_identifiers=inputs,
        )
        dh.apply_faster_cache(model, config)
        low, high = config.unconditional_batch_timestep_skip_range
        note = f"CFG unconditional branch computed every {setting} steps for t in ({low}, {high})"
        if on_unet:
            return note
        low, high = config.spatial_attention_timestep_skip_range
        skip = config.spatial_attention_block_skip_range
        return f"{note}; self attention computed every {skip} steps for t in ({low}, {high})"
    if family == "magcache":
        if calibration is None:
            raise PeerUnavailableError("magcache needs its calibration run (calibrate_magcache)")
        for name, module in transformer_models(model):
            dh.apply_mag_cache(
                module,
                dh.MagCacheConfig(
                    threshold=float(setting),
                    num_inference_steps=calibration["steps"],
                    mag_ratios=calibration["ratios"][name],
                ),
            )
        where = "each Transformer2DModel" if on_unet else "the transformer's blocks"
        return f"skip {where} on accumulated ratio error <= {setting}"
    if family == "fbc":
        chains = [(n, m) for n, m in transformer_models(model) if len(m.transformer_blocks) >= 2]
        if not chains:
            raise PeerUnavailableError(_fbc_reason(model))
        for _name, module in chains:
            dh.apply_first_block_cache(module, dh.FirstBlockCacheConfig(threshold=float(setting)))
        return f"first-block probe on {len(chains)} transformer-block lists, threshold {setting}"
    raise PeerUnavailableError(f"unknown diffusers cache technique {family!r}")


def _fbc_reason(model: torch.nn.Module) -> str:
    """Why First-Block-Cache cannot run here, from a real attempt on the denoiser itself."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    try:
        apply_first_block_cache(model, FirstBlockCacheConfig())
        attempt = "applied"
    except Exception as exc:  # noqa: BLE001 - the error is the reason we report
        attempt = f"{type(exc).__name__}: {exc}"
    finally:
        for name in cache_hook_names("fbc"):
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(name, recurse=True)
    sizes = sorted({len(m.transformer_blocks) for _, m in transformer_models(model)})
    chain = (
        "First-Block-Cache skips a chain of same-shape transformer blocks (a ModuleList named "
        "blocks/transformer_blocks/layers) and reuses the chain's residual; "
    )
    if not is_unet(model):
        return (
            f"{chain}this {type(model).__name__} holds {sizes} transformer block(s), fewer "
            f"than the 2 a head and a tail need (applying it: {attempt})"
        )
    return (
        f"{chain}this UNet's top-level down/mid/up blocks change resolution and pass skip "
        f"tensors (applying it to the UNet: {attempt}), and each of its Transformer2DModels "
        f"holds {sizes} transformer block(s), fewer than the 2 a head and a tail need"
    )


def calibrate_magcache(pipe: Any, steps: int, generate: Callable[[Any], Any]) -> dict[str, Any]:
    """MagCache's magnitude ratios of each module holding a ``transformer_blocks`` list (a
    UNet's Transformer2DModels, a diffusion transformer itself), from its calibration mode.

    ``generate(pipe)`` runs the pipeline once (the profiling seeds); MagCache logs each
    module's ratios at the end of a calibrated run, which are read back here.

    Returns:
        ``{"steps": steps, "ratios": {module name: [ratio per step]}}``.

    Raises:
        FragjobsError: a module logged no ratios.
    """
    import diffusers.hooks as dh
    from diffusers.hooks import HookRegistry

    model = denoiser(pipe)
    modules = transformer_models(model)
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
        HookRegistry.check_if_exists_or_initialize(model).register_hook(run, RUN_HOOK)
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
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.remove_hook(RUN_HOOK, recurse=False)
        for name in cache_hook_names("magcache"):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
    missing = [name for name, _ in modules if name not in ratios]
    if missing:
        raise FragjobsError(f"MagCache calibration logged no ratios for {', '.join(missing)}")
    return {"steps": steps, "ratios": ratios}
