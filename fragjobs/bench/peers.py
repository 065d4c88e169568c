"""Training-free peers of the fragment, each switched on around one pipeline and off after.

A peer is named ``family_setting``:

* ``deepcache_N``: DeepCache (``DeepCacheSDHelper``), cache interval ``N``, branch 0;
* ``tome_R``: ToMe-SD (``tomesd.apply_patch``), merge ratio ``R``;
* ``taylorseer_N`` / ``taylorseer_NoK``: diffusers' TaylorSeer, interval ``N``, order ``K``
  (default 1), on every UNet resnet and attention block;
* ``pab_N``: Pyramid Attention Broadcast, self attention every ``N``, cross every ``2N``;
* ``magcache_T``: MagCache, accumulated-error threshold ``T``, calibrated on the profiling
  seeds (:func:`calibrate_peer`);
* ``fastercache_N``: FasterCache, CFG unconditional branch every ``N`` steps;
* ``fbc_T``: First-Block-Cache, threshold ``T``.

How the diffusers hooks are fitted to a UNet: :mod:`fragjobs.bench.diffusers_cache`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from fragjobs.errors import InvalidInputError

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
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=int(setting), cache_branch_id=0)
        helper.enable()
        try:
            yield pipe
        finally:
            helper.disable()
    elif family == "tome":
        import tomesd

        tomesd.apply_patch(pipe, ratio=float(setting))
        try:
            yield pipe
        finally:
            tomesd.remove_patch(pipe)
    else:
        from fragjobs.bench.diffusers_cache import cache_hooks

        with cache_hooks(pipe, family, setting, calibration):
            yield pipe


def describe_peer(pipe: Any, name: str, calibration: Any = None) -> dict[str, Any]:
    """What the peer hooks on this pipeline (diffusers hooks: module count and a note)."""
    family, setting = parse_peer(name)
    if family not in DIFFUSERS_FAMILIES:
        return {}
    from fragjobs.bench.diffusers_cache import cache_hooks

    with cache_hooks(pipe, family, setting, calibration) as hooked:
        return dict(hooked)
