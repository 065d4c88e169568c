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
            f"{row.placement:<6} {'pinned' if row.pinned else '':<6} "
            f"hits={row.hit_count}  {row.prompt!r}"
        )
    if not rows:
        click.echo("no fragments", err=True)


@fragments.command("show")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Everything as one JSON object.")
@fail_cleanly
def fragments_show(key, as_json):
    """Print a fragment's summary, catalog row, lineage and manifest (stored hashes checked).

    --json prints catalog row, lineage and manifest as one JSON object.
    """
    from dataclasses import asdict

    from fragjobs.chain.stored import verified_objects
    from fragjobs.keys import validate_key

    ws = _workspace()
    row = ws.catalog.get_fragment(validate_key(key))
    # An evicted fragment has no stored objects: its row and lineage are all there is.
    manifest = verified_objects(ws, row)[0] if row.status != "evicted" else None
    lineage = ws.catalog.lineage(key)
    document = {
        "catalog": asdict(row),
        "lineage": lineage,
        "manifest": manifest.model_dump(mode="json") if manifest is not None else None,
    }
    if as_json:
        click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))
        return
    if manifest is None:
        click.echo(f"{row.key}  evicted ({row.status_reason}); no stored objects")
    else:
        for line in _fragment_summary(row, manifest):
            click.echo(line)
    click.echo("\ncatalog row:")
    for name, value in asdict(row).items():
        if name != "params":
            click.echo(f"  {name:<15} {value}")
    click.echo(f"  {'params':<15} {json.dumps(row.params, sort_keys=True)}")
    click.echo("lineage:")
    for name, value in lineage.items():
        click.echo(f"  {name:<15} {value}")
    if manifest is not None:
        click.echo("manifest:")
        click.echo(json.dumps(document["manifest"], indent=2, sort_keys=True))


def _fragment_summary(row, manifest) -> list[str]:
    """A few lines a person reads first: what the fragment is and how well it did."""
    pruning, perf, quality = manifest.pruning, manifest.performance, manifest.quality
    routing, compression = manifest.dynamic_routing, manifest.compression
    techniques = [f"{pruning.heads_kept}/{pruning.heads_total} heads kept"]
    if compression.low_rank is not None and compression.low_rank.layers:
        techniques.append(f"{len(compression.low_rank.layers)} layers low-rank")
    if compression.int8 is not None:
        techniques.append("int8 weights")
    techniques.append("block caching" if routing.enabled else "no block caching")
    lines = [
        f"{row.key}  {row.status}" + (f" ({row.status_reason})" if row.status_reason else ""),
        f"  prompt     {row.prompt!r}",
        f"  base model {manifest.base_model.name} ({manifest.base_model.sha256[:12]}…)",
        f"  fragment   {', '.join(techniques)}; "
        f"{compression.weight_bytes_fragment / 2**20:.1f} of "
        f"{compression.weight_bytes_base / 2**20:.1f} MiB UNet weights",
    ]
    if quality is not None:
        metrics, gate = quality.metrics, quality.gate
        not_run = gate.get("not_run") or []
        lines.append(
            f"  gate       {'passed' if gate.get('passed') else 'FAILED'} on seeds "
            f"{quality.seeds}: SSIM {metrics.get('ssim'):.4f}, CLIP delta "
            f"{metrics.get('clip_delta')}, LPIPS {metrics.get('lpips')}"
            + (f" (not run: {'; '.join(n.split(':')[0] for n in not_run)})" if not_run else "")
        )
    else:
        lines.append("  gate       not validated yet")
    if perf is not None and perf.measured_speedup is not None:
        lines.append(
            f"  speed      {perf.measured_speedup:.2f}x per image ({perf.device}, "
            f"{perf.steps} steps, batch {perf.batch_size})"
        )
    lines.append(f"  verified   {manifest.verified};  used {row.hit_count} time(s)")
    lines.append(f"  stored at  {row.storage_uri}")
    lines.append(f"  placement  {row.placement}" + (", pinned" if row.pinned else ""))
    return lines


@fragments.command("rm")
@click.argument("key")
@fail_cleanly
def fragments_rm(key):
    """Remove fragment KEY's objects and warm copies; its catalog row stays as a tombstone."""
    from fragjobs.chain.maintenance import remove_fragment

    remove_fragment(_workspace(), key)
    click.echo(f"{key}: removed (status evicted; rebuilt from its profile when asked for)")


@fragments.command("pin")
@click.argument("key")
@fail_cleanly
def fragments_pin(key):
    """Pin fragment KEY: the library's size cap never evicts it."""
    from fragjobs.keys import validate_key

    _workspace().catalog.set_pinned(validate_key(key), True)
    click.echo(f"{key}: pinned (never evicted by the library cap)")


@fragments.command("unpin")
@click.argument("key")
@fail_cleanly
def fragments_unpin(key):
    """Unpin fragment KEY: the library's size cap may evict it again."""
    from fragjobs.keys import validate_key

    _workspace().catalog.set_pinned(validate_key(key), False)
    click.echo(f"{key}: unpinned")


@fragments.command("gc")
@click.option("--stale-after", default=3600.0, show_default=True, help="Seconds.")
@click.option(
    "--max-bytes",
    type=int,
    default=None,
    help="Library size cap for this run [FRAGJOBS_LIBRARY_MAX_BYTES].",
)
@fail_cleanly
def fragments_gc(stale_after, max_bytes):
    """Evict least recently used fragments past the library's size cap (pinned ones stay),
    then remove fragments left building by a dead run and store folders no row names."""
    from fragjobs.chain.library_cap import enforce_library_cap
    from fragjobs.chain.maintenance import collect_garbage

    ws = _workspace()
    cap = enforce_library_cap(ws, max_bytes)
    for key, size in cap.evicted.items():
        click.echo(f"evicted {key} ({size} B, least recently used)")
    limit = "no cap" if cap.max_bytes is None else f"cap {cap.max_bytes} B"
    click.echo(f"library: {cap.before_bytes} B before, {cap.after_bytes} B after ({limit})")
    if cap.over_cap:
        click.echo("the library is still over its cap: what is left is pinned", err=True)
    report = collect_garbage(ws, stale_s=stale_after)
    for key in report.stale_fragments:
        click.echo(f"removed abandoned fragment {key}")
    for folder in report.orphan_folders:
        click.echo(f"removed orphan objects {folder}/")
    total = len(cap.evicted) + len(report.stale_fragments) + len(report.orphan_folders)
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
