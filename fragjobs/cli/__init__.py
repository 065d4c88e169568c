"""The ``fragjobs`` command.

Every command runs the same functions as the Python API on the workspace given by the
environment (embedded default: SQLite + a local folder under ``~/.fragjobs``). Errors print
one line, ``error: <reason>``, and exit with status 2. Input is checked before anything heavy
is imported: commands that only read the catalog, and every bad-input error, never load
torch or diffusers.

* :mod:`~fragjobs.cli.chain_commands` — ``run``, ``profile``, ``extract``, ``validate``,
  ``generate``, ``eval-model``, ``results``;
* :mod:`~fragjobs.cli.catalog_commands` — ``fragments``, ``db``, ``revalidate``;
* :mod:`~fragjobs.cli.farm_commands` — ``farm start|status|run``, ``flower``;
* :mod:`~fragjobs.cli.options` — one-line errors and the chain's knobs as options.
"""

from __future__ import annotations

import logging
import os

import click

from fragjobs.cli import catalog_commands, chain_commands, farm_commands


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """fragjobs: prompt-specialised fragments of diffusers models, and seed variants with them.

    Runs embedded by default (SQLite catalog and a local store under ~/.fragjobs, or
    FRAGJOBS_DATA_DIR); set FRAGJOBS_DATABASE_URL / FRAGJOBS_STORAGE_URL for shared ones.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if not verbose:  # both libraries read these when first imported (below, lazily)
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


for _module in (chain_commands, catalog_commands, farm_commands):
    for _command in _module.COMMANDS:
        main.add_command(_command)


if __name__ == "__main__":
    main()
