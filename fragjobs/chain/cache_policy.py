"""Should a fragment go to the shared library or stay on the node that built it?

:func:`should_cache_fragment` scores a freshly built fragment (the seed's
``should_cache_fragment``)::

    score = w_cost · cost − w_size · size + w_pop · popularity + w_sim · similar

each term normalised to [0, 1] (``size`` may exceed 1: the fragment is larger than the cap):

* ``cost``: extraction seconds another node saves by reusing it, ``s / (s + 60)``;
* ``size``: its bytes relative to the library cap (``FRAGJOBS_LIBRARY_MAX_BYTES``);
* ``popularity``: generation jobs of this prompt in the catalog, ``n / (n + 3)``;
* ``similar``: jobs of similar prompts, the same way.

A score at or above ``cache_share_threshold`` puts it in the shared library, else it stays
node-local. A term that cannot be computed counts 0 and says why in its ``note``; the whole
decision (:meth:`CacheDecision.to_json`) is recorded with the fragment. Pure arithmetic: no
catalog, store or torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fragjobs.config import Settings
from fragjobs.errors import InvalidInputError

EXTRACTION_REFERENCE_S = 60.0
"""Extraction seconds that make the cost term 0.5."""

JOBS_REFERENCE = 3
"""Jobs that make the popularity (or similar-prompt) term 0.5."""

TERMS = ("extraction_cost", "size", "popularity", "similar_reuse")


@dataclass(frozen=True)
class CacheWeights:
    """The weights of the four terms (settings ``cache_weight_*``)."""

    extraction_cost: float = 1.0
    size: float = 1.0
    popularity: float = 1.0
    similar_reuse: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> CacheWeights:
        """The weights of ``settings``."""
        return cls(
            extraction_cost=settings.cache_weight_extraction_cost,
            size=settings.cache_weight_size,
            popularity=settings.cache_weight_popularity,
            similar_reuse=settings.cache_weight_similar_reuse,
        )


@dataclass(frozen=True)
class CacheDecision:
    """Where a fragment goes, its score, and each term (value, weight, contribution, note)."""

    placement: str
    score: float
    threshold: float
    terms: dict[str, dict[str, Any]]

    @property
    def shared(self) -> bool:
        """Whether the fragment goes to the shared library."""
        return self.placement == "shared"

    def to_json(self) -> dict[str, Any]:
        """The decision as a JSON object (recorded as the fragment's ``params["cache"]``)."""
        return {
            "placement": self.placement,
            "score": self.score,
            "threshold": self.threshold,
            "terms": self.terms,
        }


def should_cache_fragment(
    *,
    extraction_s: float | None,
    size_bytes: int | None,
    cap_bytes: int | None,
    prompt_jobs: int | None,
    similar_jobs: int | None,
    weights: CacheWeights,
    threshold: float,
    notes: Mapping[str, str] | None = None,
) -> CacheDecision:
    """Score a fragment and decide its placement (``shared`` or ``local``).

    Args:
        extraction_s: seconds its extraction took (None: unknown).
        size_bytes: its stored size (None: unknown).
        cap_bytes: the library cap (None: no cap, size costs nothing).
        prompt_jobs: generation jobs of its prompt in the catalog (None: unknown).
        similar_jobs: generation jobs of similar prompts (None: unknown).
        weights: the terms' weights.
        threshold: the score from which it is shared.
        notes: per term name, why it could not be computed (shown in the decision).

    Returns:
        The decision; every term says ``value`` (the input), ``normalised``, ``weight``,
        ``contribution`` to the score and a ``note`` when it could not be computed.

    Example::

        decision = should_cache_fragment(extraction_s=12.0, size_bytes=2**20,
            cap_bytes=2**30, prompt_jobs=4, similar_jobs=0,
            weights=CacheWeights(), threshold=0.0)
        decision.placement  # "shared"
    """
    notes = dict(notes or {})
    unknown = sorted(set(notes) - set(TERMS))
    if unknown:
        raise InvalidInputError(f"unknown cache term(s) {unknown}: use {list(TERMS)}")
    if extraction_s is not None and (isinstance(extraction_s, bool) or not extraction_s >= 0):
        raise InvalidInputError(f"extraction_s must be >= 0 or None, got {extraction_s!r}")
    for name, value in (
        ("size_bytes", size_bytes),
        ("prompt_jobs", prompt_jobs),
        ("similar_jobs", similar_jobs),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise InvalidInputError(f"{name} must be an integer >= 0 or None, got {value!r}")
    if cap_bytes is not None and cap_bytes <= 0:
        raise InvalidInputError(f"cap_bytes must be a positive integer or None, got {cap_bytes}")

    if size_bytes is not None and cap_bytes is None:
        notes.setdefault("size", "no library cap (FRAGJOBS_LIBRARY_MAX_BYTES unset): costs 0")
    inputs = {
        "extraction_cost": (extraction_s, _saturating(extraction_s, EXTRACTION_REFERENCE_S)),
        "size": (
            size_bytes,
            size_bytes / cap_bytes if size_bytes is not None and cap_bytes else None,
        ),
        "popularity": (prompt_jobs, _saturating(prompt_jobs, JOBS_REFERENCE)),
        "similar_reuse": (similar_jobs, _saturating(similar_jobs, JOBS_REFERENCE)),
    }
    signs = {"extraction_cost": 1.0, "size": -1.0, "popularity": 1.0, "similar_reuse": 1.0}
    terms: dict[str, dict[str, Any]] = {}
    score = 0.0
    for name, (value, normalised) in inputs.items():
        weight = float(getattr(weights, name))
        contribution = 0.0 if normalised is None else signs[name] * weight * normalised
        score += contribution
        term: dict[str, Any] = {
            "value": value,
            "normalised": None if normalised is None else round(normalised, 6),
            "weight": weight,
            "contribution": round(contribution, 6),
        }
        if normalised is None or name in notes:
            term["note"] = notes.get(name, "not known: counts 0")
        terms[name] = term
    score = round(score, 6)
    placement = "shared" if score >= threshold else "local"
    return CacheDecision(placement, score, float(threshold), terms)


def _saturating(value: float | None, reference: float) -> float | None:
    """``value / (value + reference)``: 0 at 0, 0.5 at ``reference``, toward 1 beyond."""
    return None if value is None else value / (value + reference)
