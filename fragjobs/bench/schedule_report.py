"""The schedule ablation on the results page: its markdown section, HTML table and reading."""

from __future__ import annotations

from typing import Any

from fragjobs.bench.schedule_ablation import SAME_SSIM, SOURCE_TITLES, SOURCES

TITLE = "Does a prompt's own caching schedule make the better fragment?"


def _cell(entry: dict[str, Any]) -> str:
    return f"{entry['ssim']:.4f} / {entry['ssim_worst']:.4f} @{entry['cost']:.2f}"


def method_text(ablation: dict[str, Any]) -> str:
    """What was compared, on which seeds (one paragraph)."""
    return (
        "For each prompt and target cost, each source's candidate schedule whose estimated "
        "cost (fraction of the UNet's block time) is nearest the target: the prompt's own "
        "profile, another prompt's, a model-level schedule (block changes averaged over the "
        "other prompts' profiles, the evaluated prompt left out, as Block Caching calibrates "
        "once per model) and DeepCache at block granularity (shallowest level every step, "
        "deeper levels every N steps, same hooks; not the deepcache package). Plain reuse "
        f"(no forecasting). Cells: SSIM mean / worst seed @ estimated cost, against the full "
        f"model on unseen seeds {ablation['seeds']}."
    )


def reading(ablation: dict[str, Any]) -> list[str]:
    """What the ablation shows, and the conclusion the issue asks for, from its figures."""
    lines = []
    summary = ablation["summary"]
    verdicts = []
    for target, at in summary.items():
        own, other, shared, deep = (at[s] for s in SOURCES)
        lines.append(
            f"At cost {target}: model-level {shared['ssim']:.4f} (worst seed "
            f"{shared['ssim_worst']:.4f}) vs own {own['ssim']:.4f} ({own['ssim_worst']:.4f}), "
            f"another prompt's {other['ssim']:.4f} ({other['ssim_worst']:.4f}), DeepCache "
            f"{deep['ssim']:.4f} ({deep['ssim_worst']:.4f}) at cost {deep['cost']:.2f}; the "
            f"model-level schedule kept the own one's mean SSIM (within {SAME_SSIM}, or beat "
            f"it) on {at['model_level_kept_own']} of {at['prompts']} prompts."
        )
        same = at.get("same_schedule_as_own") or {}
        if same:
            lines[-1] += (
                " Schedules identical to the own one: "
                + ", ".join(f"{SOURCE_TITLES[s]} {n}" for s, n in same.items())
                + f" of {at['prompts']}."
            )
        verdicts.append(at["model_level_as_good"])
    sharing = ablation.get("break_even") or {}
    estimate = ""
    if sharing.get("runs"):
        estimate = (
            f" The chain shares it now: {sharing['model_level_runs']} of {len(sharing['runs'])} "
            "prompts of this page passed the gate with the base's model-level fragment "
            f"(break-even median {_or_none(sharing.get('median_model_level'))} variants); the "
            "others extracted their own (median "
            f"{_or_none(sharing.get('median_own'))})."
        )
    if all(verdicts):
        lines.append(
            "Conclusion: a model-level schedule is as good as the prompt's own (mean and worst "
            f"seed within {SAME_SSIM} SSIM, or better, at every target), so the cache should "
            "share it: one model-level fragment per base, per-prompt work only where it "
            "measurably helps." + estimate
        )
    elif any(verdicts):
        lines.append(
            "Conclusion: neither source dominates: the model-level schedule is as good or "
            "better at some targets and worse at others. Share it as the default (one "
            "model-level fragment per base) and search a prompt's own schedule only where "
            "validation shows it measurably helps." + estimate
        )
    else:
        lines.append(
            "Conclusion: at equal estimated cost the prompt's own schedule is measurably "
            f"better than a model-level one (by more than {SAME_SSIM} SSIM, mean or worst "
            "seed, at every target). The chain's model-level fragment is not one of these "
            "equal-cost points: it keeps the fidelity on every calibration prompt (so it costs "
            "more), and each prompt's gate decides whether it is used; a prompt it fails "
            "extracts its own." + estimate
        )
    return lines


def markdown_section(ablation: dict[str, Any]) -> list[str]:
    """The section's markdown lines: method, one table per target cost, the reading."""
    lines = ["", f"## {TITLE}", "", method_text(ablation), ""]
    for target, at in ablation["summary"].items():
        lines += [
            f"Target cost {target}:",
            "",
            "| prompt | " + " | ".join(SOURCE_TITLES[s] for s in SOURCES) + " |",
            "|---" * (len(SOURCES) + 1) + "|",
        ]
        for row in ablation["rows"]:
            if str(row["target_cost"]) == target:
                lines.append(
                    f"| {row['prompt']} | " + " | ".join(_cell(row[s]) for s in SOURCES) + " |"
                )
        lines += [
            "| **mean** | " + " | ".join(f"**{_cell(at[s])}**" for s in SOURCES) + " |",
            "",
        ]
    lines += reading(ablation)
    return lines


def _or_none(value: float | None) -> str:
    return "none computed" if value is None else str(value)


def html_section(ablation: dict[str, Any]) -> dict[str, Any]:
    """The ablation as a table of the HTML page (rows per prompt and target)."""
    return {
        "title": TITLE,
        "text": method_text(ablation) + " " + " ".join(reading(ablation)),
        "columns": ["prompt", "target cost", *(SOURCE_TITLES[s] for s in SOURCES)],
        "rows": [
            [r["prompt"], r["target_cost"], *(_cell(r[s]) for s in SOURCES)]
            for r in ablation["rows"]
        ],
    }
