"""The Celery app of the fragjobs farm: ``celery -A tasks.app worker`` (DESIGN §5).

Configuration comes from ``celeryconfig`` (the environment only); the tasks live in
:mod:`tasks.chain`, the worker's start-up checks in :mod:`tasks.worker`.
"""

from celery import Celery

app = Celery("fragjobs", include=["tasks.chain", "tasks.worker"])
app.config_from_object("celeryconfig")
