"""The :class:`Catalog` class: the core and one mixin per entity, and the ways to open it."""

from __future__ import annotations

from fragjobs.catalog.bases import BaseModelsMixin
from fragjobs.catalog.database import _is_sqlite
from fragjobs.catalog.deliveries import DeliveriesMixin
from fragjobs.catalog.fragments import FragmentsMixin
from fragjobs.catalog.jobs import JobsMixin
from fragjobs.catalog.library_cache import LibraryCacheMixin
from fragjobs.catalog.lineage import LineageMixin
from fragjobs.catalog.lookup import LookupMixin
from fragjobs.catalog.profiles import ProfilesMixin
from fragjobs.catalog.schema import upgrade_database
from fragjobs.catalog.validations import ValidationsMixin
from fragjobs.config import Settings, get_settings


class Catalog(
    BaseModelsMixin,
    ProfilesMixin,
    FragmentsMixin,
    ValidationsMixin,
    JobsMixin,
    DeliveriesMixin,
    LineageMixin,
    LookupMixin,
    LibraryCacheMixin,
):
    """The catalog database at a SQLAlchemy URL.

    Args:
        url: ``sqlite:////abs/catalog.db`` or ``postgresql+psycopg://user:pw@host/db``.
        check_schema: refuse a database whose schema is missing or not at this code's
            revision.

    Raises:
        SchemaOutOfDateError: the schema is missing or out of date; the message gives the
            command that fixes it (``fragjobs db upgrade``).
        CatalogError: the database cannot be reached.
    """

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Catalog:
        """The catalog at ``settings.resolved_database_url`` (schema checked, not migrated)."""
        return cls((settings or get_settings()).resolved_database_url)

    @classmethod
    def open_embedded(cls, settings: Settings | None = None) -> Catalog:
        """The catalog of the settings, migrated first when it is the embedded SQLite file.

        The embedded default needs no setup step: its schema is created or upgraded here. A
        server database (the farm's PostgreSQL) is never migrated implicitly; it is only
        checked, as in :meth:`from_settings`.
        """
        url = (settings or get_settings()).resolved_database_url
        if _is_sqlite(url):
            upgrade_database(url)
        return cls(url)
