"""The Celery app of the fragjobs farm: ``celery -A tasks.app worker`` (DESIGN §5).

Configuration comes from ``celeryconfig`` (the environment only); the chain's tasks live in
:mod:`tasks.chain`, re-validation and catalog queries in :mod:`tasks.catalog`, the worker's
start-up checks and affinity advertisements in :mod:`tasks.worker`.

Monitoring: ``fragjobs flower`` (basic auth from ``FRAGJOBS_FLOWER_USER``/``_PASSWORD``), the
same as ``FLOWER_BASIC_AUTH=user:pw celery -A tasks.app flower``. Schedule: ``celery -A
tasks.app beat`` (re-validation, see ``celeryconfig``).
"""

from celery import Celery

app = Celery("fragjobs", include=["tasks.chain", "tasks.catalog", "tasks.worker"])
app.config_from_object("celeryconfig")
