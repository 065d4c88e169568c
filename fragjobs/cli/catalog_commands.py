"""Commands that read or maintain the catalog: ``fragments``, ``db``, ``revalidate``.

``fragments ls``, ``fragments show`` and ``db upgrade`` only talk to the catalog and the
store: they never import torch or diffusers, so they answer at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from fragjobs.cli.options import fail_cleanly


def _workspace():
    from fragjobs.chain.workspaces import workspace

    return workspace()


@click.group()
def fragments() -> None:
    """List and inspect stored fragments."""


@fragments.command("ls")
@click.option("--status", default=None, help="building, ready, failed_gate, corrupt, evicted")
@fail_cleanly
def fragments_ls(status):
    """List fragments in the catalog."""
    rows = _workspace().catalog.list_fragments(status=status)
    for row in rows:
        click.echo(
            f"{row.key}  {row.status:<11} {row.size_bytes or 0:>10} B  "
            f"hits={row.hit_count}  {row.prompt!r}"
        )
    if not rows:
        click.echo("no fragments", err=True)


@fragments.command("show")
@click.argument("key")
@fail_cleanly
def fragments_show(key):
    """Print a fragment's catalog row, lineage and manifest (stored hashes checked)."""
    from dataclasses import asdict

    from fragjobs.chain.stored import verified_objects
    from fragjobs.keys import validate_key

    ws = _workspace()
    row = ws.catalog.get_fragment(validate_key(key))
    manifest, _ = verified_objects(ws, row)
    click.echo(
        json.dumps(
            {
                "catalog": asdict(row),
                "lineage": ws.catalog.lineage(key),
                "manifest": manifest.model_dump(mode="json"),
            },
            indent=2,
            sort_keys=True,
            default=str,
        )
    )


@fragments.command("rm")
@click.argument("key")
@fail_cleanly
def fragments_rm(key):
    """Remove fragment KEY's objects and warm copies; its catalog row stays as a tombstone."""
    from fragjobs.chain.maintenance import remove_fragment

    remove_fragment(_workspace(), key)
    click.echo(f"{key}: removed (status evicted; extract builds it again on demand)")


@fragments.command("gc")
@click.option("--stale-after", default=3600.0, show_default=True, help="Seconds.")
@fail_cleanly
def fragments_gc(stale_after):
    """Remove fragments left building by a dead run, and store folders no row names."""
    from fragjobs.chain.maintenance import collect_garbage

    report = collect_garbage(_workspace(), stale_s=stale_after)
    for key in report.stale_fragments:
        click.echo(f"removed abandoned fragment {key}")
    for folder in report.orphan_folders:
        click.echo(f"removed orphan objects {folder}/")
    total = len(report.stale_fragments) + len(report.orphan_folders)
    click.echo(f"{total} item(s) removed", err=True)


@click.group()
def db() -> None:
    """Catalog database schema."""


@db.command("upgrade")
@fail_cleanly
def db_upgrade():
    """Create or upgrade the catalog schema (alembic) at FRAGJOBS_DATABASE_URL."""
    from fragjobs.catalog import mask_url, upgrade_database
    from fragjobs.config import get_settings

    url = get_settings().resolved_database_url
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    revision = upgrade_database(url)
    click.echo(f"{mask_url(url)} at revision {revision}")


@db.command("rebuild")
@fail_cleanly
def db_rebuild():
    """Rebuild a lost catalog from the fragments' manifests in the store."""
    from fragjobs.chain.maintenance import rebuild_catalog
    from fragjobs.chain.workspaces import Workspace

    ws = Workspace.open(allow_missing_catalog=True)
    try:
        report = rebuild_catalog(ws)
    finally:
        ws.close()
    for name, reason in report.skipped.items():
        click.echo(f"skipped {name}: {reason}", err=True)
    click.echo(f"{len(report.fragments)} fragment(s), {len(report.profiles)} profile(s) recorded")


@click.command("revalidate")
@click.option("--key", "keys", multiple=True, help="Only this fragment (repeatable).")
@click.option("--no-gate", is_flag=True, help="Only re-hash the stored objects.")
def revalidate_command(keys: tuple[str, ...], no_gate: bool) -> None:
    """Re-hash stored objects and re-run the quality gate (ready, corrupt, stuck fragments).

    Fragments whose objects do not match the catalog are marked corrupt, those that fail the
    gate failed_gate; a corrupt one whose objects are whole again becomes ready if it passes.
    Exit status: 0 every checked fragment is ready, 1 some were marked, 3 another
    re-validation of this catalog is running (nothing was done).
    """
    from fragjobs.chain.revalidation import revalidate

    report = fail_cleanly(revalidate)(keys=list(keys) or None, gate=not no_gate)
    if report.skipped:
        click.echo(f"skipped: {report.skipped}", err=True)
        raise SystemExit(3)
    for check in report.checks:
        gate = {True: "gate passed", False: "gate FAILED", None: "gate not run"}[check.gate_passed]
        objects = "objects ok" if check.objects_ok else "objects BAD"
        line = f"{check.key}  {check.status:<11} {objects}  {gate}"
        click.echo(line + (f"  ({check.reason})" if check.reason else ""))
    click.echo(
        f"{len(report.checks)} fragment(s) checked in {report.elapsed_s:.1f} s, "
        f"{len(report.marked)} not ready",
        err=True,
    )
    raise SystemExit(1 if report.marked else 0)


COMMANDS = [fragments, db, revalidate_command]
