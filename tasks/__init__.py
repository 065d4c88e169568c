"""Celery adapters of the fragjobs chain: the app (:mod:`tasks.app`), thin tasks
(:mod:`tasks.chain`) and worker start-up hooks (:mod:`tasks.worker`).

The core library (:mod:`fragjobs`) never imports this package.
"""
