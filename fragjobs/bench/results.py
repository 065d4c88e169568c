"""The results page: H1–H5 on the shapes model over many prompts, and the profile ablation.

``fragjobs results --out docs`` runs the whole chain (``fragjobs.chain.run``) for each prompt,
with paraphrases of the prompt for H3, and tests the seed's central claim — that a *prompt's
own* profile is what makes a fragment good — by pruning the same number of heads chosen from
(a) the prompt's own profile, (b) another prompt's profile, (c) a model-level profile (head
scores averaged over all prompts) and (d) random scores, then comparing each with the full
model on the same seeds (SSIM); the same question for the caching schedule, where a
fragment's speed comes from, is :mod:`fragjobs.bench.schedule_ablation`. Writes
``docs/results.md``, ``docs/results.json``, ``docs/results.html`` (the reports' index page
with trend plots and both ablations) and one
report folder per prompt under ``docs/results/`` (the same report builder as ``fragjobs
run``: metrics, plots, images, ``index.html``).
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from fragjobs import chain
from fragjobs.bench import schedule_report
from fragjobs.bench.schedule_ablation import schedule_ablation_document
from fragjobs.chain.knobs import ChainKnobs
from fragjobs.chain.model_level import builtin_calibration_prompts, model_level_fragment
from fragjobs.extraction import HeadPruningConfig, apply_head_pruning_
from fragjobs.families import denoiser
from fragjobs.generation import GenerationConfig, generate_images, with_unet
from fragjobs.reports.folders import read_report
from fragjobs.reports.html import write_index_page
from fragjobs.validation import compute_quality

PROMPTS = (
    "a red circle on the left",
    "a large blue square at the top over a white background",
    "a small yellow star in the center",
    "a green triangle on the right over a black background",
    "a purple cross at the bottom",
    "a small orange circle at the top over a teal background",
    "a white star on the left over a pink background",
    "a large black square on the right over a grey background",
    "a red star on the left",
    "a green triangle on the right",
)
ABLATION_SEEDS = (1000, 1001, 1002, 1003)


def fresh_prompts(seed: int, n: int = len(PROMPTS)) -> tuple[str, ...]:
    """``n`` other prompts of the shapes vocabulary, drawn with ``seed``: one shape each, its
    size word and the background phrase each named with probability ½ (the forms of
    :data:`PROMPTS`), none of them a prompt of this page or a model-level calibration prompt
    (so nothing was tuned on them)."""
    import random

    from fragjobs.builtin.captions import plain_caption
    from fragjobs.builtin.scenes import sample_specs

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen = set(PROMPTS) | set(builtin_calibration_prompts())
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    out: list[str] = []
    while len(out) < n:
        for spec in sample_specs(4 * n, generator, held_out=None, jitter=False):
            text = plain_caption(spec, size=rng.random() < 0.5, background=rng.random() < 0.5)
            if text not in seen:
                seen.add(text)
                out.append(text)
            if len(out) == n:
                break
    return tuple(out)


def paraphrases_of(prompt: str) -> list[str]:
    """Two rewordings with the same attributes (synonyms from the scene captions)."""
    swaps = [
        {
            "circle": "disc",
            "square": "box",
            "triangle": "three-sided shape",
            "star": "star shape",
            "cross": "plus sign",
            "on the left": "at the left",
            "on the right": "at the right",
            "at the top": "up top",
            "at the bottom": "down at the bottom",
            "in the center": "in the middle",
        },
        {
            "red": "crimson",
            "blue": "navy",
            "yellow": "golden",
            "green": "emerald",
            "purple": "violet",
            "orange": "amber",
            "large": "big",
            "small": "tiny",
            "over a": "on a",
            "background": "backdrop",
        },
    ]
    out = []
    for table in swaps:
        text = prompt
        for old, new in table.items():
            text = text.replace(old, new)
        out.append(text)
    return [t for t in out if t != prompt]


def keep_top(scores: dict[str, torch.Tensor], keep: int) -> HeadPruningConfig:
    """Keep the ``keep`` best heads overall by score, at least one per module."""
    flat = sorted(
        ((float(s), name, h) for name, t in scores.items() for h, s in enumerate(t)),
        reverse=True,
    )
    kept: dict[str, set[int]] = {name: {int(t.argmax())} for name, t in scores.items()}
    for _, name, head in flat:
        if sum(len(v) for v in kept.values()) >= keep:
            break
        kept[name].add(head)
    return HeadPruningConfig(keep={n: tuple(sorted(v)) for n, v in kept.items()})


def ablation(
    model: str, profiles: dict[str, Any], keep_ratio: float, ws: chain.Workspace
) -> list[dict[str, Any]]:
    """SSIM vs the full model for heads chosen by own / other / model-level / random scores."""
    loaded = chain.base(model, ws.settings)
    prompts = list(profiles)
    own_scores = {p: profiles[p].head_scores() for p in prompts}
    model_level = {
        name: torch.stack([own_scores[p][name] for p in prompts]).mean(0)
        for name in own_scores[prompts[0]]
    }
    total = sum(t.numel() for t in model_level.values())
    keep = round(keep_ratio * total)
    info = loaded.info
    gen = GenerationConfig(
        steps=info.default_steps,
        guidance_scale=info.default_guidance,
        height=info.height,
        width=info.width,
        batch_size=len(ABLATION_SEEDS),
    )
    rows = []
    for i, prompt in enumerate(prompts):
        full = generate_images(loaded.pipe, prompt, list(ABLATION_SEEDS), gen)
        rng = torch.Generator().manual_seed(i)
        choices = {
            "own": own_scores[prompt],
            "other": own_scores[prompts[(i + 1) % len(prompts)]],
            "model_level": model_level,
            "random": {n: torch.rand(t.shape, generator=rng) for n, t in model_level.items()},
        }
        row: dict[str, Any] = {"prompt": prompt, "heads_kept": f"{keep}/{total}"}
        for label, scores in choices.items():
            unet = copy.deepcopy(denoiser(loaded.pipe))
            apply_head_pruning_(unet, keep_top(scores, keep))
            images = generate_images(
                with_unet(loaded.pipe, unet), prompt, list(ABLATION_SEEDS), gen
            )
            row[label] = round(compute_quality(full, images, prompt).ssim, 4)
        rows.append(row)
    return rows


def build_results(
    out: Path,
    *,
    model: str = "shapes",
    prompts: tuple[str, ...] = PROMPTS,
    variants: int = 4,
    keep_ratio: float = 0.72,
    command: str | None = None,
) -> dict[str, Any]:
    """Run every prompt and the ablation; write results.md/json and images under ``out``."""
    ws = chain.workspace()
    started = time.perf_counter()
    runs, profiles, reports = [], {}, []
    reports_root = out / "results"
    # The base's model-level fragment is a one-off (once per base, not per prompt): built
    # before the runs and reported on its own, so each run's break-even is its own work.
    level = model_level_fragment(ws, ChainKnobs.from_settings(ws.settings, model=model))
    model_level = {
        "key": level.key,
        "reason": level.reason,
        "built_s": round(level.built_s, 2),
        "calibration_prompts": list(level.prompts),
    }
    for prompt in prompts:
        report = chain.run(
            prompt,
            model=model,
            variants=variants,
            out_dir=reports_root,
            paraphrases=paraphrases_of(prompt),
            ws=ws,
            progress=False,
        )
        reports.append(read_report(report.out_dir))
        profiles[prompt] = chain.profile(prompt, model=model, ws=ws, progress=False).profile
        runs.append(
            {
                "prompt": prompt,
                "folder": report.out_dir.relative_to(out).as_posix(),
                "key": report.key,
                "passed": report.passed,
                "hypotheses": report.summary["hypotheses"],
                "fragment_used": not report.generation.used_fallback,
                "attempts": report.summary["fragment"]["attempts"],
                "model_level_used": bool((report.summary.get("model_level") or {}).get("used")),
            }
        )
        print(
            f"[{time.perf_counter() - started:7.1f}s] {prompt}: "
            + " ".join(f"{h}={v['status']}" for h, v in report.summary["hypotheses"].items())
            + f" model-level used: {bool((report.summary.get('model_level') or {}).get('used'))}",
            flush=True,
        )
    rows = ablation(model, profiles, keep_ratio, ws)
    loaded = chain.base(model, ws.settings)
    schedules = schedule_ablation_document(
        loaded.pipe,
        profiles,
        height=loaded.info.height,
        width=loaded.info.width,
        run_summaries=[r.summary for r in reports],
    )
    results = {
        "model": model,
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "command": command or f"fragjobs results --out {out}",
        "runs": runs,
        "model_level": model_level,
        "ablation": rows,
        "schedule_ablation": schedules,
        "keep_ratio": keep_ratio,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(render_markdown(results))
    write_index_page(
        reports_root,
        reports=reports,
        title=f"fragjobs results on {model}",
        sections=[
            ablation_section(results),
            schedule_report.html_section(results["schedule_ablation"]),
        ],
        out=out / "results.html",
    )
    return results


def ablation_section(results: dict[str, Any]) -> dict[str, Any]:
    """The profile ablation as a table of the HTML page."""
    return {
        "title": "Does a prompt's own profile make the better fragment?",
        "text": f"Same number of heads kept ({results['ablation'][0]['heads_kept']}), chosen from "
        f"each score; SSIM against the full model on seeds {list(ABLATION_SEEDS)} (pruning only).",
        "columns": ["prompt", "own profile", "another prompt's", "model-level", "random"],
        "rows": [
            [r["prompt"], r["own"], r["other"], r["model_level"], r["random"]]
            for r in results["ablation"]
        ],
    }


def _value(h: dict[str, Any], key: str) -> str:
    value = h["values"].get(key)
    return "null" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _model_level_lines(level: dict[str, Any] | None) -> list[str]:
    """What the page says of the base's model-level fragment (absent on older pages)."""
    if not level:
        return []
    if level.get("key") is None:
        return [f"No model-level fragment: {level.get('reason')}.", ""]
    prompts = "; ".join(f"“{p}”" for p in level.get("calibration_prompts") or [])
    return [
        f"Model-level fragment `{level['key']}`: built once for the base before the runs in "
        f"{level['built_s']} s (calibration prompts drawn from the shapes vocabulary, none of "
        f"them tuned to this page: {prompts}). That one-off is not in any run's break-even; "
        "spread over the prompts that used it, it adds its seconds ÷ (their number × saving "
        "per image) variants to each.",
        "",
    ]


