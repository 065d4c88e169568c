"""The chain's knobs: one JSON-serialisable object for the CLI, the API, the farm and tasks.

``fragjobs run``, :func:`fragjobs.run`, :meth:`fragjobs.client.Farm.submit` and the farm's
tasks all take a :class:`ChainKnobs`; its defaults come from :class:`~fragjobs.config.Settings`
(``FRAGJOBS_DEFAULT_MODEL``, ``FRAGJOBS_DEFAULT_THRESHOLD``, ``FRAGJOBS_DEFAULT_FIDELITY``),
so a knob left unset means the same thing embedded and on the farm. Example::

    knobs = ChainKnobs.from_settings(caching=False, variants=16)
    knobs.to_json()                      # {"model": "shapes", "threshold": 0.75, ...}
    ChainKnobs.from_json(knobs.to_json()) == knobs
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from fragjobs.config import DEFAULT_FIDELITY, DEFAULT_THRESHOLD, Settings, get_settings
from fragjobs.errors import InvalidInputError
from fragjobs.keys import check_fraction, check_int, check_seeds, normalise_prompt

if TYPE_CHECKING:
    from fragjobs.extraction import ExtractionConfig

DEFAULT_PROFILE_SEEDS = (0, 1, 2, 3)
DEFAULT_VALIDATION_SEEDS = (1000, 1001, 1002, 1003)
MAX_BATCH_SIZE = 1024


def head_guard(fidelity: float) -> float:
    """The SSIM head pruning alone must keep: half of the fragment's SSIM budget."""
    return round(1.0 - (1.0 - fidelity) / 2, 6)


def check_bool(value: Any, what: str) -> bool:
    """``value`` if it is a bool (not ``"no"``, not 1), else raise."""
    if not isinstance(value, bool):
        raise InvalidInputError(f"{what} must be true or false, got {value!r}")
    return value


def check_variants(variants: Any, settings: Settings) -> int:
    """``variants`` must be an integer in [1, settings.max_variants]."""
    return check_int(variants, "variants", minimum=1, maximum=settings.max_variants)


