"""The library as a cache: where a new fragment goes, and the shared library's size cap.

* :func:`place_fragment` (when a fragment is stored): scores it with
  :func:`~fragjobs.chain.cache_policy.should_cache_fragment` from what the catalog knows
  (its prompt's jobs, similar prompts' jobs) and what the extraction cost; the decision is
  recorded in the fragment's ``params["cache"]`` and its ``placement``. A ``local`` fragment's
  objects go to this node's folder (:func:`~fragjobs.chain.stored.node_store`), not the
  shared store.
* :func:`enforce_library_cap` (when a fragment becomes ready, and ``fragjobs fragments gc``):
  while the shared library's ready fragments add up to more than the cap, the least recently
  used unpinned one is evicted (:func:`~fragjobs.chain.maintenance.evict_fragment`: objects
  deleted, row kept as ``evicted``); it is rebuilt from its stored profile when asked for
  again (:mod:`fragjobs.chain.rebuild`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from fragjobs.catalog import FragmentEntity
from fragjobs.chain.cache_policy import CacheDecision, CacheWeights, should_cache_fragment
from fragjobs.chain.locks import write_lock
from fragjobs.chain.maintenance import CAP_EVICTION, evict_fragment
from fragjobs.chain.stored import node_store, object_of
from fragjobs.chain.workspaces import Workspace
from fragjobs.errors import ConfigError, InvalidInputError
from fragjobs.keys import normalise_prompt
from fragjobs.library import similarity_index

log = logging.getLogger("fragjobs")

SIMILAR_WORD_OVERLAP = 0.5
"""Without an embedding, two prompts are similar when their word sets overlap this much."""
SIMILAR_LIMIT = 64
"""The most similar ready fragments whose prompts' jobs count as predicted reuse."""

CAP_LOCK = "library-cap"
"""The write lock that serialises evictions by the cap across processes."""


@dataclass
class CapReport:
    """What :func:`enforce_library_cap` did: the cap, the library's bytes before and after,
    the fragments evicted (key → bytes), and pinned bytes that keep it over the cap."""

    max_bytes: int | None
    before_bytes: int
    after_bytes: int
    evicted: dict[str, int] = field(default_factory=dict)

    @property
    def over_cap(self) -> bool:
        """Whether the library is still over the cap (only pinned fragments are left)."""
        return self.max_bytes is not None and self.after_bytes > self.max_bytes


def enforce_library_cap(
    ws: Workspace, max_bytes: int | None = None, *, keep: str | None = None
) -> CapReport:
    """Evict least recently used, unpinned, ready shared fragments until the library fits.

    Args:
        ws: the workspace.
        max_bytes: the cap; None uses ``FRAGJOBS_LIBRARY_MAX_BYTES`` (unset: nothing to do).
        keep: a fragment never evicted by this call (the one just stored).

    Returns:
        What was evicted and the library's size before and after.

    Raises:
        InvalidInputError: ``max_bytes`` is not a positive integer, or smaller than one
            fragment (``keep``, the largest pinned one, or the smallest in the library);
            nothing is evicted.
        ConfigError: the same, for a cap from the settings.
    """
    from_settings = max_bytes is None
    cap = ws.settings.library_max_bytes if from_settings else max_bytes
    if cap is None:
        size = ws.catalog.library_bytes()
        return CapReport(None, size, size)
    error = ConfigError if from_settings else InvalidInputError
    what = f"FRAGJOBS_LIBRARY_MAX_BYTES={cap}" if from_settings else f"the cap {cap!r}"
    if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
        raise error(f"{what} must be a positive number of bytes")
    with write_lock(ws, CAP_LOCK):
        _check_cap_holds_a_fragment(ws, cap, keep, error, what)
        before = ws.catalog.library_bytes()
        report = CapReport(cap, before, before)
        total = before
        for row in ws.catalog.eviction_candidates():
            if total <= cap:
                break
            if row.key == keep:
                continue
            evicted = evict_fragment(
                ws,
                row.key,
                f"{CAP_EVICTION}: the library was over its cap of {cap} bytes "
                "(least recently used, not pinned)",
                only_if=_still_evictable,
            )
            if evicted is not None:
                report.evicted[row.key] = evicted.size_bytes or 0
                total -= evicted.size_bytes or 0
        report.after_bytes = ws.catalog.library_bytes()
    if report.evicted:
        log.info("library cap %d bytes: evicted %s", cap, ", ".join(report.evicted))
    if report.over_cap:
        log.warning(
            "the library holds %d bytes, over its cap of %d: the rest is pinned",
            report.after_bytes,
            cap,
        )
    return report


