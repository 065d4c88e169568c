"""``fragjobs doctor``: one line per check of this setup, OK/WARN/FAIL and the fix."""

from __future__ import annotations

import sys

import click


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the checks.")
@click.option(
    "--farm",
    is_flag=True,
    help="Check the farm too (its settings, the broker); implied when FRAGJOBS_BROKER_URL is set.",
)
def doctor(as_json: bool, farm: bool) -> None:
    """Check versions, device and memory, catalog, store, broker, thresholds and built-in models.

    Exits 1 when something this setup needs is broken (the line says how to fix it), else 0.
    """
    from fragjobs.doctor import process

    argv = [*(["--json"] if as_json else []), *(["--farm"] if farm else [])]
    sys.exit(process.main(argv))


COMMANDS = [doctor]