@dataclass(frozen=True)
class ChainKnobs:
    """What a chain run may be asked: model, extraction, seeds, variants.

    Args:
        model: a built-in name, a diffusers folder or a hub id (default: the settings').
        threshold: fraction of attention heads kept, in (0, 1].
        fidelity: SSIM against the full model the fragment keeps on every profiling seed,
            in (0, 1]; head pruning may spend half of the loss, block caching the rest.
        low_rank, int8, caching: whether each technique is used. Low-rank is off by
            default: it factorises no layer of ``shapes`` and did not pay in time on
            ``sd15-shape`` (issue 16), while its SVDs lengthen every extraction.
        head_guard: whether head pruning keeps more heads while it loses more than half of
            the fidelity budget (False prunes exactly ``threshold``).
        model_level: whether the embedded run first tries the base's model-level fragment
            (:mod:`fragjobs.chain.model_level`: extracted once per base, only gated per
            prompt) and extracts the prompt's own only when it fails its gate.
        min_heads_per_layer: heads every attention module keeps.
        paraphrases: paraphrases of the prompt on which reuse is measured (H3).
        profile_seeds, validation_seeds: seeds of profiling and of the gate.
        steps: inference steps of profiling (and so of the fragment); None: the model's.
        variants: how many seed variants are generated.
        batch_size: images per pipeline call.

    Raises:
        InvalidInputError: a knob out of range or of the wrong type.
    """

    model: str
    threshold: float = DEFAULT_THRESHOLD
    fidelity: float = DEFAULT_FIDELITY
    low_rank: bool = False
    int8: bool = True
    caching: bool = True
    head_guard: bool = True
    model_level: bool = True
    min_heads_per_layer: int = 1
    paraphrases: tuple[str, ...] = ()
    profile_seeds: tuple[int, ...] = DEFAULT_PROFILE_SEEDS
    validation_seeds: tuple[int, ...] = DEFAULT_VALIDATION_SEEDS
    steps: int | None = None
    variants: int = 8
    batch_size: int = 4
    max_variants: int = field(default=10_000, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidInputError(f"model must be a non-empty string, got {self.model!r}")
        check_fraction(self.threshold, "threshold")
        check_fraction(self.fidelity, "fidelity")
        for name in ("low_rank", "int8", "caching", "head_guard", "model_level"):
            check_bool(getattr(self, name), name)
        check_int(self.min_heads_per_layer, "min_heads_per_layer", minimum=1)
        if isinstance(self.paraphrases, str):
            raise InvalidInputError("paraphrases must be a list of prompts, not one string")
        for text in self.paraphrases:
            normalise_prompt(text)
        check_seeds(list(self.profile_seeds))
        check_seeds(list(self.validation_seeds))
        if self.steps is not None:
            check_int(self.steps, "steps", minimum=1, maximum=1000)
        check_int(self.variants, "variants", minimum=1, maximum=self.max_variants)
        check_int(self.batch_size, "batch_size", minimum=1, maximum=MAX_BATCH_SIZE)
        object.__setattr__(self, "model", self.model.strip())
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "fidelity", float(self.fidelity))
        object.__setattr__(self, "paraphrases", tuple(p.strip() for p in self.paraphrases))
        object.__setattr__(self, "profile_seeds", tuple(self.profile_seeds))
        object.__setattr__(self, "validation_seeds", tuple(self.validation_seeds))

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **given: Any) -> ChainKnobs:
        """Knobs with the settings' defaults for whatever ``given`` leaves out (or None).

        Raises:
            InvalidInputError: an unknown knob, or one out of range.
        """
        settings = settings or get_settings()
        unknown = sorted(set(given) - _KNOB_NAMES)
        if unknown:
            raise InvalidInputError(
                f"unknown knob(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOB_NAMES))}"
            )
        defaults = {
            "model": settings.default_model,
            "threshold": settings.default_threshold,
            "fidelity": settings.default_fidelity,
            "model_level": settings.model_level,
        }
        values = {**defaults, **{k: v for k, v in given.items() if v is not None}}
        for name in ("paraphrases", "profile_seeds", "validation_seeds"):
            if name in values and isinstance(values[name], list):
                values[name] = tuple(values[name])
        return cls(**values, max_variants=settings.max_variants)

    @classmethod
    def from_json(cls, data: Any, settings: Settings | None = None) -> ChainKnobs:
        """The knobs of :meth:`to_json`'s dict (missing ones from the settings)."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"knobs must be a JSON object, got {data!r}")
        return cls.from_settings(settings, **data)

    def to_json(self) -> dict[str, Any]:
        """The knobs as a plain JSON object (lists for the tuples)."""
        out = asdict(self)
        out.pop("max_variants")
        for name in ("paraphrases", "profile_seeds", "validation_seeds"):
            out[name] = list(out[name])
        return out

    def replace(self, **changes: Any) -> ChainKnobs:
        """A copy with ``changes`` (checked again)."""
        return replace(self, **changes)

    def extraction_config(self) -> ExtractionConfig:
        """The extraction config of these knobs (:func:`extraction_config`)."""
        return extraction_config(
            self.threshold,
            min_heads_per_layer=self.min_heads_per_layer,
            low_rank=self.low_rank,
            int8=self.int8,
            caching=self.caching,
            fidelity=self.fidelity,
            head_guard_on=self.head_guard,
        )


_KNOB_NAMES = {f.name for f in fields(ChainKnobs)} - {"max_variants"}


def extraction_config(
    threshold: float = DEFAULT_THRESHOLD,
    *,
    min_heads_per_layer: int = 1,
    rank_margin: float = 0.25,
    low_rank: bool = False,
    int8: bool = True,
    caching: bool = True,
    fidelity: float = DEFAULT_FIDELITY,
    head_guard_on: bool = True,
) -> ExtractionConfig:
    """The extraction config from the knobs.

    ``fidelity`` is the one quality knob: the SSIM against the full model that the fragment
    must keep on every profiling seed. Head pruning may spend half of the SSIM budget
    (its guard keeps more heads than ``threshold`` asks until it does); block caching, chosen
    on the pruned and compressed UNet, spends the rest. ``head_guard_on=False`` prunes exactly
    ``threshold``.
    """
    # Imported here, not above: the command line checks its input with this module before
    # it loads torch, which the techniques need.
    from fragjobs.extraction import (
        BlockCachingConfig,
        ExtractionConfig,
        HeadSelectionConfig,
        Int8Config,
        LowRankConfig,
    )

    check_fraction(fidelity, "fidelity")
    return ExtractionConfig(
        heads=HeadSelectionConfig(
            threshold,
            min_heads_per_layer,
            rank_margin,
            min_ssim=head_guard(fidelity) if head_guard_on else None,
        ),
        low_rank=LowRankConfig() if low_rank else None,
        int8=Int8Config() if int8 else None,
        caching=BlockCachingConfig(min_ssim=fidelity) if caching else None,
    )


def variant_seeds(
    profile_seeds: list[int] | tuple[int, ...],
    validation_seeds: list[int] | tuple[int, ...],
    variants: int,
) -> list[int]:
    """The seeds of a chain's ``variants`` images, none twice.

    The profiling seeds first, then the validation seeds (the full model made both), then
    the smallest seeds not among either, for the fragment; only the first ``variants``.

    Example::

        >>> variant_seeds([0, 1], [1000], 5)
        [0, 1, 1000, 2, 3]
        >>> variant_seeds([0, 1, 2, 3], [1000, 1001], 3)
        [0, 1, 2]
    """
    made = list(dict.fromkeys([*check_seeds(list(profile_seeds)), *validation_seeds]))
    seeds = made[:variants]
    used, candidate = set(made), 0
    while len(seeds) < variants:
        if candidate not in used:
            seeds.append(candidate)
        candidate += 1
    return seeds
