"""``fragjobs doctor``: is this setup able to run the chain (and the farm)?

One function per check in :mod:`~fragjobs.doctor.checks` (this machine) and
:mod:`~fragjobs.doctor.services` (database, store, broker), each giving a :class:`Check`
(``OK``/``WARN``/``FAIL``, what was found, the fix, whether the configured mode needs it);
:func:`run_checks` runs them all, each under a time limit. Memory estimates of the built-in
models are in :mod:`~fragjobs.doctor.estimates`. ``python -m fragjobs.doctor`` runs it
without the command line's dependencies; the farm's workers run that at start
(:func:`run_in_subprocess`) and refuse to take tasks when a needed check fails.

Example::

    checks = run_checks(get_settings(), farm=False)
    print("\\n".join(check.line() for check in checks))
    sys.exit(exit_status(checks))
"""

from __future__ import annotations

from fragjobs.doctor.checks import run_checks
from fragjobs.doctor.outcome import FAIL, OK, WARN, Check, exit_status, farm_configured
from fragjobs.doctor.process import run_in_subprocess

__all__ = [
    "FAIL",
    "OK",
    "WARN",
    "Check",
    "exit_status",
    "farm_configured",
    "run_checks",
    "run_in_subprocess",
]
