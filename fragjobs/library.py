"""The fragment library's lookup: exact key → same prompt → similar prompt → miss.

The catalog is the index; the store holds the bytes. A lookup never returns a fragment that
is not ``ready`` (built and passed its gate); the caller falls back to the full model then.
A *similar* prompt is one whose text embedding (the base model's own text encoder, pooled,
L2-normalised: ``cosine_clip_text``) has cosine similarity ≥ the fragment's reuse threshold
(0.8 by default) with the fragment's prompt embedding.

No lookup reads a manifest: the same-prompt lookup is one indexed query on the prompt's hash
(:meth:`~fragjobs.catalog.Catalog.latest_ready_for_prompt`), and the similar-prompt lookup is
a matrix-vector product over the embeddings held in memory by
:class:`~fragjobs.library_index.SimilarityIndex` (one per catalog, refreshed incrementally from
the catalog's ``prompt_embedding`` column before each lookup). The only manifest reads left
are the one-time backfill of a fragment whose embedding column was never written.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fragjobs.catalog import Catalog, FragmentEntity
from fragjobs.keys import prompt_hash, validate_key
from fragjobs.library_index import SimilarityIndex
from fragjobs.manifest import FragmentManifest

if TYPE_CHECKING:
    import torch

READY = "ready"

_indexes: weakref.WeakKeyDictionary[Catalog, SimilarityIndex] = weakref.WeakKeyDictionary()
_indexes_lock = threading.Lock()


@dataclass(frozen=True)
class CacheHit:
    """A usable fragment and how it was found (``exact``, ``prompt`` or ``similar``)."""

    fragment: FragmentEntity
    match: str
    similarity: float | None = None


def similarity_index(catalog: Catalog) -> SimilarityIndex:
    """The similar-prompt index of ``catalog`` (one per catalog object, kept while it lives)."""
    with _indexes_lock:
        index = _indexes.get(catalog)
        if index is None:
            index = _indexes[catalog] = SimilarityIndex(catalog)
        return index


def lookup_exact(catalog: Catalog, key: str) -> FragmentEntity | None:
    """The fragment with this key, whatever its status, or ``None``."""
    return catalog.find_fragment(validate_key(key))


def lookup_prompt(catalog: Catalog, base_model_id: int, prompt: str) -> FragmentEntity | None:
    """The most recently used ready fragment made for this (normalised) prompt on this base.

    One indexed query; raises InvalidInputError for a blank prompt.
    """
    return catalog.latest_ready_for_prompt(base_model_id, prompt_hash(prompt))


def lookup_similar(
    catalog: Catalog,
    base_model_id: int,
    embedding: torch.Tensor | np.ndarray | list[float],
    read_manifest: Callable[[FragmentEntity], FragmentManifest] | None = None,
) -> CacheHit | None:
    """The ready fragment whose prompt embedding is most similar, if above its threshold.

    Args:
        catalog: the library's catalog.
        base_model_id: only fragments of this base model match.
        embedding: the prompt's text embedding (1-D; any norm).
        read_manifest: reads a fragment's manifest; used only to backfill, once, the
            embedding of a ready fragment whose catalog row has none.

    Returns:
        The most similar ready fragment at or above its reuse threshold (the catalog
        confirms it is still ready), or None.
    """
    index = similarity_index(catalog)
    index.refresh(base_model_id, _backfill(catalog, read_manifest) if read_manifest else None)
    for key, similarity in index.candidates(base_model_id, _as_array(embedding)):
        row = catalog.find_fragment(key)
        if row is not None and row.status == READY and row.base_model_id == base_model_id:
            return CacheHit(row, "similar", round(similarity, 6))
        index.drop(base_model_id, key)  # deleted, or no longer ready since the refresh
    return None


def _as_array(embedding: Any) -> np.ndarray:
    if hasattr(embedding, "detach"):  # a torch tensor, without importing torch here
        embedding = embedding.detach().float().cpu().numpy()
    return np.asarray(embedding, np.float32)


def _backfill(
    catalog: Catalog, read_manifest: Callable[[FragmentEntity], FragmentManifest]
) -> Callable[[str], tuple[list[float] | None, float | None]]:
    def embedding_of(key: str) -> tuple[list[float] | None, float | None]:
        reuse = read_manifest(catalog.get_fragment(key)).reuse
        return reuse.prompt_embedding, reuse.threshold

    return embedding_of
