"""The chain's commands: ``run``, ``profile``, ``extract``, ``validate``, ``generate``.

Every command checks its input first (prompt, knobs, output folder) and only then imports
the chain, which loads torch and diffusers: a bad input is refused at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fragjobs.cli.options import (
    check_out_dir,
    fail_cleanly,
    knob_options,
    knobs_from_options,
    parse_seeds,
)
from fragjobs.keys import normalise_prompt


@click.command()
@click.argument("prompt")
@knob_options
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(),
    help="Reports folder: the run writes DIR/YYYY-MM-DD_HHMM[-n]/ [FRAGJOBS_DATA_DIR/reports].",
)
@click.option("--batch-size", default=4, show_default=True, type=int, help="Images per call.")
@click.option("--steps", default=None, type=int, help="Inference steps [the model's].")
@click.option("--profile-seeds", default=None, help="Comma-separated profiling seeds [0,1,2,3].")
@click.option(
    "--validation-seeds", default=None, help="Comma-separated gate seeds [1000,1001,1002,1003]."
)
@click.option(
    "--farm",
    "use_farm",
    is_flag=True,
    help="Submit the chain to the Celery farm (FRAGJOBS_BROKER_URL); see `fragjobs farm run`.",
)
@fail_cleanly
def run(prompt, out_dir, batch_size, steps, profile_seeds, validation_seeds, use_farm, **options):
    """Profile, extract, validate and generate PROMPT; write a report folder.

    The report (metrics, plots, images, index.html) goes to a new folder
    YYYY-MM-DD_HHMM[-n]/ under --out, by default FRAGJOBS_DATA_DIR/reports
    (~/.fragjobs/reports); its path is printed at the end.
    """
    normalise_prompt(prompt)
    knobs = knobs_from_options(
        options,
        batch_size=batch_size,
        steps=steps,
        profile_seeds=parse_seeds(profile_seeds),
        validation_seeds=parse_seeds(validation_seeds),
    )
    out = check_out_dir(Path(out_dir)) if out_dir else None
    if use_farm:
        from fragjobs.cli.farm_commands import run_on_farm

        run_on_farm(prompt, knobs, out=out, report=True)
        return

    from fragjobs.chain.run_chain import run as run_chain
    from fragjobs.cli.report_commands import echo_run_summary

    report = run_chain(prompt, knobs, out_dir=out)
    for attempt in report.summary["fragment"]["attempts"][:-1]:
        if attempt.get("model_level"):
            click.echo(
                f"model-level fragment {attempt['key']}: gate FAILED on this prompt "
                f"({attempt['gate_reason']}); extracting the prompt's own"
            )
            continue
        caching = attempt["caching_min_ssim"]
        click.echo(
            f"fragment {attempt['key']}: gate FAILED (ssim {attempt['ssim']:.3f}) with "
            f"{attempt['heads_kept']}/{attempt['heads_total']} heads"
            + (f", caching kept ssim {caching}" if caching is not None else "")
            + "; extracting a more conservative one"
        )
    echo_run_summary(report.summary, report.out_dir)


@click.command()
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
@fail_cleanly
def profile(prompt, model, seeds, steps, step_stride):
    """Profile PROMPT; print the profile id."""
    normalise_prompt(prompt)
    seed_list = parse_seeds(seeds)
    from fragjobs import chain

    result = chain.profile(
        prompt, model=model, seeds=seed_list, steps=steps, step_stride=step_stride
    )
    click.echo(result.profile_id)


@click.command()
@click.argument("profile_id")
@click.option(
    "--threshold",
    default=None,
    type=float,
    help="Fraction of attention heads kept, in (0, 1] [FRAGJOBS_DEFAULT_THRESHOLD: 0.75].",
)
@click.option("--min-heads", default=1, show_default=True, type=int)
@click.option("--low-rank/--no-low-rank", default=None, help="[default: off]")
@click.option("--no-int8", is_flag=True)
@click.option("--no-caching", is_flag=True)
@click.option("--fidelity", default=None, type=float, help="[FRAGJOBS_DEFAULT_FIDELITY: 0.9]")
@fail_cleanly
def extract(profile_id, threshold, min_heads, low_rank, no_int8, no_caching, fidelity):
    """Extract the fragment of PROFILE_ID; print its key."""
    from fragjobs.chain.knobs import ChainKnobs
    from fragjobs.keys import validate_key

    validate_key(profile_id)
    knobs = ChainKnobs.from_settings(
        threshold=threshold,
        min_heads_per_layer=min_heads,
        low_rank=low_rank,
        int8=not no_int8,
        caching=not no_caching,
        fidelity=fidelity,
    )
    from fragjobs import chain

    click.echo(chain.extract(profile_id, knobs.extraction_config()).key)


@click.command()
@click.argument("key")
@click.option("--seeds", default="1000,1001,1002,1003", show_default=True)
@fail_cleanly
def validate(key, seeds):
    """Validate fragment KEY against its full model; exit 1 if the gate fails."""
    from fragjobs.keys import validate_key

    validate_key(key)
    seed_list = parse_seeds(seeds)
    from fragjobs import chain

    result = chain.validate(key, seeds=seed_list)
    for check in result.gate.checks:
        click.echo(
            f"  {check.name:<12} {check.status:<11} value={check.value} "
            f"limit {check.op} {check.limit}" + (f" ({check.reason})" if check.reason else "")
        )
    click.echo(f"{key}: {'passed' if result.passed else 'FAILED'}")
    sys.exit(0 if result.passed else 1)


@click.command()
@click.argument("prompt")
@click.option("--variants", default=4, show_default=True, type=int)
@click.option("--seeds", default=None, help="Comma-separated seeds (instead of --variants).")
@click.option("--model", default=None)
@click.option("--key", default=None, help="Fragment key (default: the prompt's ready fragment).")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--out", "out_dir", default=None, type=click.Path(), help="Also copy PNGs here.")
@fail_cleanly
def generate(prompt, variants, seeds, model, key, batch_size, out_dir):
    """Generate seed variants of PROMPT (fragment if ready, else the full model)."""
    normalise_prompt(prompt)
    seed_list = parse_seeds(seeds)
    folder = check_out_dir(Path(out_dir)) if out_dir else None
    from fragjobs import chain
    from fragjobs.reports import tensor_to_pil

    result = chain.generate(
        prompt,
        variants=variants,
        seeds=seed_list,
        model=model,
        key=key,
        batch_size=batch_size,
        ws=chain.workspace(),
    )
    if result.used_fallback:
        click.echo(f"full model used: {result.fallback_reason}", err=True)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for seed, image in zip(result.seeds, result.images, strict=True):
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


@click.command("eval-model")
@click.option("--seeds", default=4, show_default=True, type=int)
@click.option("--steps", default=20, show_default=True, type=int)
@click.option("--limit", default=None, type=int, help="Only the first N held-out scenes.")
@click.option("--json-out", default=None, type=click.Path(), help="Also write the report here.")
@fail_cleanly
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


@click.command()
@click.option("--out", "out_dir", default="docs", show_default=True, type=click.Path())
@click.option("--model", default="shapes", show_default=True)
@click.option(
    "--prompts-seed",
    type=int,
    default=None,
    help="Run 10 other prompts of the shapes vocabulary, drawn with this seed, instead of "
    "the page's own (none of the page's constants was tuned on them).",
)
@fail_cleanly
def results(out_dir, model, prompts_seed):
    """Write the results page (H1–H5 over 10 prompts + profile ablation) to OUT.

    Writes OUT/results.md, OUT/results.html (the same report builder as `fragjobs run`:
    one report folder per prompt under OUT/results/, with trend plots) and OUT/results.json.
    """
    out = check_out_dir(Path(out_dir))
    from fragjobs.bench.results import PROMPTS, build_results, fresh_prompts

    fresh = prompts_seed is not None
    build_results(
        out,
        model=model,
        prompts=fresh_prompts(prompts_seed) if fresh else PROMPTS,
        command=f"fragjobs results --out {out_dir} --prompts-seed {prompts_seed}"
        if fresh
        else None,
    )
    click.echo(f"written {(out / 'results.md').resolve()}")
    click.echo(f"open:   {(out / 'results.html').resolve()}")


COMMANDS = [run, profile, extract, validate, generate, eval_model, results]

__all__ = ["COMMANDS"]
