"""Task deliveries in the catalog: how often each farm task was handed to a worker."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fragjobs.catalog.checks import _check_text
from fragjobs.catalog.core import CatalogCore
from fragjobs.errors import InvalidInputError
from models import TaskDeliveryRow, utcnow


def _find_delivery(session: Session, task_id: str) -> TaskDeliveryRow | None:
    query = select(TaskDeliveryRow).where(TaskDeliveryRow.task_id == task_id)
    return session.scalars(query).one_or_none()


class DeliveriesMixin(CatalogCore):
    """The task-delivery methods of :class:`~fragjobs.catalog.catalog.Catalog`."""

    def count_task_delivery(self, task_id: str, name: str) -> int:
        """Count one more delivery of task ``task_id`` (named ``name``); return the count.

        The first delivery inserts the row; every later one increments it atomically, so a
        task redelivered after it killed its worker is counted each time.
        """
        _check_text(task_id, "task_id")
        _check_text(name, "task name")
        if len(task_id) > 200 or len(name) > 100:
            raise InvalidInputError("task id or task name too long for the catalog")
        self._insert_or_get(
            lambda s: _find_delivery(s, task_id),
            lambda s: TaskDeliveryRow(task_id=task_id, name=name, attempts=0),
            lambda row: row.id,
        )
        with self._transaction() as session:
            return session.execute(
                update(TaskDeliveryRow)
                .where(TaskDeliveryRow.task_id == task_id)
                .values(attempts=TaskDeliveryRow.attempts + 1, last_at=utcnow())
                .returning(TaskDeliveryRow.attempts)
            ).scalar_one()
