"""``python -m fragjobs.cli``: the ``fragjobs`` command."""

from fragjobs.cli import main

main()
