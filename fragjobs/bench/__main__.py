"""``python -m fragjobs.bench``: the speed benchmark (:mod:`fragjobs.bench.speed`)."""

from fragjobs.bench.speed import main

raise SystemExit(main())
