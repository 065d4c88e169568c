"""The fragment library's lookup: exact key → same prompt → similar prompt → miss.

The catalog is the index; the store holds the bytes. A lookup never returns a fragment that
is not ``ready`` (built and passed its gate); the caller falls back to the full model then.
A *similar* prompt is one whose text embedding (the base model's own text encoder, pooled,
L2-normalised: ``cosine_clip_text``) has cosine similarity ≥ the fragment's reuse threshold
(0.8 by default) with the fragment's prompt embedding, recorded in its manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fragjobs.catalog import Catalog, FragmentEntity
from fragjobs.keys import normalise_prompt, validate_key
from fragjobs.manifest import FragmentManifest

if TYPE_CHECKING:
    import torch

READY = "ready"


@dataclass(frozen=True)
class CacheHit:
    """A usable fragment and how it was found (``exact``, ``prompt`` or ``similar``)."""

    fragment: FragmentEntity
    match: str
    similarity: float | None = None


def lookup_exact(catalog: Catalog, key: str) -> FragmentEntity | None:
    """The fragment with this key, whatever its status, or ``None``."""
    return catalog.find_fragment(validate_key(key))


def lookup_prompt(catalog: Catalog, base_model_id: int, prompt: str) -> FragmentEntity | None:
    """The most recently used ready fragment made for this (normalised) prompt on this base."""
    wanted = normalise_prompt(prompt)
    candidates = [
        f
        for f in catalog.list_fragments(status=READY, base_model_id=base_model_id)
        if normalise_prompt(f.prompt) == wanted
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda f: (f.last_used_at or f.created_at, f.hit_count))


def lookup_similar(
    catalog: Catalog,
    base_model_id: int,
    embedding: torch.Tensor,
    read_manifest: Callable[[FragmentEntity], FragmentManifest],
) -> CacheHit | None:
    """The ready fragment whose prompt embedding is most similar, if above its threshold."""
    best: CacheHit | None = None
    for row in catalog.list_fragments(status=READY, base_model_id=base_model_id):
        reuse = read_manifest(row).reuse
        if reuse.prompt_embedding is None:
            continue
        stored = embedding.new_tensor(reuse.prompt_embedding)
        if stored.shape != embedding.shape:
            continue
        similarity = float(stored @ embedding / (stored.norm() * embedding.norm()).clamp_min(1e-12))
        if similarity >= reuse.threshold and (best is None or similarity > best.similarity):
            best = CacheHit(row, "similar", round(similarity, 6))
    return best
