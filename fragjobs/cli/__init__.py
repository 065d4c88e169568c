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
* :mod:`~fragjobs.cli.models_commands` — ``models add|ls``: base models in the shared store;
* :mod:`~fragjobs.cli.report_commands` — ``report ls|show|html``, ``report --compare --gate``;
* :mod:`~fragjobs.cli.doctor_commands` — ``doctor``: is this setup able to run;
* :mod:`~fragjobs.cli.options` — one-line errors and the chain's knobs as options.
"""

from __future__ import annotations

import os
import warnings

import click

from fragjobs.cli import (
    catalog_commands,
    chain_commands,
    doctor_commands,
    farm_commands,
    models_commands,
    report_commands,
)
from fragjobs.logging_setup import configure_logging


@click.group()
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="-v: fragjobs' debug messages; -vv: every library's too. Credentials are masked.",
)
def main(verbose: int) -> None:
    """fragjobs: prompt-specialised fragments of diffusers models, and seed variants with them.

    Runs embedded by default (SQLite catalog and a local store under ~/.fragjobs, or
    FRAGJOBS_DATA_DIR); set FRAGJOBS_DATABASE_URL / FRAGJOBS_STORAGE_URL for shared ones.
    A .env file is read only from the path in FRAGJOBS_ENV_FILE.
    """
    configure_logging(verbose)
    if not verbose:  # library chatter: loading bars (base_models.load_base reads this too)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # and tokenizer warnings
        warnings.filterwarnings("ignore", module=r"(transformers|diffusers|huggingface_hub)\b")


for _module in (
    chain_commands,
    catalog_commands,
    farm_commands,
    models_commands,
    report_commands,
    doctor_commands,
):
    for _command in _module.COMMANDS:
        main.add_command(_command)


if __name__ == "__main__":
    main()
