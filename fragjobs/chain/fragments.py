"""Reading stored fragments: hash-checked loads, warm UNets, applying one to a pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fragjobs.base_models import LoadedBase, identify
from fragjobs.catalog import FragmentEntity
from fragjobs.chain.state import STATE, WARM_FRAGMENT_UNETS
from fragjobs.chain.stored import update_manifest, verified_objects
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.config import get_settings
from fragjobs.errors import (
    FragmentIntegrityError,
    IntegrityError,
    InvalidInputError,
    ManifestError,
    UnknownModelError,
)
from fragjobs.extraction import (
    Fragment,
    apply_fragment_to_unet_,
    load_fragment_folder,
    read_fragment,
    reset_block_caching,
)
from fragjobs.extraction.fragment import check_base
from fragjobs.extraction.lean_load import build_fragment_unet, empty_unet_like, module_reader
from fragjobs.families import denoiser, supported_pipelines
from fragjobs.keys import validate_key
from fragjobs.manifest import FragmentManifest, PerformanceLayer


def load_stored_fragment(key: str, ws: Workspace | None = None) -> Fragment:
    """Read a fragment from the store, checking manifest and file hashes.

    A store that is not a local folder (S3) is read through the node's warm cache
    (:func:`~fragjobs.chain.workspaces.warm_cache`), so a node fetches each fragment object
    once. A hash mismatch marks the fragment ``corrupt`` in the catalog, then raises.

    Raises:
        NotFoundError: no such fragment in the catalog.
        FragmentIntegrityError: stored bytes do not match their hashes.
    """
    ws = ws or workspace()
    row = ws.catalog.get_fragment(validate_key(key))
    manifest, file_bytes = verified_objects(ws, row)
    try:
        return read_fragment(manifest.to_bytes(), file_bytes)
    except (IntegrityError, ManifestError) as exc:
        ws.catalog.set_fragment_status(key, "corrupt", str(exc)[:500])
        if isinstance(exc, FragmentIntegrityError):
            raise
        raise FragmentIntegrityError(f"fragment {key} is corrupt: {exc}") from exc


def record_performance(
    key: str, performance: PerformanceLayer, ws: Workspace | None = None
) -> FragmentManifest:
    """Store measured timings in the fragment's manifest (``performance.measured_*``)."""
    ws = ws or workspace()
    return update_manifest(ws, key, {"performance": performance})


def fragment_unet(loaded: LoadedBase, fragment: Fragment) -> torch.nn.Module:
    """The fragment's denoiser on the loaded base, without copying the base's.

    Built from the base's config on the meta device (:mod:`fragjobs.extraction.lean_load`):
    the tensors the fragment leaves unchanged are shared with ``loaded``'s denoiser, the rest
    come from the fragment, so it costs only the fragment's own tensors; its int8 layers
    compute as ``FRAGJOBS_INT8_EXECUTION`` says (default ``auto``). Its images are those of
    the edits replayed on a copy of the base.

    Raises:
        BaseModelMismatchError: ``loaded`` is not the fragment's base.
    """
    check_base(fragment, loaded.info)
    return build_fragment_unet(
        empty_unet_like(denoiser(loaded.pipe)),
        fragment,
        module_reader(denoiser(loaded.pipe)),
        int8_execution=get_settings().int8_execution,
    )


def warm_fragment_unet(
    ws: Workspace, loaded: LoadedBase, row: FragmentEntity
) -> tuple[FragmentManifest, torch.nn.Module]:
    """The fragment's manifest and UNet on ``loaded``, built once and kept warm.

    The process keeps the :data:`~fragjobs.chain.state.WARM_FRAGMENT_UNETS` most recently
    used UNets, keyed by fragment key, both stored hashes and the base (a rewritten manifest
    or another base is built anew), so a worker generating batch after batch of one fragment
    loads it once. Block-caching state is reset before a kept UNet is used again.

    Raises:
        FragmentIntegrityError: the fragment cannot be read (see :func:`load_stored_fragment`).
    """
    key = (row.key, row.manifest_sha256, row.file_sha256, loaded.info.sha256, loaded.pipe.device)
    unets = STATE.fragment_unets
    entry = unets.get(key)
    if entry is None:
        fragment = load_stored_fragment(row.key, ws)
        entry = unets[key] = (fragment.manifest, fragment_unet(loaded, fragment))
        while len(unets) > WARM_FRAGMENT_UNETS:
            unets.popitem(last=False)
    else:
        reset_block_caching(entry[1])
    unets.move_to_end(key)
    return entry


def apply_fragment_(
    pipe: Any, key_or_path: str | Path, *, ws: Workspace | None = None
) -> FragmentManifest:
    """Apply a stored fragment to your own diffusers pipeline, in place.

    ``key_or_path`` is a fragment key (read from the workspace's store, hashes checked) or a
    folder holding ``manifest.json`` + ``fragment.safetensors``. The pipeline must be the
    fragment's base model (checked by sha256). Afterwards ``pipe(prompt, ...)`` works as usual;
    the fragment was validated at ``manifest.profiling.steps`` and ``.guidance_scale``, so pass
    those (SDXL's and PixArt's pipelines default to other guidance scales: 5.0, 4.5).
    The edit cannot be undone in place: reload the pipeline to get the full model back.

    Raises:
        BaseModelMismatchError: the pipeline is not the fragment's base.
        FragmentIntegrityError: the fragment's bytes do not match their hashes.
    """
    try:
        module = denoiser(pipe)
    except UnknownModelError as exc:
        raise InvalidInputError(
            f"apply_fragment_ needs a diffusers pipeline of a supported family "
            f"({supported_pipelines()}), got {type(pipe).__name__}"
        ) from exc
    if not isinstance(key_or_path, str | Path):
        raise InvalidInputError(
            f"give a fragment key or a fragment folder, got {type(key_or_path).__name__}"
        )
    path = Path(key_or_path)
    if path.is_dir():
        fragment = load_fragment_folder(path)
    else:
        fragment = load_stored_fragment(str(key_or_path), ws)
    apply_fragment_to_unet_(module, fragment, identify(pipe))
    return fragment.manifest
