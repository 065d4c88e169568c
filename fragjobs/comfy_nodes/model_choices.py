"""The models ``ProfilerModelLoader`` offers: fragjobs' built-ins and diffusers folders.

Diffusers folders are those under ComfyUI's ``models/diffusers`` (listed by their path below
it, as ComfyUI's own diffusers loader lists them) and those under fragjobs'
``<FRAGJOBS_DATA_DIR>/models`` (listed by absolute path, as ``fragjobs`` lists them).
"""

from __future__ import annotations

import os
from pathlib import Path

from fragjobs.config import get_settings
from fragjobs.errors import UnknownModelError


def _comfyui_diffusers_roots() -> list[Path]:
    """ComfyUI's ``diffusers`` model folders; none outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return []
    return [Path(p) for p in folder_paths.get_folder_paths("diffusers") if os.path.isdir(p)]


def _diffusers_folders(root: Path) -> list[str]:
    """Folders under ``root`` holding a ``model_index.json``, relative to ``root``."""
    found = []
    for folder, _dirs, files in os.walk(root, followlinks=True):
        if "model_index.json" in files:
            found.append(Path(folder).relative_to(root).as_posix())
    return sorted(found)


def model_choices() -> list[str]:
    """The default model first, then the other built-ins, ComfyUI's and fragjobs' folders."""
    from fragjobs.base_folders import available_models

    settings = get_settings()
    names = available_models(settings)
    for root in _comfyui_diffusers_roots():
        names += [name for name in _diffusers_folders(root) if name not in names]
    if settings.default_model in names:
        names.remove(settings.default_model)
        names.insert(0, settings.default_model)
    return names


def resolve_model(model_name: str) -> str:
    """What :func:`fragjobs.load_base` takes for a ``model_name`` of :func:`model_choices`.

    Raises:
        UnknownModelError: ``model_name`` is not one of the choices.
    """
    from fragjobs.builtin import BUILTINS

    if model_name in BUILTINS or Path(model_name).is_absolute():
        return model_name
    for root in _comfyui_diffusers_roots():
        folder = root / model_name
        if (folder / "model_index.json").is_file():
            return str(folder)
    raise UnknownModelError(
        f"unknown model {model_name!r}: choose one of {', '.join(model_choices())} "
        "(diffusers folders go in ComfyUI's models/diffusers)"
    )
