"""The farm side of the core: the only part of ``fragjobs`` that talks to Celery and Redis.

* :mod:`~fragjobs.farm.settings` — :class:`FarmSettings` (``FRAGJOBS_*``) and queue names;
* :mod:`~fragjobs.farm.client` — :class:`Farm`: check a job and submit the chain;
* :mod:`~fragjobs.farm.jobs` — :class:`FarmJob`: follow a submitted job, wait for it;
* :mod:`~fragjobs.farm.results` — the client's result backend (polled, never subscribed);
* :mod:`~fragjobs.farm.launcher` — one node's workers, one per GPU (``fragjobs farm start``);
* :mod:`~fragjobs.farm.registry` — the warm-fragment registry behind fragment affinity;
* :mod:`~fragjobs.farm.flower` — Flower with a login.

Celery, kombu and redis are imported only where they are used, so the launcher and the
commands that only read settings stay fast. The Celery app and its tasks are in ``tasks/``.
"""

from __future__ import annotations

from fragjobs.lazy_exports import lazy_getattr

_EXPORTS = {
    "FarmSettings": "fragjobs.farm.settings",
    "SHARED_QUEUE": "fragjobs.farm.settings",
    "Farm": "fragjobs.farm.client",
    "FarmJob": "fragjobs.farm.jobs",
    "FarmResult": "fragjobs.farm.jobs",
    "plan_batch_queues": "fragjobs.farm.client",
    "AFFINITY_INSPECT_TIMEOUT_S": "fragjobs.farm.client",
    "WorkerSpec": "fragjobs.farm.launcher",
    "default_node": "fragjobs.farm.launcher",
    "parse_gpus": "fragjobs.farm.launcher",
    "worker_specs": "fragjobs.farm.launcher",
    "worker_command": "fragjobs.farm.launcher",
    "worker_env": "fragjobs.farm.launcher",
    "farm_env": "fragjobs.farm.launcher",
    "run_workers": "fragjobs.farm.launcher",
    "project_root": "fragjobs.farm.launcher",
    "make_celeryconfig_importable": "fragjobs.farm.launcher",
    "WarmRegistry": "fragjobs.farm.registry",
    "WarmWorker": "fragjobs.farm.registry",
    "WARM_KEY_PREFIX": "fragjobs.farm.registry",
    "scratch_redis_database": "fragjobs.farm.registry",
    "flower_command": "fragjobs.farm.flower",
    "flower_env": "fragjobs.farm.flower",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(globals(), _EXPORTS)
