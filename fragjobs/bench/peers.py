"""Training-free peers of the fragment, each switched on around one pipeline and off after.

A peer is named ``family_setting``:

* ``deepcache_N``: DeepCache (``DeepCacheSDHelper``), cache interval ``N``, branch 0; UNet
  pipelines only (SD, SDXL): it caches the deep branch of a UNet's skip connections, which a
  diffusion transformer does not have;
* ``tome_R``: ToMe-SD (``tomesd.apply_patch``), merge ratio ``R``, on the UNet's first level
  with attention (SD's first, SDXL's second: ToMe's default, the first level, has none in
  SDXL); not on blocks whose normalisation its own block forward would drop (PixArt's
  adaLN-single);
* ``taylorseer_N`` / ``taylorseer_NoK``: diffusers' TaylorSeer, interval ``N``, order ``K``
  (default 1), on every UNet resnet and attention block;
* ``pab_N``: Pyramid Attention Broadcast, self attention every ``N``, cross every ``2N``;
* ``magcache_T``: MagCache, accumulated-error threshold ``T``, calibrated on the profiling
  seeds (:func:`calibrate_peer`);
* ``fastercache_N``: FasterCache, CFG unconditional branch every ``N`` steps;
* ``fbc_T``: First-Block-Cache, threshold ``T``.

How the diffusers hooks are fitted to a UNet or a transformer:
:mod:`fragjobs.bench.diffusers_cache`. DeepCache and ToMe are optional packages (``pip
install 'fragjobs[bench]'``); without them their rows say so (:func:`missing_package`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fragjobs.bench.denoisers import is_unet
from fragjobs.bench.diffusers_cache import PeerUnavailableError
from fragjobs.errors import InvalidInputError
from fragjobs.families import denoiser

PEERS = (
    "deepcache_2",
    "deepcache_3",
    "deepcache_5",
    "tome_0.3",
    "tome_0.5",
    "taylorseer_2",
    "taylorseer_3",
    "taylorseer_4o2",
    "pab_2",
    "pab_3",
    "magcache_0.06",
    "magcache_0.15",
    "magcache_0.3",
    "fastercache_2",
    "fastercache_3",
    "fbc_0.05",
    "fbc_0.1",
)
DIFFUSERS_FAMILIES = ("taylorseer", "pab", "magcache", "fastercache", "fbc")
FAMILIES = ("deepcache", "tome", *DIFFUSERS_FAMILIES)
NEEDS_CALIBRATION = ("magcache",)
PACKAGES = {"deepcache": "deepcache", "tome": "tomesd"}
"""The pip package each optional peer family needs."""


def parse_peer(name: str) -> tuple[str, str]:
    """``"deepcache_3"`` → ``("deepcache", "3")``.

    Raises:
        InvalidInputError: not a peer name this benchmark knows.
    """
    family, _, setting = name.partition("_")
    if family not in FAMILIES or not setting:
        raise InvalidInputError(
            f"unknown method {name!r}: a peer is one of "
            f"{', '.join(f + '_<setting>' for f in FAMILIES)}"
        )
    try:
        if family == "taylorseer":
            interval, _, order = setting.partition("o")
            int(interval), int(order or 1)
        elif family in ("deepcache", "pab", "fastercache"):
            int(setting)
        else:
            float(setting)
    except ValueError:
        raise InvalidInputError(f"peer {name!r}: bad setting {setting!r}") from None
    return family, setting


def is_peer(name: str) -> bool:
    """Whether ``name`` names a peer (``family_setting`` with a known family)."""
    return name.partition("_")[0] in FAMILIES


def calibrate_peer(pipe: Any, name: str, steps: int, generate: Callable[[Any], Any]) -> Any:
    """The calibration a peer needs before it runs (MagCache's ratios), else ``None``.

    ``generate(pipe)`` runs the pipeline on the calibration seeds (the profiling seeds).
    """
    family, _ = parse_peer(name)
    if family != "magcache":
        return None
    from fragjobs.bench.diffusers_cache import calibrate_magcache

    return calibrate_magcache(pipe, steps, generate)


@contextlib.contextmanager
def peer_pipeline(pipe: Any, name: str, calibration: Any = None) -> Iterator[Any]:
    """The base pipeline with the peer ``name`` switched on, switched off afterwards.

    Raises:
        ImportError: DeepCache or ToMe is not installed.
        PeerUnavailableError: the peer cannot run on this pipeline (the message says why).
    """
    family, setting = parse_peer(name)
    if family == "deepcache":
        _check_deepcache(pipe)
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=int(setting), cache_branch_id=0)
        helper.enable()
        try:
            yield pipe
        finally:
            helper.disable()
    elif family == "tome":
        max_downsample = _tome_level(pipe)
        import tomesd

        tomesd.apply_patch(pipe, ratio=float(setting), max_downsample=max_downsample)
        reseed = _reseed_tome_each_run(denoiser(pipe))
        try:
            yield pipe
        finally:
            reseed.remove()
            tomesd.remove_patch(pipe)
    else:
        from fragjobs.bench.diffusers_cache import cache_hooks

        with cache_hooks(pipe, family, setting, calibration):
            yield pipe


def describe_peer(pipe: Any, name: str, calibration: Any = None) -> dict[str, Any]:
    """What the peer does on this pipeline, for its row: ToMe's level, diffusers hooks'
    module count and a note.

    Raises:
        PeerUnavailableError: the peer cannot run on this pipeline (the message says why).
    """
    family, setting = parse_peer(name)
    if family == "deepcache":
        _check_deepcache(pipe)
        return {}
    if family == "tome":
        level = _tome_level(pipe)
        return {"note": f"merge {setting} of self-attention tokens at downsample <= {level}"}
    from fragjobs.bench.diffusers_cache import cache_hooks

    with cache_hooks(pipe, family, setting, calibration) as hooked:
        return dict(hooked)


def missing_package(name: str, error: ImportError) -> str:
    """The row's reason when peer ``name`` needs a package that is not installed."""
    package = PACKAGES.get(parse_peer(name)[0], error.name or "")
    return (
        f"needs the {package} package, not installed here ({error}): "
        f"pip install {package} (or pip install 'fragjobs[bench]')"
    )


def _check_deepcache(pipe: Any) -> None:
    """Refuse DeepCache on a denoiser without a UNet's layout, saying why."""
    model = denoiser(pipe)
    if not is_unet(model):
        raise PeerUnavailableError(
            "DeepCache caches the deep branch of a UNet's skip connections (down, mid and up "
            f"blocks) and supports UNet pipelines only; this denoiser is a "
            f"{type(model).__name__}, a stack of transformer blocks without that branch"
        )


def _reseed_tome_each_run(unet: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Restart ToMe's random token partitions from a fixed seed when a generation starts.

    tomesd forks the global RNG once and draws from that generator for the rest of the
    patch's life, so the same seeds would give other images on every call; reset at each
    new run (the timestep stops decreasing), a peer's images depend on the seeds alone, as
    every other method's do.
    """
    device = next(unet.parameters()).device
    last: list[float] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = float(torch.as_tensor(timestep).flatten()[0])
        if not last or t >= last[-1]:
            generator = torch.Generator(device=device).manual_seed(0)
            module._tome_info["args"]["generator"] = generator
        last[:] = [t]

    return unet.register_forward_pre_hook(hook, with_kwargs=True)


def _tome_level(pipe: Any) -> int:
    """ToMe's ``max_downsample``: the down-sampling of the UNet's first level with attention.

    Raises:
        PeerUnavailableError: the denoiser has no UNet layout, or blocks whose normalisation
            tomesd's block forward (SD's layer-norm block) would silently drop.
    """
    model = denoiser(pipe)
    norms = sorted(
        {
            str(getattr(module, "norm_type", "layer_norm"))
            for module in model.modules()
            if type(module).__name__ == "BasicTransformerBlock"
        }
        - {"layer_norm"}
    )
    if norms or not is_unet(model):
        raise PeerUnavailableError(
            "tomesd replaces each BasicTransformerBlock's forward with SD's layer-norm block "
            f"and finds the token grid from a UNet's levels; this {type(model).__name__}'s "
            f"blocks use norm_type {', '.join(norms) or 'layer_norm'}, whose timestep "
            "modulation that forward would drop"
            if norms
            else f"tomesd patches UNet pipelines; this denoiser is a {type(model).__name__}"
        )
    levels = [i for i, block in enumerate(model.down_blocks) if getattr(block, "attentions", None)]
    if not levels:
        raise PeerUnavailableError("tomesd merges attention tokens; this UNet has no attention")
    return 2 ** levels[0]