def _still_evictable(row: FragmentEntity) -> bool:
    return row.status == "ready" and row.placement == "shared" and not row.pinned


def _check_cap_holds_a_fragment(
    ws: Workspace, cap: int, keep: str | None, error: type[Exception], what: str
) -> None:
    """Refuse a cap smaller than a fragment it must hold, before anything is evicted."""
    if keep is not None:
        row = ws.catalog.get_fragment(keep)
        if row.placement == "shared" and row.size_bytes is not None and row.size_bytes > cap:
            raise error(
                f"{what} is smaller than fragment {keep} ({row.size_bytes} bytes): "
                "raise the cap or unset it"
            )
    pinned = ws.catalog.largest_pinned_bytes()
    if pinned > cap:
        raise error(
            f"{what} is smaller than the largest pinned fragment ({pinned} bytes): raise the "
            "cap or unpin it (fragjobs fragments unpin KEY)"
        )
    sizes = [r.size_bytes for r in ws.catalog.eviction_candidates() if r.size_bytes]
    if sizes and min(sizes) > cap:
        raise error(
            f"{what} is smaller than the smallest fragment in the library ({min(sizes)} "
            "bytes): it could hold none; raise the cap"
        )


def place_fragment(
    ws: Workspace,
    key: str,
    prompt: str,
    base_model_id: int,
    size_bytes: int,
    extraction_s: float,
    embedding: list[float] | None = None,
) -> CacheDecision:
    """Decide where fragment ``key`` goes (``should_cache_fragment``) and record it.

    Called when the fragment is built, before its objects are written: they are then
    written to the store of its placement (:func:`~fragjobs.chain.stored.store_of`).

    Returns:
        The decision; its placement and terms are on the catalog row already.

    Raises:
        ConfigError: it is larger than ``FRAGJOBS_LIBRARY_MAX_BYTES`` (nothing is recorded).
    """
    settings = ws.settings
    cap = settings.library_max_bytes
    if cap is not None and size_bytes > cap:
        raise ConfigError(
            f"FRAGJOBS_LIBRARY_MAX_BYTES={cap} is smaller than fragment {key} "
            f"({size_bytes} bytes): the library could not hold it; raise the cap or unset it"
        )
    wanted = normalise_prompt(prompt)
    counts = ws.catalog.prompt_job_counts(base_model_id)
    similar, note = _similar_prompt_jobs(ws, base_model_id, wanted, counts, embedding)
    decision = should_cache_fragment(
        extraction_s=extraction_s,
        size_bytes=size_bytes,
        cap_bytes=settings.library_max_bytes,
        prompt_jobs=counts.get(wanted, 0),
        similar_jobs=similar,
        weights=CacheWeights.from_settings(settings),
        threshold=settings.cache_share_threshold,
        notes={"similar_reuse": note},
    )
    folder = object_of(ws.catalog.get_fragment(key), "")[:-1]
    store = node_store(ws) if decision.placement == "local" else ws.store
    ws.catalog.set_placement(key, decision.placement, decision.to_json(), store.uri(folder))
    return decision


def _similar_prompt_jobs(
    ws: Workspace,
    base_model_id: int,
    wanted: str,
    counts: dict[str, int],
    embedding: list[float] | None,
) -> tuple[int, str]:
    """Jobs of the prompts this fragment would be reused for, and how they were found.

    With the fragment's prompt embedding: the prompts of the ready fragments that the
    library's similar-prompt lookup would match (:func:`fragjobs.library.similarity_index`,
    each at or above its own reuse threshold), the way a later similar prompt finds a
    fragment. Without one: prompts sharing most of their words.
    """
    if embedding:
        index = similarity_index(ws.catalog)
        index.refresh(base_model_id)
        prompts = set()
        for key, _similarity in index.candidates(base_model_id, embedding, limit=SIMILAR_LIMIT):
            row = ws.catalog.find_fragment(key)
            if row is not None:
                prompts.add(normalise_prompt(row.prompt))
        prompts.discard(wanted)
        return sum(counts.get(p, 0) for p in prompts), (
            f"jobs of the prompts of up to {SIMILAR_LIMIT} ready fragments whose prompt "
            "embedding is at or above their reuse threshold (the similar-prompt lookup)"
        )
    words = _words(wanted)
    similar = sum(
        n
        for other, n in counts.items()
        if other != wanted and _overlap(words, _words(other)) >= SIMILAR_WORD_OVERLAP
    )
    return similar, (
        f"no prompt embedding: jobs of prompts sharing >= {SIMILAR_WORD_OVERLAP:.0%} of their "
        "words (Jaccard)"
    )


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def _words(prompt: str) -> set[str]:
    return set(re.findall(r"\w+", prompt))
