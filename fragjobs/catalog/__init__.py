"""The catalog API: base models, profiles, fragments, validations, jobs and images (DESIGN §4).

The catalog is a SQL database (SQLite file for the embedded default, PostgreSQL for the farm)
whose tables are declared in :mod:`models` and created by alembic (``migrations/``). ORM rows
never leave this package: every method returns a frozen dataclass of plain values.

Layout: :mod:`~fragjobs.catalog.catalog` assembles :class:`Catalog` from
:mod:`~fragjobs.catalog.core` (engine, transaction scope, idempotent insert) and one mixin per
entity (:mod:`~fragjobs.catalog.bases`, :mod:`~fragjobs.catalog.profiles`,
:mod:`~fragjobs.catalog.fragments`, :mod:`~fragjobs.catalog.validations`,
:mod:`~fragjobs.catalog.jobs`, :mod:`~fragjobs.catalog.lineage`); the entities are in
:mod:`~fragjobs.catalog.entities`, input checks in :mod:`~fragjobs.catalog.checks`, URLs and
engines in :mod:`~fragjobs.catalog.database`, alembic in :mod:`~fragjobs.catalog.schema`.

Example::

    upgrade_database("sqlite:////tmp/catalog.db")
    with Catalog("sqlite:////tmp/catalog.db") as catalog:
        model = catalog.get_or_create_base_model("tiny-sd", sha, "builtin:tiny-sd")
"""

from fragjobs.catalog.catalog import Catalog
from fragjobs.catalog.database import mask_url
from fragjobs.catalog.entities import (
    BaseModelEntity,
    FragmentEntity,
    ImageEntity,
    JobEntity,
    ProfileEntity,
    ValidationEntity,
)
from fragjobs.catalog.fragments import _find_fragment as _find_fragment
from fragjobs.catalog.schema import (
    UPGRADE_COMMAND,
    current_revision,
    head_revision,
    upgrade_database,
)
from fragjobs.catalog.schema import _alembic_config as _alembic_config

__all__ = [
    "UPGRADE_COMMAND",
    "BaseModelEntity",
    "Catalog",
    "FragmentEntity",
    "ImageEntity",
    "JobEntity",
    "ProfileEntity",
    "ValidationEntity",
    "current_revision",
    "head_revision",
    "mask_url",
    "upgrade_database",
]
