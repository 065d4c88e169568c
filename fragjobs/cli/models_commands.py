"""Base models: ``models add PATH`` (upload a diffusers folder to the shared store once) and
``models ls`` (the bases in the catalog, their sizes and the worker nodes holding them).

``models ls`` reads the catalog, the store's small index files and the farm's registry: it
never imports torch. ``models add`` checks the folder before it imports anything heavy.
"""

from __future__ import annotations

import json

import click

from fragjobs.cli.options import fail_cleanly


@click.group()
def models() -> None:
    """Base models shared by the farm's nodes through the store."""


@models.command("add")
@click.argument("path")
@click.option("--name", default=None, help="The base's name [the folder's name].")
@fail_cleanly
def models_add(path, name):
    """Upload the diffusers folder PATH to the shared store once and register it.

    Workers then fetch it by its sha256 into their node cache; submit jobs with the folder,
    the name or store:<sha256> as the model.
    """
    from fragjobs.base_store import add_base, check_pipeline_folder
    from fragjobs.chain.workspaces import workspace

    check_pipeline_folder(path, name)  # before the catalog, the store or torch
    ws = workspace()
    added = add_base(path, store=ws.store, catalog=ws.catalog, settings=ws.settings, name=name)
    index = added.index
    what = (
        f"uploaded {added.uploaded_files} files, {added.uploaded_bytes} B"
        if added.uploaded_files
        else "already in the store, nothing uploaded"
    )
    click.echo(f"{index.name}  {index.sha256}  {index.size} B  ({what})")


@models.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON list.")
@fail_cleanly
def models_ls(as_json):
    """List the base models: name, sha256, source, stored size and the nodes holding them.

    The nodes come from the farm's registry (FRAGJOBS_BROKER_URL); "?" when it cannot be
    reached.
    """
    from fragjobs.base_store import describe_bases
    from fragjobs.chain.workspaces import workspace
    from fragjobs.farm.registry import base_hostnames

    ws = workspace()
    bases = describe_bases(ws.catalog, ws.store, base_hostnames(ws.settings.broker_url))
    if as_json:
        click.echo(json.dumps(bases, indent=2, sort_keys=True))
        return
    for row in bases:
        size = "-" if row["size"] is None else f"{row['size']} B"
        nodes = "?" if row["nodes"] is None else ",".join(row["nodes"]) or "-"
        click.echo(
            f"{row['name']:<20} {row['sha256'][:12]}  {size:>14}  {row['source'][:40]:<40}  "
            f"nodes={nodes}"
        )
    if not bases:
        click.echo("no base models", err=True)


COMMANDS = [models]
