"""One exception hierarchy for fragjobs.

Every error a user can trigger is a subclass of :class:`FragjobsError` and carries a message
that says what was wrong and what to do instead. The CLI prints that message on one line and
exits non-zero.
"""

from __future__ import annotations


class FragjobsError(Exception):
    """Base class of every error fragjobs raises on purpose."""


class InvalidInputError(FragjobsError, ValueError):
    """A user-supplied value (prompt, seeds, variants, threshold, ...) is invalid."""


class InvalidKeyError(InvalidInputError):
    """A fragment key or object name is not of the allowed form ``[a-z0-9._-]``."""


class UnknownModelError(FragjobsError, LookupError):
    """A base model name, hub id or folder could not be resolved."""


class ConfigError(FragjobsError):
    """A configuration file or setting is invalid."""


class ObjectNotFoundError(FragjobsError, LookupError):
    """An object is missing from the object store."""


class StorageError(FragjobsError):
    """The object store failed (I/O error, permission, unreachable server)."""


class UnknownStorageSchemeError(StorageError):
    """A storage URL has a scheme no backend is registered for."""


class CatalogError(FragjobsError):
    """The catalog database failed or was used inconsistently."""


class SchemaOutOfDateError(CatalogError):
    """The catalog database schema is older (or newer) than this code expects."""


class NotFoundError(CatalogError, LookupError):
    """A catalog entity (fragment, profile, job, ...) does not exist."""


class IntegrityError(FragjobsError):
    """Stored bytes do not match the sha256 recorded for them."""


class FragmentError(FragjobsError):
    """A fragment cannot be used."""


class FragmentIntegrityError(FragmentError, IntegrityError):
    """A fragment's bytes or its base model do not match the hashes in its manifest."""


class ManifestError(FragmentError):
    """A manifest is unreadable or does not follow schema v1."""


class BaseModelMismatchError(FragmentIntegrityError):
    """A fragment was applied to a pipeline that is not its base model."""


class GateFailedError(FragmentError):
    """A fragment did not pass its quality gate."""


class PoisonTaskError(FragjobsError):
    """A farm task was delivered more often than ``FRAGJOBS_MAX_TASK_ATTEMPTS``."""


class IrreversibleChangeError(FragjobsError, RuntimeError):
    """An in-place edit (head pruning, factorisation) was asked to be undone."""


class StorageUnavailableError(StorageError):
    """The object store is unreachable or temporarily failing; retrying later may succeed.

    A Celery task retries on this class (``autoretry_for``); any other StorageError is
    permanent: retrying the same call would fail the same way.
    """
