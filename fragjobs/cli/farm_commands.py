"""The farm's commands: ``farm start``, ``farm status``, ``farm run`` and ``flower``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from fragjobs.cli.options import (
    check_out_dir,
    fail_cleanly,
    knob_options,
    knobs_from_options,
)
from fragjobs.keys import normalise_prompt

POLL_S = 0.5


@click.group("farm")
def farm() -> None:
    """Celery workers of the farm (broker, catalog and store from FRAGJOBS_* variables)."""


@farm.command("start")
@click.option("--gpus", default=None, help="Comma-separated GPU indices: one worker per GPU.")
@click.option("--cpu-workers", type=int, default=None, help="Number of workers without a GPU.")
@click.option("--node", default=None, help="Node name in queue and worker names [host name].")
@click.option("--loglevel", default="info", show_default=True)
def start(gpus: str | None, cpu_workers: int | None, node: str | None, loglevel: str) -> None:
    """Run this node's workers in the foreground until SIGTERM/Ctrl-C."""
    from fragjobs.config import load_settings
    from fragjobs.errors import ConfigError
    from fragjobs.farm import launcher
    from fragjobs.farm.settings import FarmSettings

    try:
        load_settings(FarmSettings)  # a bad or placeholder setting stops the node here
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)

    try:
        specs = launcher.worker_specs(
            node=node or launcher.default_node(),
            gpus=launcher.parse_gpus(gpus) if gpus is not None else None,
            cpu_workers=cpu_workers,
        )
    except ValueError as exc:
        raise click.UsageError(f"{exc} (use --gpus 0,1 or --cpu-workers N)") from exc
    for spec in specs:
        click.echo(f"starting {spec.hostname} on queues {','.join(spec.queues)}", err=True)
    sys.exit(launcher.run_workers(specs, loglevel))


@farm.command("status")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for replies.")
@fail_cleanly
def status(timeout: float) -> None:
    """List the workers that reply: queues, running tasks and warm fragments; queue lengths."""
    from fragjobs.config import load_settings
    from fragjobs.farm.client import Farm
    from fragjobs.farm.registry import WarmRegistry
    from fragjobs.farm.settings import FarmSettings

    settings = load_settings(FarmSettings)
    with Farm(settings) as client:
        inspect = client.app.control.inspect(timeout=timeout)
        queues = inspect.active_queues() or {}
        active = inspect.active() or {}
    if not queues:
        click.echo("no worker replied (is `fragjobs farm start` running?)", err=True)
        sys.exit(1)
    registry = WarmRegistry.for_broker(settings.broker_url, settings.affinity_ttl_s)
    warm = registry.workers() if registry is not None else {}
    for hostname in sorted(queues):
        names = ",".join(sorted(q["name"] for q in queues[hostname]))
        fragments = ",".join(warm[hostname].fragments) if hostname in warm else "-"
        click.echo(
            f"{hostname}  queues={names}  active={len(active.get(hostname) or [])}  "
            f"warm={fragments or '-'}"
        )
    all_queues = sorted({q["name"] for qs in queues.values() for q in qs})
    if registry is not None:
        for name in all_queues:
            click.echo(f"queue {name}  waiting={registry.waiting(name)}")
        registry.close()


@farm.command("run")
@click.argument("prompt")
@knob_options
@click.option("--batch-size", default=4, show_default=True, type=int, help="Seeds per task.")
@click.option("--out", "out_dir", default=None, type=click.Path(), help="Copy images here.")
@click.option("--queue", default=None, help="Send every task to this queue (e.g. gpu.n1.0).")
@click.option("--no-affinity", is_flag=True, help="Never route to a worker's own queue.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait.")
@fail_cleanly
def run(
    prompt: str,
    batch_size: int,
    out_dir: str | None,
    queue: str | None,
    no_affinity: bool,
    timeout: float,
    **options: Any,
) -> None:
    """Run the chain for PROMPT on the farm with a progress bar; print the images as JSON."""
    normalise_prompt(prompt)
    knobs = knobs_from_options(options, batch_size=batch_size)
    out = check_out_dir(Path(out_dir)) if out_dir else None
    run_on_farm(
        prompt,
        knobs,
        out=out,
        batch_size=batch_size,
        queue=queue,
        affinity=not no_affinity,
        timeout=timeout,
    )