def render_markdown(results: dict[str, Any]) -> str:
    """The page: per-prompt hypotheses with values, a status count, the ablation table."""
    runs = results["runs"]
    lines = [
        f"# fragjobs results on `{results['model']}`",
        "",
        f"Reproduce: `{results['command']}` ({results['seconds']} s on {results['machine']}).",
        "Every number below was measured in that run; speed ratios are full vs fragment, same",
        "steps, same batch, warm, on this machine. A metric that could not be computed is",
        "`null` and its hypothesis `UNAVAILABLE`.",
        "",
        "## H1–H5 per prompt",
        "",
        *_model_level_lines(results.get("model_level")),
        "`heads kept`: of the last fragment validated; `(n)` when it is the n-th: earlier ones",
        "failed the gate and a more conservative one was extracted (the model-level fragment",
        "first, then the prompt's own, starting without head pruning and with a caching schedule",
        "allowed half the SSIM loss, each next one half again, with a longer warm-up and at",
        "least the failed schedule's recomputes); `model-level`: the base's",
        "model-level fragment passed this prompt's gate and made its variants (the prompt was",
        "not profiled).",
        "",
        "| # | prompt | gate | heads kept | H1 (SSIM, CLIP Δ, LPIPS) | H2 (memory reduction) | "
        "H3 (reuse pass rate) | H4 (speed-up) | H5 (break-even variants) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(runs):
        h = run["hypotheses"]
        attempts = run.get("attempts") or []
        heads = "?"
        if attempts:
            last = attempts[-1]
            heads = f"{last['heads_kept']}/{last['heads_total']}"
            heads = "model-level" if last.get("model_level") else heads
            heads += f" ({len(attempts)})" if len(attempts) > 1 else ""
        lines.append(
            f"| {i} | {run['prompt']} | {'pass' if run['passed'] else 'FAIL'} | {heads} | "
            f"{h['H1']['status']} ({_value(h['H1'], 'ssim')}, {_value(h['H1'], 'clip_delta')}, "
            f"{_value(h['H1'], 'lpips')}) | {h['H2']['status']} ({_value(h['H2'], 'reduction')})"
            f" | {h['H3']['status']} ({_value(h['H3'], 'pass_rate')}) | {h['H4']['status']} "
            f"({_value(h['H4'], 'speedup')}) | {h['H5']['status']} "
            f"({_value(h['H5'], 'break_even_variants')}) |"
        )
    lines += ["", "Status counts over the prompts:", ""]
    for name in ("H1", "H2", "H3", "H4", "H5"):
        counts: dict[str, int] = {}
        for run in runs:
            status = run["hypotheses"][name]["status"]
            counts[status] = counts.get(status, 0) + 1
        reason = next(
            (r["hypotheses"][name]["reason"] for r in runs if r["hypotheses"][name]["reason"]), None
        )
        lines.append(
            f"- **{name}** {runs[0]['hypotheses'][name]['name']}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + (f" — e.g. {reason}" if reason else "")
        )
    lines += [
        "",
        "## Does a prompt's own profile make the better fragment?",
        "",
        f"Same number of heads kept ({results['ablation'][0]['heads_kept']}), chosen from each "
        "score; SSIM of the pruned model's images against the full model's, seeds "
        f"{list(ABLATION_SEEDS)} (pruning only: no low-rank, int8 or caching).",
        "",
        "| prompt | own profile | another prompt's | model-level (mean over prompts) | random |",
        "|---|---|---|---|---|",
    ]
    for row in results["ablation"]:
        lines.append(
            f"| {row['prompt']} | {row['own']} | {row['other']} | "
            f"{row['model_level']} | {row['random']} |"
        )
    means = {
        k: sum(r[k] for r in results["ablation"]) / len(results["ablation"])
        for k in ("own", "other", "model_level", "random")
    }
    lines += [
        "| **mean** | "
        + " | ".join(f"**{means[k]:.4f}**" for k in ("own", "other", "model_level", "random"))
        + " |",
    ]
    if "schedule_ablation" in results:
        lines += schedule_report.markdown_section(results["schedule_ablation"])
    lines += ["", "## Side by side (full model above, fragment below, validation seeds)", ""]
    for run in runs:
        lines += [
            f"**{run['prompt']}** (`{run['key']}`)",
            "",
            f"![{run['prompt']}]({run['folder']}/compare.png)",
            "",
        ]
    return "\n".join(lines) + "\n"
