"""The base pipelines this process keeps loaded, found again by where they came from."""

from __future__ import annotations

from fragjobs.base_models import LoadedBase, load_base, model_source
from fragjobs.catalog import BaseModelEntity
from fragjobs.chain.state import STATE, WARM_BASES
from fragjobs.config import Settings, get_settings


def base(model: str | None, settings: Settings | None = None) -> LoadedBase:
    """The loaded base pipeline (kept warm: the :data:`WARM_BASES` most recently used)."""
    settings = settings or get_settings()
    model = model or settings.default_model
    key = (model, settings.device)
    if key not in STATE.bases:
        STATE.bases[key] = load_base(model, settings=settings)
        while len(STATE.bases) > WARM_BASES:
            STATE.bases.popitem(last=False)
    STATE.bases.move_to_end(key)
    return STATE.bases[key]


def base_of(base_row: BaseModelEntity, settings: Settings | None = None) -> LoadedBase:
    """The base of a catalog row, loaded again from where it came from (built-in, folder, hub).

    The caller checks the loaded sha256 against the row's when it matters.
    """
    return base(model_source(base_row.source, base_row.name), settings)
