"""A base model's identity: its sha256 over its weights plus its name (DESIGN §3), and where
it came from.

* a folder: every weight file (``*.safetensors``, ``*.bin``, ``*.ckpt``), sorted by relative
  path, streamed; cached per (path, size, mtime) in ``<data_dir>/base_hashes.json``;
* a built-in: every tensor of every component's ``state_dict`` (sorted by name; name, dtype,
  shape and bytes), cached per (name, torch version, diffusers version).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragjobs.config import Settings, get_settings
from fragjobs.errors import UnknownModelError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "vae")
"""The pipeline components a built-in's id covers (those it has)."""


@dataclass(frozen=True)
class BaseModelInfo:
    """Who a pipeline is: ``name`` (as given), ``sha256`` (its id) and ``source``."""

    name: str
    sha256: str
    source: str
    height: int
    width: int
    default_steps: int
    default_guidance: float = 7.5
    clip_path: str | None = None  # a matching local CLIPModel folder, when one ships


def model_source(source: str, name: str) -> str:
    """What :func:`load_base` takes to load a base again from its recorded ``source``.

    ``builtin:NAME`` → ``NAME``, ``folder:/abs/path`` → the path, ``hub:ID`` → ``ID``,
    ``store:SHA256`` → ``store:SHA256`` unchanged (a base in the shared store, fetched into the
    node cache by :func:`fragjobs.chain.bases.base`); anything else → ``name``. A folder's
    catalog name is only its last path part, so a chain step that reloads a base must use
    this, not the name.
    """
    kind, _, where = (source or "").partition(":")
    if kind == "store" and where:
        return source
    if kind in ("builtin", "folder", "hub") and where:
        return where
    return name


def folder_sha256(folder: Path, name: str, settings: Settings | None = None) -> str:
    """The sha256 of the diffusers folder ``folder`` as base ``name``, without loading it.

    The same value, and the same cache entry, as :func:`fragjobs.base_models.load_base`
    computes for the folder when ``name`` is the folder's own name.

    Raises:
        UnknownModelError: the folder holds no weight files.
    """
    settings = settings or get_settings()
    stats = [
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    ]
    return cached_hash(
        ("folder", str(folder), name, stats), settings, lambda: hash_weight_files(folder, name)
    )


def folder_info(
    folder: Path, settings: Settings, size: int, name: str | None = None
) -> BaseModelInfo:
    """A folder's identity as base ``name`` (default: the folder's name); ``size``: its default
    image side (:func:`fragjobs.base_folders.image_size`)."""
    name = name or folder.name
    sha = folder_sha256(folder, name, settings)
    return BaseModelInfo(name, sha, f"folder:{folder}", size, size, 20)


def hash_weight_files(folder: Path, name: str) -> str:
    """sha256 over the folder's weight files (sorted relative paths, streamed) plus ``name``."""
    digest = hashlib.sha256(f"fragjobs-base-v1:{name}\n".encode())
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise UnknownModelError(f"{folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\n".encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def hash_state_dicts(pipe: Any, name: str) -> str:
    """sha256 over every tensor of the pipeline's :data:`COMPONENTS` plus ``name``."""
    import torch

    digest = hashlib.sha256(f"fragjobs-base-v1:{name}\n".encode())
    for component in COMPONENTS:
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for key, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{component}.{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_hash(cache_key: tuple, settings: Settings, compute) -> str:
    path = settings.data_dir / "base_hashes.json"
    key = json.dumps(cache_key)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    value = compute()
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation; a read-only data dir only costs a re-hash
    return value
