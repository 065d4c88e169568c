"""The benchmark's fragment methods: technique tokens joined by ``+``, ``@fidelity``.

``heads``, ``low_rank``, ``int8``, ``caching`` (one technique each) and ``all`` (the chain's
config); ``noforecast``, ``nocfg`` and ``noprobe`` turn off block caching's routing switches
(``BlockCachingConfig.forecast``, ``.cfg_reuse``, ``.probe``) where this fragjobs has them.
"""

from __future__ import annotations

import dataclasses

from fragjobs.errors import InvalidInputError

TECHNIQUES = ("heads", "low_rank", "int8", "caching", "all")
MODEL_LEVEL = "model_level"
SWITCHES = {"noforecast": "forecast", "nocfg": "cfg_reuse", "noprobe": "probe"}


def extraction_config(technique: str, threshold: float, fidelity: float):
    """``all`` is the chain's config (``chain.extraction_config``); the others one part of it.

    ``noforecast``, ``nocfg`` and ``noprobe`` set block caching's ``forecast``, ``cfg_reuse``
    and ``probe`` to False.

    Raises:
        InvalidInputError: an unknown token, a switch without caching, or a switch whose
            field this ``BlockCachingConfig`` does not have.
    """
    from fragjobs.chain import head_guard
    from fragjobs.extraction import (
        BlockCachingConfig,
        ExtractionConfig,
        HeadSelectionConfig,
        Int8Config,
        LowRankConfig,
    )

    tokens = set(technique.split("+"))
    unknown = tokens - set(TECHNIQUES) - set(SWITCHES)
    if unknown:
        raise InvalidInputError(
            f"unknown method token(s) {', '.join(sorted(unknown))} in {technique!r}: use "
            f"{', '.join(TECHNIQUES + tuple(SWITCHES))} joined by +"
        )
    use = tokens | set(TECHNIQUES[:4]) if "all" in tokens else tokens
    switches = {}
    fields = {field.name for field in dataclasses.fields(BlockCachingConfig)}
    for token in sorted(tokens & set(SWITCHES)):
        if "caching" not in use:
            raise InvalidInputError(
                f"method {technique!r}: {token} switches block caching; add +caching"
            )
        if SWITCHES[token] not in fields:
            raise InvalidInputError(
                f"method token {token}: BlockCachingConfig has no field "
                f"{SWITCHES[token]!r} in this fragjobs"
            )
        switches[SWITCHES[token]] = False
    return ExtractionConfig(
        heads=HeadSelectionConfig(threshold, min_ssim=head_guard(fidelity))
        if "heads" in use
        else HeadSelectionConfig(1.0),
        low_rank=LowRankConfig() if "low_rank" in use else None,
        int8=Int8Config() if "int8" in use else None,
        caching=BlockCachingConfig(min_ssim=fidelity, **switches) if "caching" in use else None,
    )


def is_fragment_method(name: str) -> bool:
    """Whether ``name`` (before any ``@fidelity``) is a ``+``-joined fragment method."""
    technique = name.partition("@")[0]
    return set(technique.split("+")) <= set(TECHNIQUES) | set(SWITCHES)


def is_model_level(name: str) -> bool:
    """Whether ``name`` is ``model_level`` or ``model_level@<fidelity>`` (the base's
    model-level fragment: :mod:`fragjobs.bench.model_level_row`)."""
    return name.partition("@")[0] == MODEL_LEVEL


def method_fidelity(name: str, fidelity: float) -> float:
    """The fidelity of method ``name``: its ``@`` knob, else ``fidelity``.

    Raises:
        InvalidInputError: a knob that is not a number.
    """
    knob = name.partition("@")[2]
    try:
        return float(knob or fidelity)
    except ValueError:
        raise InvalidInputError(f"method {name!r}: {knob!r} is not a fidelity") from None


def check_methods(methods: tuple[str, ...], threshold: float, fidelity: float) -> None:
    """Refuse an unknown method before any work (one line, nothing written)."""
    for name in methods:
        if is_model_level(name):
            method_fidelity(name, fidelity)
        elif is_fragment_method(name):
            method_fidelity(name, fidelity)
            extraction_config(name.partition("@")[0], threshold, fidelity)
        else:
            from fragjobs.bench.peers import parse_peer

            parse_peer(name)