def run_on_farm(
    prompt: str,
    knobs: Any,
    *,
    out: Path | None = None,
    batch_size: int | None = None,
    queue: str | None = None,
    affinity: bool = True,
    timeout: float = 3600.0,
    report: bool = False,
) -> None:
    """Submit ``knobs``' chain, show its progress, print the result; exit 1 on errors.

    ``out``: the images (``images/<seed>.png``), the fragment's manifest and the result
    (``farm_result.json``) are written there. ``report`` (``fragjobs run --farm``): a report
    folder is written instead, under ``out`` as reports root (default: the data dir's).
    """
    from tqdm.auto import tqdm

    from fragjobs.farm.client import Farm

    with Farm() as client:
        job = client.submit(
            prompt,
            knobs,
            batch_size=batch_size or knobs.batch_size,
            queue=queue,
            affinity=affinity,
        )
        deadline = time.monotonic() + timeout
        with tqdm(total=knobs.variants, unit="img", desc="farm", file=sys.stderr) as bar:
            while True:
                progress = job.progress()
                bar.update(max(0, progress["images_done"] - bar.n))
                stage = next(
                    (n for n, s in progress["stages"].items() if s not in ("SUCCESS",)), None
                )
                bar.set_postfix_str(stage or progress["state"].lower())
                if progress["state"] in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
        result = job.wait(timeout=max(1.0, deadline - time.monotonic()))
        document = {
            "fragment_key": result.fragment_key,
            "job_ids": result.job_ids,
            "images": result.image_uris,
            "workers": result.workers,
            "errors": result.errors,
            "knobs": knobs.to_json(),
        }
        if report:
            from fragjobs.cli.report_commands import write_farm_report

            folder = write_farm_report(client, prompt, knobs, result, out)
        elif out is not None:
            _write_out(client, result, out, document)
    if result.used_fallback:
        click.echo(f"full model used: {'; '.join(result.fallback_reasons)}", err=True)
    click.echo(json.dumps(document, indent=2))
    if report:
        from fragjobs.cli.report_commands import echo_run_summary
        from fragjobs.reports.folders import read_report

        echo_run_summary(read_report(folder).summary, folder)
    sys.exit(1 if result.errors else 0)


def _write_out(client: Any, result: Any, out: Path, document: dict[str, Any]) -> None:
    """Copy a farm job's images and its fragment's manifest into ``out``."""
    from fragjobs.keys import MANIFEST_FILE, fragment_object, generation_object
    from fragjobs.storage import open_store

    store = open_store(client.settings.resolved_storage_url)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for job_id in result.job_ids:
        for image in client.catalog.list_images(job_id):
            data = store.get_bytes(
                generation_object(job_id, f"{image.seed}.png"), expected_sha256=image.sha256
            )
            (out / "images" / f"{image.seed}.png").write_bytes(data)
    if result.fragment_key is not None:
        row = client.catalog.get_fragment(result.fragment_key)
        name = fragment_object(row.key.split("_", 1)[0], row.key, MANIFEST_FILE)
        manifest = store.get_bytes(name, expected_sha256=row.manifest_sha256)
        (out / "fragment_manifest.json").write_bytes(manifest)
    (out / "farm_result.json").write_text(json.dumps(document, indent=2, sort_keys=True))


@click.command("flower")
@click.option("--port", default=5555, show_default=True, type=int)
@click.option("--address", default="127.0.0.1", show_default=True, help="0.0.0.0: every interface.")
def flower(port: int, address: str) -> None:
    """Start Flower on the farm's broker, with basic auth from FRAGJOBS_FLOWER_USER/PASSWORD.

    Tasks are listed with their names, readable arguments and PROGRESS (step/total); the
    same as ``FLOWER_BASIC_AUTH=user:pw celery -A tasks.app flower``.
    """
    from fragjobs.config import load_settings
    from fragjobs.errors import ConfigError
    from fragjobs.farm.flower import flower_command, flower_env
    from fragjobs.farm.settings import FarmSettings

    try:
        env = flower_env(load_settings(FarmSettings))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    command = flower_command(port, address)
    os.execve(command[0], command, env)


COMMANDS = [farm, flower]
