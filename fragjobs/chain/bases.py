"""The base pipelines this process keeps loaded, found again by what they are.

A base is named by a built-in name, a folder, a hub id, or ``store:<sha256>`` — a base added
to the shared store (``fragjobs models add``), fetched into this node's cache
(:class:`fragjobs.base_cache.BaseCache`) and loaded from there. A step that reloads the base
of a catalog row (:func:`base_of`) checks the loaded sha256 against the row's.
"""

from __future__ import annotations

from fragjobs.base_cache import BaseCache
from fragjobs.base_identity import model_source
from fragjobs.base_models import LoadedBase, load_base
from fragjobs.base_store import open_settings_store, stored_sha256
from fragjobs.catalog import BaseModelEntity
from fragjobs.chain.state import STATE, WARM_BASES
from fragjobs.config import Settings, get_settings
from fragjobs.errors import BaseModelMismatchError


def base(model: str | None, settings: Settings | None = None) -> LoadedBase:
    """The loaded base pipeline (kept warm: the :data:`WARM_BASES` most recently used).

    ``store:<sha256>`` is served by any warm base with that sha256, else fetched from the
    store into the node cache (every file checked) and loaded from there.

    Raises:
        BaseModelMismatchError: a stored base's folder does not hash to its sha256.
    """
    settings = settings or get_settings()
    model = model or settings.default_model
    key = (model, settings.device)
    if key not in STATE.bases:
        sha256 = stored_sha256(model)
        warm = [
            k
            for k, v in STATE.bases.items()
            if sha256 and v.info.sha256 == sha256 and k[1] == settings.device
        ]
        if warm:
            key = warm[0]
        else:
            STATE.bases[key] = _load(model, sha256, settings)
            while len(STATE.bases) > WARM_BASES:
                STATE.bases.popitem(last=False)
    STATE.bases.move_to_end(key)
    return STATE.bases[key]


def base_of(base_row: BaseModelEntity, settings: Settings | None = None) -> LoadedBase:
    """The base of a catalog row, loaded again from where it came from (built-in, folder,
    hub, store), checked against the row's sha256.

    Raises:
        BaseModelMismatchError: what loads from there is not that base any more (a folder
            changed after it was registered); nothing was done with it.
    """
    source = model_source(base_row.source, base_row.name)
    loaded = base(source, settings)
    if loaded.info.sha256 != base_row.sha256:
        raise BaseModelMismatchError(
            f"base model {base_row.name} changed since it was registered: {source} hashes to "
            f"{loaded.info.sha256[:12]}…, the catalog has {base_row.sha256[:12]}…; restore "
            "it, or use the changed folder as a new model"
        )
    return loaded


def held_bases(settings: Settings | None = None) -> tuple[list[str], list[str]]:
    """The sha256s of the bases this process holds loaded (most recently used first) and of
    those in this node's base cache: what a farm worker advertises."""
    loaded = list(dict.fromkeys(b.info.sha256 for b in reversed(STATE.bases.values())))
    cache = BaseCache.from_settings(settings or get_settings())
    return loaded, [index.sha256 for index in cache.cached()]


def _load(model: str, sha256: str | None, settings: Settings) -> LoadedBase:
    if sha256 is None:
        return load_base(model, settings=settings)
    folder = BaseCache.from_settings(settings).fetch(open_settings_store(settings), sha256)
    loaded = load_base(str(folder), settings=settings)
    if loaded.info.sha256 != sha256:
        raise BaseModelMismatchError(
            f"the node's copy of base {sha256[:12]}… in {folder} hashes to "
            f"{loaded.info.sha256[:12]}…: delete that folder to fetch it again"
        )
    return loaded
