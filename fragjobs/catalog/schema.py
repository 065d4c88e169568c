"""The catalog schema, driven by alembic from code: revisions, the check, the upgrade.

The tables are declared in :mod:`models` and created by the packaged ``migrations/``. A
database whose schema is missing or out of date is refused with the command that fixes it
(:data:`UPGRADE_COMMAND`). alembic is slow to import, so it is imported only when used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

import migrations
from fragjobs.catalog.database import _catalog_errors, _create_engine, mask_url
from fragjobs.errors import CatalogError, SchemaOutOfDateError

if TYPE_CHECKING:
    from alembic.config import Config

UPGRADE_COMMAND = "fragjobs db upgrade"
VERSION_TABLE = "alembic_version"
_REVISION = re.compile(r"^revision(?:: str)? = [\"']([^\"']+)[\"']", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision(?:: [^=]+)? = [\"']([^\"']+)[\"']", re.MULTILINE)


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
    """The revision stamped in ``alembic_version`` (alembic's own table); None without one."""
    with _catalog_errors(url), engine.connect() as connection:
        if not inspect(connection).has_table(VERSION_TABLE):
            return None
        versions = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    if len(versions) > 1:
        raise CatalogError(f"catalog {mask_url(url)} has {len(versions)} schema heads")
    return versions[0][0] if versions else None


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
    """The schema revision this code expects (the head of the packaged ``migrations/``).

    Read from the revision files' ``revision`` / ``down_revision`` lines rather than through
    alembic, which takes a fifth of a second to import: a command that only reads an
    up-to-date catalog never imports it (a test checks this agrees with alembic's head).
    """
    revisions, parents = set(), set()
    for path in (Path(migrations.__file__).parent / "versions").glob("*.py"):
        source = path.read_text()
        found = _REVISION.search(source)
        if found is None:
            continue
        revisions.add(found.group(1))
        parent = _DOWN_REVISION.search(source)
        if parent is not None:
            parents.add(parent.group(1))
    heads = revisions - parents
    if len(heads) != 1:
        raise CatalogError(
            f"the packaged migrations have {len(heads)} heads ({sorted(heads)}): reinstall fragjobs"
        )
    return heads.pop()


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
    engine = _create_engine(url)
    try:
        current = _revision_of(engine, url)
        if current is not None and current == head_revision():
            return current  # nothing to do: alembic is not even imported
    finally:
        engine.dispose()
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
