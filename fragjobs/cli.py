"""The ``fragjobs`` command.

Every command runs the same functions as the Python API (``fragjobs.chain``) on the workspace
given by the environment (embedded default: SQLite + a local folder under ``~/.fragjobs``).
Errors print one line, ``error: <reason>``, and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from functools import wraps
from pathlib import Path

import click

from fragjobs.errors import FragjobsError


def _fail_cleanly(func):
    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FragjobsError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        from fragjobs.errors import InvalidInputError

        raise InvalidInputError(f"seeds must be comma-separated integers, got {text!r}") from exc


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


@main.command()
@click.argument("prompt")
@click.option("--model", default=None, help="Built-in name, diffusers folder or hub id.")
@click.option("--variants", default=8, show_default=True, type=int, help="Seed variants.")
@click.option("--out", "out_dir", default="fragjobs-out", show_default=True, type=click.Path())
@click.option(
    "--threshold",
    default=0.75,
    show_default=True,
    type=float,
    help="Fraction of attention heads kept, in (0, 1].",
)
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--no-low-rank", is_flag=True, help="Do not factorise linear layers.")
@click.option("--no-int8", is_flag=True, help="Keep weights in float.")
@click.option("--no-caching", is_flag=True, help="No block-caching schedule.")
@click.option(
    "--fidelity",
    default=0.9,
    show_default=True,
    type=float,
    help="SSIM vs the full model the fragment must keep on the profiling seeds, in (0, 1] "
    "(head pruning may spend half of the loss, block caching the rest).",
)
@click.option(
    "--paraphrase",
    "paraphrases",
    multiple=True,
    help="A paraphrase of PROMPT on which reuse is measured (H3); repeatable.",
)
@click.option(
    "--farm",
    "use_farm",
    is_flag=True,
    help="Submit the chain to the Celery farm (FRAGJOBS_BROKER_URL); see `fragjobs farm run`.",
)
@_fail_cleanly
def run(
    prompt,
    model,
    variants,
    out_dir,
    threshold,
    batch_size,
    no_low_rank,
    no_int8,
    no_caching,
    fidelity,
    paraphrases,
    use_farm,
):
    """Profile, extract, validate and generate PROMPT; write a report to --out."""
    from fragjobs import chain

    if use_farm:
        from fragjobs.config import get_settings
        from fragjobs.farm import run as farm_run

        click.get_current_context().invoke(
            farm_run,
            prompt=prompt,
            variants=variants,
            model=model or get_settings().default_model,
            batch_size=batch_size,
            threshold=threshold,
            fidelity=fidelity,
        )
        return

    report = chain.run(
        prompt,
        model=model,
        variants=variants,
        out_dir=Path(out_dir),
        threshold=threshold,
        batch_size=batch_size,
        low_rank=not no_low_rank,
        int8=not no_int8,
        caching=not no_caching,
        fidelity=fidelity,
        paraphrases=list(paraphrases) or None,
    )
    hyp = report.summary["hypotheses"]
    for attempt in report.summary["fragment"]["attempts"][:-1]:
        caching = attempt["caching_min_ssim"]
        click.echo(
            f"fragment {attempt['key']}: gate FAILED (ssim {attempt['ssim']:.3f}) with "
            f"{attempt['heads_kept']}/{attempt['heads_total']} heads"
            + (f", caching kept ssim {caching}" if caching is not None else "")
            + "; extracting a more conservative one"
        )
    click.echo(f"fragment {report.key}: gate {'passed' if report.passed else 'FAILED'}")
    for name in sorted(hyp):
        click.echo(f"  {name} {hyp[name]['status']:<11} {hyp[name]['name']}")
    if report.generation.used_fallback:
        click.echo(f"  generated with the full model: {report.generation.fallback_reason}")
    click.echo(f"report written to {report.out_dir}")


@main.command()
@click.argument("prompt")
@click.option("--model", default=None)
@click.option("--seeds", default="0,1,2,3", show_default=True, help="Comma-separated seeds.")
@click.option("--steps", default=None, type=int, help="Inference steps (model default).")
@click.option(
    "--step-stride",
    default=2,
    show_default=True,
    type=int,
    help="Record head statistics every N-th step.",
)
@_fail_cleanly
def profile(prompt, model, seeds, steps, step_stride):
    """Profile PROMPT; print the profile id."""
    from fragjobs import chain

    result = chain.profile(
        prompt, model=model, seeds=_seeds(seeds), steps=steps, step_stride=step_stride
    )
    click.echo(result.profile_id)


@main.command()
@click.argument("profile_id")
@click.option(
    "--threshold",
    default=0.75,
    show_default=True,
    type=float,
    help="Fraction of attention heads kept, in (0, 1].",
)
@click.option("--min-heads", default=1, show_default=True, type=int)
@click.option("--no-low-rank", is_flag=True)
@click.option("--no-int8", is_flag=True)
@click.option("--no-caching", is_flag=True)
@click.option("--fidelity", default=0.9, show_default=True, type=float)
@_fail_cleanly
def extract(profile_id, threshold, min_heads, no_low_rank, no_int8, no_caching, fidelity):
    """Extract the fragment of PROFILE_ID; print its key."""
    from fragjobs import chain

    config = chain.extraction_config(
        threshold,
        min_heads_per_layer=min_heads,
        low_rank=not no_low_rank,
        int8=not no_int8,
        caching=not no_caching,
        fidelity=fidelity,
    )
    click.echo(chain.extract(profile_id, config).key)


@main.command()
@click.argument("key")
@click.option("--seeds", default="1000,1001,1002,1003", show_default=True)
@_fail_cleanly
def validate(key, seeds):
    """Validate fragment KEY against its full model; exit 1 if the gate fails."""
    from fragjobs import chain

    result = chain.validate(key, seeds=_seeds(seeds))
    for check in result.gate.checks:
        click.echo(
            f"  {check.name:<12} {check.status:<11} value={check.value} "
            f"limit {check.op} {check.limit}" + (f" ({check.reason})" if check.reason else "")
        )
    click.echo(f"{key}: {'passed' if result.passed else 'FAILED'}")
    sys.exit(0 if result.passed else 1)


@main.command()
@click.argument("prompt")
@click.option("--variants", default=4, show_default=True, type=int)
@click.option("--seeds", default=None, help="Comma-separated seeds (instead of --variants).")
@click.option("--model", default=None)
@click.option("--key", default=None, help="Fragment key (default: the prompt's ready fragment).")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--out", "out_dir", default=None, type=click.Path(), help="Also copy PNGs here.")
@_fail_cleanly
def generate(prompt, variants, seeds, model, key, batch_size, out_dir):
    """Generate seed variants of PROMPT (fragment if ready, else the full model)."""
    from fragjobs import chain

    ws = chain.workspace()
    result = chain.generate(
        prompt,
        variants=variants,
        seeds=_seeds(seeds),
        model=model,
        key=key,
        batch_size=batch_size,
        ws=ws,
    )
    if result.used_fallback:
        click.echo(f"full model used: {result.fallback_reason}", err=True)
    if out_dir:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for seed, image in zip(result.seeds, result.images, strict=True):
            from fragjobs.reports import tensor_to_pil

            tensor_to_pil(image[None])[0].save(folder / f"{seed}.png")
    click.echo(
        json.dumps(
            {
                "job_id": result.job_id,
                "fragment_key": result.fragment_key,
                "images": result.image_uris,
            },
            indent=2,
        )
    )


@main.command("eval-model")
@click.option("--seeds", default=4, show_default=True, type=int)
@click.option("--steps", default=20, show_default=True, type=int)
@click.option("--limit", default=None, type=int, help="Only the first N held-out scenes.")
@click.option("--json-out", default=None, type=click.Path(), help="Also write the report here.")
@_fail_cleanly
def eval_model(seeds, steps, limit, json_out):
    """Read held-out prompts drawn by the shapes model back with its CLIP; print accuracy."""
    from transformers import CLIPModel, CLIPProcessor

    from fragjobs.base_models import load_base
    from fragjobs.builtin.evaluate import evaluate_model

    loaded = load_base("shapes")
    clip = CLIPModel.from_pretrained(loaded.info.clip_path).eval()
    processor = CLIPProcessor.from_pretrained(loaded.info.clip_path)
    report = evaluate_model(loaded.pipe, clip, processor, seeds=seeds, steps=steps, limit=limit)
    text = json.dumps(report, indent=2)
    if json_out:
        Path(json_out).write_text(text)
    click.echo(text)


@main.command()
@click.option("--out", "out_dir", default="docs", show_default=True, type=click.Path())
@click.option("--model", default="shapes", show_default=True)
@_fail_cleanly
def results(out_dir, model):
    """Write the results page (H1–H5 over 10 prompts + profile ablation) to OUT/results.md."""
    from fragjobs.results import build_results

    build_results(Path(out_dir), model=model)
    click.echo(f"written {Path(out_dir) / 'results.md'}")


@main.group()
def fragments() -> None:
    """List and inspect stored fragments."""


@fragments.command("ls")
@click.option("--status", default=None, help="building, ready, failed_gate, corrupt, evicted")
@_fail_cleanly
def fragments_ls(status):
    """List fragments in the catalog."""
    from fragjobs import chain

    rows = chain.workspace().catalog.list_fragments(status=status)
    for row in rows:
        click.echo(
            f"{row.key}  {row.status:<11} {row.size_bytes or 0:>10} B  "
            f"hits={row.hit_count}  {row.prompt!r}"
        )
    if not rows:
        click.echo("no fragments", err=True)


@fragments.command("show")
@click.argument("key")
@_fail_cleanly
def fragments_show(key):
    """Print a fragment's catalog row, lineage and manifest."""
    from fragjobs import chain

    ws = chain.workspace()
    fragment = chain.load_stored_fragment(key, ws)
    click.echo(
        json.dumps(
            {
                "lineage": ws.catalog.lineage(key),
                "manifest": fragment.manifest.model_dump(mode="json"),
            },
            indent=2,
            sort_keys=True,
            default=str,
        )
    )


@main.group()
def db() -> None:
    """Catalog database schema."""


@db.command("upgrade")
@_fail_cleanly
def db_upgrade():
    """Create or upgrade the catalog schema (alembic) at FRAGJOBS_DATABASE_URL."""
    from fragjobs.catalog import mask_url, upgrade_database
    from fragjobs.config import get_settings

    url = get_settings().resolved_database_url
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    revision = upgrade_database(url)
    click.echo(f"{mask_url(url)} at revision {revision}")


from fragjobs.farm import farm, flower  # noqa: E402  (the farm commands, registered last)
from fragjobs.revalidate import revalidate_command  # noqa: E402

main.add_command(farm)
main.add_command(flower)
main.add_command(revalidate_command)


if __name__ == "__main__":
    main()
