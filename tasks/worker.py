"""Worker start-up and shutdown: refuse an unhealthy node, own workspaces, affinity.

* ``worker_init`` (main worker process, before the pool forks and before any task is taken):
  the embedded SQLite catalog is migrated, then ``fragjobs doctor`` runs with the farm's
  checks, in a child process (the device check initialises CUDA, which the main process must
  not do before it forks). When a check the farm needs fails (catalog unreachable or out of
  date, store not writable, broker, device, ...) the worker logs every line, with its fix, and
  exits with status :data:`EXIT_WORKER_REFUSED` instead of failing every task.
  The worker's hostname and own queue (``gpu.<node>.<i>``) are noted for the advertisements.
* ``worker_process_init`` (each pool process, after fork): forget the workspaces inherited
  from the parent, so that no database connection or pool is shared across processes, and
  withdraw the worker's warm-fragment advertisement: a new pool process holds nothing warm.
* ``worker_process_shutdown`` / ``worker_shutdown``: withdraw the advertisement.

:func:`advertise_warm_fragments` (called by the generate task) publishes what the pool
process holds warm (:class:`fragjobs.farm.registry.WarmRegistry`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from redis.exceptions import RedisError

from fragjobs import chain, doctor
from fragjobs.catalog import Catalog
from fragjobs.chain.bases import held_bases
from fragjobs.errors import CatalogError, StorageError
from fragjobs.farm.launcher import EXIT_WORKER_REFUSED
from fragjobs.farm.registry import WarmRegistry
from fragjobs.farm.settings import SHARED_QUEUE
from fragjobs.logging_setup import install_redaction

log = logging.getLogger("fragjobs.tasks")


_identity: dict[str, Any] = {"hostname": None, "queue": None, "app": None}
_registry: list[WarmRegistry | None] = []


@after_setup_logger.connect
@after_setup_task_logger.connect
def mask_credentials(logger: Any = None, **_: Any) -> None:
    """Mask credentials (URLs with passwords, S3 signatures) in the worker's log lines."""
    install_redaction(logger)


@worker_init.connect
def refuse_to_start_unhealthy(**_: Any) -> None:
    """Exit the worker, before it takes any task, when ``fragjobs doctor --farm`` fails.

    The embedded SQLite file is migrated first, as the embedded default always is; a server
    database (PostgreSQL) is only checked: it is migrated by ``fragjobs db upgrade``.
    """
    with contextlib.suppress(CatalogError):  # the doctor's database check says why
        Catalog.open_embedded().dispose()
    checks = doctor.run_in_subprocess(farm=True)
    report = "\n".join(check.line() for check in checks)
    if not any(check.broken for check in checks):
        log.info("fragjobs doctor --farm:\n%s", report)
        return
    log.critical("fragjobs worker refuses to start (fragjobs doctor --farm):\n%s", report)
    # A signal receiver's exceptions are logged and swallowed by Celery; SystemExit is not.
    sys.exit(EXIT_WORKER_REFUSED)


@worker_init.connect
def note_identity(sender: Any = None, **_: Any) -> None:
    """Remember this worker's hostname and own queue (inherited by the pool processes)."""
    if sender is None:
        return
    consumed = sorted(sender.app.amqp.queues.consume_from or ())
    own = [name for name in consumed if name != SHARED_QUEUE]
    _identity.update(hostname=sender.hostname, queue=own[0] if own else None, app=sender.app)


@worker_process_init.connect
def open_own_workspace(**_: Any) -> None:
    """Forget what was inherited through fork: this process opens its own on first use."""
    chain.reset_process_state()
    _registry.clear()
    withdraw_advertisement()


@worker_process_shutdown.connect
@worker_shutdown.connect
def withdraw_advertisement(**_: Any) -> None:
    """Delete this worker's warm-fragment advertisement (nothing is held warm any more)."""
    registry = _warm_registry()
    if registry is None:
        return
    try:
        registry.forget(_identity["hostname"])
    except RedisError as exc:
        log.warning("cannot withdraw the warm-fragment advertisement: %s", exc)


def advertise_warm_fragments() -> list[str]:
    """Publish the fragments this pool process holds warm; return their keys.

    Affinity is an optimisation: a broker error is logged, never raised.
    """
    keys = chain.warm_fragment_keys()
    registry = _warm_registry()
    if registry is not None:
        try:
            registry.advertise(_identity["hostname"], _identity["queue"], keys)
        except RedisError as exc:
            log.warning("cannot advertise warm fragments %s: %s", keys, exc)
    return keys


def advertise_warm_bases() -> None:
    """Publish the bases this worker holds (:func:`fragjobs.chain.bases.held_bases`).

    Routing is an optimisation: a broker or cache error is logged, never raised.
    """
    registry = _warm_registry()
    if registry is None:
        return
    try:
        loaded, cached = held_bases()
        registry.advertise_bases(_identity["hostname"], _identity["queue"], loaded, cached)
    except (RedisError, StorageError) as exc:
        log.warning("cannot advertise the bases held here: %s", exc)


def _warm_registry() -> WarmRegistry | None:
    """The registry of this worker's broker; None outside a worker or without Redis."""
    app = _identity["app"]
    if app is None or _identity["hostname"] is None:
        return None
    if not _registry:
        ttl = int(app.conf.get("fragjobs_affinity_ttl_s") or 3600)
        _registry.append(WarmRegistry.for_broker(app.conf.broker_url, ttl))
    return _registry[0]
