"""Installing the nodes into a ComfyUI: a link to this package in its ``custom_nodes/``."""

from __future__ import annotations

import os
from pathlib import Path

from fragjobs.errors import InvalidInputError

PACKAGE_DIR = Path(__file__).resolve().parent
"""This package's folder: what ComfyUI loads (its ``__init__`` exports the node mappings)."""

LINK_NAME = "fragjobs-nodes"


def link_into_comfyui(comfyui: Path | str, name: str = LINK_NAME) -> Path:
    """Link the nodes into ``comfyui`` (a ComfyUI folder, or its ``custom_nodes`` folder).

    ComfyUI must run in a Python environment where fragjobs is installed (the nodes import
    it); it loads the link's ``__init__.py`` at start. Linking again is a no-op.

    Returns:
        The link, ``<custom_nodes>/<name>``.

    Raises:
        InvalidInputError: ``comfyui`` has no ``custom_nodes`` folder, or ``name`` there is
            something else already.
    """
    folder = Path(comfyui).expanduser().resolve()
    custom_nodes = folder if folder.name == "custom_nodes" else folder / "custom_nodes"
    if not custom_nodes.is_dir():
        raise InvalidInputError(
            f"{folder} is not a ComfyUI folder (no custom_nodes/ in it): give the folder "
            "holding ComfyUI's main.py, or its custom_nodes folder"
        )
    link = custom_nodes / name
    if link.is_symlink() and Path(os.readlink(link)).resolve() == PACKAGE_DIR:
        return link
    if link.exists() or link.is_symlink():
        raise InvalidInputError(f"{link} exists already: remove it or choose another name")
    link.symlink_to(PACKAGE_DIR, target_is_directory=True)
    return link
