"""``python -m fragjobs.doctor [--json] [--farm]``: the doctor without the command line."""

import sys

from fragjobs.doctor.process import main

sys.exit(main())
