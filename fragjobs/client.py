"""The farm's Python entry point: ``from fragjobs.client import Farm``.

The farm side lives in :mod:`fragjobs.farm` (see :mod:`fragjobs.farm.client`); this module
only names it, so that importing it costs nothing until a name is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_NAMES = ("Farm", "FarmJob", "FarmResult", "Batch", "plan_batch_queues")

__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(import_module("fragjobs.farm.client"), name)
    raise AttributeError(f"module 'fragjobs.client' has no attribute {name!r}")
