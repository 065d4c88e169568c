"""``python -m fragjobs.drills``: see :mod:`fragjobs.drills.command`."""

import sys

from fragjobs.drills.command import main

sys.exit(main())
