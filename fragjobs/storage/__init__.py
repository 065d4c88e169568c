"""Object stores: one interface (:class:`ObjectStore`), one backend per URL scheme.

Open a store by URL with :func:`open_store` (``file:///abs/path`` or a plain path → a local
folder); add a backend with :func:`register_store`.
"""

from fragjobs.storage.base import ObjectStore, StoredObject
from fragjobs.storage.local import LocalStore
from fragjobs.storage.registry import open_store, register_store, registered_schemes

__all__ = [
    "LocalStore",
    "ObjectStore",
    "StoredObject",
    "open_store",
    "register_store",
    "registered_schemes",
]
