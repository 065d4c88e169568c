"""Step 2, extract: build a profile's fragment and store it (status ``building``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fragjobs.chain.bases import base, base_of
from fragjobs.chain.library_cap import place_fragment
from fragjobs.chain.locks import write_lock
from fragjobs.chain.profile_step import profile_from_bytes
from fragjobs.chain.stored import node_store, store_of, verified_objects
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.errors import FragmentIntegrityError, InvalidInputError
from fragjobs.extraction import ExtractionConfig, Fragment, extract_fragment, seal
from fragjobs.keys import (
    FRAGMENT_FILE,
    MANIFEST_FILE,
    PROFILE_STATS_FILE,
    fragment_object,
    make_fragment_key,
    profile_object,
    sha256_hex,
    validate_key,
)
from fragjobs.manifest import FragmentManifest

log = logging.getLogger("fragjobs")


@dataclass
class ExtractResult:
    """A stored fragment: its key, manifest and where its folder is."""

    key: str
    manifest: FragmentManifest
    storage_uri: str
    reused: bool
    elapsed_s: float = 0.0


def extract(
    profile_id: str,
    config: ExtractionConfig | None = None,
    *,
    ws: Workspace | None = None,
    model: str | None = None,
) -> ExtractResult:
    """Extract the fragment of a stored profile and store it (status ``building``).

    Idempotent: if the key is already in the catalog and stored, nothing is extracted again.
    Concurrent calls for one key are serialised (:func:`~fragjobs.chain.locks.write_lock`):
    the first extracts and stores, the others wait and reuse it. A fragment whose stored
    objects are damaged (or marked ``corrupt``) is extracted again and stored in place: its
    row, and so its lineage, stays; its status goes back to ``building`` until validated.
    """
    ws = ws or workspace()
    if config is not None and not isinstance(config, ExtractionConfig):
        raise InvalidInputError(
            f"config must be an ExtractionConfig (see fragjobs.extraction_config), got "
            f"{type(config).__name__}"
        )
    config = config or ExtractionConfig()
    prof_row = ws.catalog.get_profile(validate_key(profile_id))
    base_row = ws.catalog.get_base_model(prof_row.base_model_id)
    loaded = base(model, ws.settings) if model else base_of(base_row, ws.settings)
    if loaded.info.sha256 != base_row.sha256:
        raise InvalidInputError(
            f"profile {profile_id} was made on {base_row.name} ({base_row.sha256[:12]}…), "
            f"which is not the model {loaded.info.name} loaded here"
        )
    started = time.perf_counter()
    stats = ws.store.get_bytes(
        profile_object(profile_id, PROFILE_STATS_FILE), expected_sha256=prof_row.stats_sha256
    )
    prof = profile_from_bytes(stats)
    key = make_fragment_key(loaded.info.name, prof.prompt, config.params(prof))
    with write_lock(ws, f"fragment:{key}"):
        existing = ws.catalog.find_fragment(key)
        if existing is not None and existing.manifest_sha256 is not None:  # stored completely
            try:
                manifest, _ = verified_objects(ws, existing)
                if existing.status != "corrupt":
                    return ExtractResult(key, manifest, existing.storage_uri, reused=True)
            except FragmentIntegrityError as exc:
                log.warning("fragment %s is corrupt (%s): extracting it again", key, exc)
            log.warning("rebuilding corrupt fragment %s in place", key)
        fragment, _unet = extract_fragment(
            loaded.pipe, loaded.info, prof, config, profile_id=profile_id
        )
        return store_fragment(ws, fragment, prof_row, base_row.id, config.params(prof), started)


def store_fragment(ws, fragment: Fragment, prof_row, base_model_id, params, started):
    """Put an extracted fragment in the catalog (status ``building``) and the store; on
    failure nothing of it is left."""
    info = fragment.manifest.base_model
    folder = fragment_object(info.name, fragment.key, "")[:-1]
    row, created = ws.catalog.create_fragment(
        fragment.key,
        prof_row.profile_id,
        base_model_id,
        prof_row.prompt,
        params,
        ws.store.uri(folder),
    )
    try:
        manifest, data = seal(fragment)
        elapsed_s = time.perf_counter() - started
        place_fragment(
            ws,
            fragment.key,
            prof_row.prompt,
            base_model_id,
            len(data),
            elapsed_s,
            embedding=manifest.reuse.prompt_embedding,
        )
        store = store_of(ws, ws.catalog.get_fragment(fragment.key))  # shared or node-local
        stored_file = store.put_bytes(fragment_object(info.name, fragment.key, FRAGMENT_FILE), data)
        manifest_bytes = manifest.to_bytes()
        store.put_bytes(fragment_object(info.name, fragment.key, MANIFEST_FILE), manifest_bytes)
        ws.catalog.update_fragment(
            fragment.key,
            size_bytes=stored_file.size,
            file_sha256=stored_file.sha256,
            manifest_sha256=sha256_hex(manifest_bytes),
        )
        # The similar-prompt lookup reads this column, never the manifest.
        reuse = manifest.reuse
        ws.catalog.set_fragment_embedding(fragment.key, reuse.prompt_embedding, reuse.threshold)
        if not created:
            ws.catalog.set_fragment_status(fragment.key, "building", "rebuilt")
    except BaseException:
        if created:
            ws.store.delete_prefix(folder + "/")
            node_store(ws).delete_prefix(folder + "/")
            ws.catalog.delete_fragment(fragment.key)
        raise
    return ExtractResult(
        fragment.key,
        manifest,
        row.storage_uri,
        reused=False,
        elapsed_s=time.perf_counter() - started,
    )
