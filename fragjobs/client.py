"""The farm's Python entry point: ``from fragjobs.client import Farm``.

The farm side lives in :mod:`fragjobs.farm` (see :mod:`fragjobs.farm.client`); this module
only names it, so that importing it costs nothing until a name is used.
"""

from __future__ import annotations

from fragjobs.lazy_exports import lazy_getattr

_NAMES = ("Farm", "FarmJob", "FarmResult", "Batch", "plan_batch_queues")

_EXPORTS = {
    "Farm": "fragjobs.farm.client",
    "plan_batch_queues": "fragjobs.farm.client",
    "FarmJob": "fragjobs.farm.jobs",
    "FarmResult": "fragjobs.farm.jobs",
    "Batch": "fragjobs.farm.jobs",
}

__all__ = list(_NAMES)


__getattr__ = lazy_getattr(globals(), _EXPORTS)
