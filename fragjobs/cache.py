"""Fragment lookup: exact key → same prompt on the same base → miss.

The catalog is the index; the store holds the bytes. A lookup never returns a fragment that
is not ``ready`` (built and passed its gate); the caller falls back to the full model then.
"""

from __future__ import annotations

from fragjobs.catalog import Catalog, FragmentEntity
from fragjobs.keys import normalise_prompt, validate_key

READY = "ready"


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
