"""The catalog schema, driven by alembic from code: revisions, the check, the upgrade.

The tables are declared in :mod:`models` and created by the packaged ``migrations/``. A
database whose schema is missing or out of date is refused with the command that fixes it
(:data:`UPGRADE_COMMAND`). alembic is slow to import, so it is imported only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine

import migrations
from fragjobs.catalog.database import _catalog_errors, _create_engine, mask_url
from fragjobs.errors import CatalogError, SchemaOutOfDateError

if TYPE_CHECKING:
    from alembic.config import Config

UPGRADE_COMMAND = "fragjobs db upgrade"


def _alembic_config(url: str | None = None) -> Config:
    """An alembic Config built in code: the packaged migrations, and ``url`` if given."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if url is not None:
        # ConfigParser interpolation treats "%" as special (URL-encoded passwords have it).
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _revision_of(engine: Engine, url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with _catalog_errors(url), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    return {revision.revision for revision in script.walk_revisions()}


def _schema_error(url: str, current: str | None) -> SchemaOutOfDateError:
    masked, head = mask_url(url), head_revision()
    if current is not None and current not in _known_revisions():
        return SchemaOutOfDateError(
            f"catalog {masked} is at schema revision {current!r}, which this fragjobs does not "
            f"know (it expects {head!r}): the database was upgraded by a newer fragjobs; "
            "install that version"
        )
    state = "has no fragjobs schema" if current is None else f"is at schema revision {current!r}"
    return SchemaOutOfDateError(
        f"catalog {masked} {state}, this fragjobs needs revision {head!r}: "
        f"run `{UPGRADE_COMMAND}` (it migrates the database named by FRAGJOBS_DATABASE_URL)"
    )


def head_revision() -> str:
    """The schema revision this code expects (the alembic head of ``migrations/``)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise CatalogError("the packaged migrations have no revision: reinstall fragjobs")
    return head


def current_revision(url: str) -> str | None:
    """The schema revision of the database at ``url``; None when it has no schema yet.

    Raises:
        CatalogError: the database cannot be reached.
    """
    engine = _create_engine(url)
    try:
        return _revision_of(engine, url)
    finally:
        engine.dispose()


def upgrade_database(url: str) -> str:
    """Create or migrate the catalog schema at ``url`` to the head revision; return it.

    This is what ``fragjobs db upgrade`` runs. Running it on an up-to-date database does
    nothing.

    Raises:
        SchemaOutOfDateError: the database has a revision this code does not know.
        CatalogError: the database cannot be reached or the migration failed.
    """
    from alembic import command
    from alembic.util import CommandError

    config = _alembic_config(url)
    engine = _create_engine(url)
    try:
        with _catalog_errors(url), engine.begin() as connection:
            config.attributes["connection"] = connection
            try:
                command.upgrade(config, "head")
            except CommandError as exc:
                raise _schema_error(url, _revision_of(engine, url)) from exc
        revision = _revision_of(engine, url)
    finally:
        engine.dispose()
    if revision is None:
        raise CatalogError(f"upgrading catalog {mask_url(url)} left it without a revision")
    return revision
