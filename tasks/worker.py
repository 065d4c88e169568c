"""Worker start-up: refuse an unusable catalog, open one workspace per pool process.

* ``worker_init`` (main worker process, before the pool forks): the catalog must be reachable
  and at this code's schema revision; otherwise the worker logs why (with the command that
  fixes it) and exits with status :data:`EXIT_CATALOG_UNUSABLE` instead of failing every task.
* ``worker_process_init`` (each pool process, after fork): forget the workspaces inherited
  from the parent, so that no database connection or pool is shared across processes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery.signals import worker_init, worker_process_init

from fragjobs import chain
from fragjobs.catalog import Catalog
from fragjobs.errors import CatalogError

log = logging.getLogger("fragjobs.tasks")

EXIT_CATALOG_UNUSABLE = 3


@worker_init.connect
def refuse_unusable_catalog(**_: Any) -> None:
    """Exit the worker when the catalog is unreachable or its schema is out of date.

    The embedded SQLite file is migrated here, as the embedded default always is; a server
    database (PostgreSQL) is only checked: it is migrated by ``fragjobs db upgrade``.
    """
    try:
        catalog = Catalog.open_embedded()
    except CatalogError as exc:
        log.critical("fragjobs worker refuses to start: %s", exc)
        # A signal receiver's exceptions are logged and swallowed by Celery; SystemExit is not.
        sys.exit(EXIT_CATALOG_UNUSABLE)
    catalog.dispose()


@worker_process_init.connect
def open_own_workspace(**_: Any) -> None:
    """Drop workspaces inherited through fork: this process opens its own on first use."""
    chain._WORKSPACES.clear()
