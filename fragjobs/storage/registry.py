"""From a storage URL to an :class:`ObjectStore`: a registry keyed by URL scheme.

A backend is registered either as a callable or as the dotted import path of one
(``"fragjobs.storage.local.LocalStore"``); a dotted path is imported only when a URL with its
scheme is first opened, so a backend's heavy dependency (boto3 for ``s3``) costs nothing to
users who never open such a URL. Built-in backends are listed in ``_BUILTIN_BACKENDS``; the S3
backend joins them there as ``"s3": "fragjobs.storage.s3.S3Store"``.

Example::

    store = open_store("file:///srv/fragjobs")
    register_store("mem", "mypackage.stores.MemoryStore")
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from fragjobs.errors import InvalidInputError, StorageError, UnknownStorageSchemeError
from fragjobs.storage.base import ObjectStore

StoreFactory = Callable[..., ObjectStore]
"""Called as ``factory(url, **kwargs)``; returns the store for ``url``."""

_BUILTIN_BACKENDS: dict[str, str] = {
    "file": "fragjobs.storage.local.LocalStore",
    "s3": "fragjobs.storage.s3.S3Store",
}

_SCHEME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")
_registry: dict[str, StoreFactory | str] = dict(_BUILTIN_BACKENDS)
_lock = threading.Lock()


def register_store(scheme: str, factory: StoreFactory | str) -> None:
    """Make :func:`open_store` use ``factory`` for URLs with ``scheme`` (replacing any other).

    Args:
        scheme: the URL scheme, such as ``"s3"`` (case-insensitive).
        factory: a callable ``factory(url, **kwargs) -> ObjectStore``, or the dotted import
            path of one (``"package.module.Name"``), imported on first use.

    Raises:
        InvalidInputError: if ``scheme`` is empty or ``factory`` is neither of the above.
    """
    if not isinstance(scheme, str) or not _SCHEME_PATTERN.match(scheme):
        raise InvalidInputError(
            f"invalid storage URL scheme {scheme!r}: a letter, then letters, digits, '+-.'"
        )
    if isinstance(factory, str):
        if "." not in factory:
            raise InvalidInputError(
                f"store factory {factory!r} is not a dotted import path such as "
                "'package.module.StoreClass'"
            )
    elif not callable(factory):
        raise InvalidInputError(f"store factory for {scheme!r} must be callable or a dotted path")
    with _lock:
        _registry[scheme.lower()] = factory


def registered_schemes() -> list[str]:
    """The URL schemes :func:`open_store` understands, sorted."""
    with _lock:
        return sorted(_registry)


def open_store(url: str, **kwargs: Any) -> ObjectStore:
    """Open the object store at ``url``; a URL without a scheme is a local folder path.

    Args:
        url: ``file:///abs/path``, ``/abs/path``, or a URL of any registered scheme.
        **kwargs: passed to the backend's factory (for example S3 credentials).

    Raises:
        UnknownStorageSchemeError: no backend is registered for the URL's scheme.
        StorageError: the backend could not be imported or could not open ``url``.
    """
    scheme = urlsplit(url).scheme.lower() or "file"
    with _lock:
        factory = _registry.get(scheme)
        if isinstance(factory, str):
            factory = _registry[scheme] = _import_factory(scheme, factory)
    if factory is None:
        raise UnknownStorageSchemeError(
            f"no object store backend for scheme {scheme!r} in {url!r}; "
            f"registered schemes: {', '.join(registered_schemes())}"
        )
    return factory(url, **kwargs)


def _import_factory(scheme: str, dotted: str) -> StoreFactory:
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise StorageError(
            f"the {scheme!r} storage backend {dotted!r} cannot be loaded ({exc}); "
            "install its extra dependencies (pip install 'fragjobs[farm]')"
        ) from exc
