"""Object stores: one interface (:class:`ObjectStore`), one backend per URL scheme.

Open a store by URL with :func:`open_store` (``file:///abs/path`` or a plain path → a local
folder, ``s3://bucket/prefix`` → an S3 bucket); add a backend with :func:`register_store`.
:class:`WarmCache` keeps a node-local copy of the objects a worker reads.
"""

from fragjobs.storage.base import ObjectStore, StoredObject
from fragjobs.storage.local import LocalStore
from fragjobs.storage.registry import open_store, register_store, registered_schemes
from fragjobs.storage.s3 import S3Store
from fragjobs.storage.warm_cache import WarmCache

__all__ = [
    "LocalStore",
    "ObjectStore",
    "S3Store",
    "StoredObject",
    "WarmCache",
    "open_store",
    "register_store",
    "registered_schemes",
]
