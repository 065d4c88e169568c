"""``python -m fragjobs.bench_catalog``: see :mod:`fragjobs.bench.catalog_lookup`."""

import sys

from fragjobs.bench.catalog_lookup import main

if __name__ == "__main__":
    sys.exit(main())
