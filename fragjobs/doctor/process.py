"""The doctor in a process of its own: ``python -m fragjobs.doctor``, and how a worker runs it.

A Celery worker's main process must not initialise CUDA (its pool processes are forked from
it), and the device check does; so a worker runs the doctor as a child process and reads its
``--json`` output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from fragjobs.doctor.checks import run_checks
from fragjobs.doctor.outcome import Check, exit_status, farm_configured

DOCTOR_MODULE = "fragjobs.doctor"
SUBPROCESS_TIMEOUT_S = 600.0
"""The longest a doctor run may take in a child process (every check has its own limit)."""


def run_in_subprocess(*, farm: bool, timeout_s: float = SUBPROCESS_TIMEOUT_S) -> list[Check]:
    """Run the doctor in a child process with this environment; return its checks.

    A child that cannot run, overruns or prints no JSON gives one failed, needed check
    named ``doctor`` saying so.
    """
    command = [sys.executable, "-m", DOCTOR_MODULE, "--json", *(["--farm"] if farm else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [_no_report(f"it did not finish within {timeout_s:.0f} s")]
    except OSError as exc:
        return [_no_report(f"it could not start: {exc}")]
    try:
        return [Check(**item) for item in json.loads(done.stdout)]
    except (ValueError, TypeError) as exc:
        return [_no_report(f"{exc}; {' '.join(done.stderr.split()[-40:])}")]


def _no_report(why: str) -> Check:
    return Check(
        "doctor", "FAIL", f"python -m {DOCTOR_MODULE} gave no report: {why}", "run it by hand"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m fragjobs.doctor [--json] [--farm]``: print the checks; 1 when a needed
    one failed."""
    from fragjobs.config import get_settings
    from fragjobs.errors import ConfigError

    parser = argparse.ArgumentParser(prog=f"python -m {DOCTOR_MODULE}", description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print a JSON list of the checks")
    parser.add_argument("--farm", action="store_true", help="include the farm's checks")
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except ConfigError as exc:
        checks = [Check("settings", "FAIL", str(exc), "correct that FRAGJOBS_* variable")]
    else:
        checks = run_checks(settings, farm=args.farm or farm_configured(settings))
    print(render(checks, as_json=args.json))
    return exit_status(checks)


def render(checks: list[Check], *, as_json: bool) -> str:
    """One line per check, or a JSON list of them."""
    if as_json:
        return json.dumps([check.as_dict() for check in checks], indent=1)
    return "\n".join(check.line() for check in checks)
