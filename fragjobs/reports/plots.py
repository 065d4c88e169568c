"""The report's plots: latency, the quality / speed-up trade-off, and trends over runs.

Matplotlib ``Figure`` objects (no pyplot: no global state, no display), rendered to PNG by the
Agg backend. A figure that was not measured is drawn as a panel saying so, never invented.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from fragjobs.reports.folders import Report

_DPI = 100
FULL_COLOUR, FRAGMENT_COLOUR = "#4c72b0", "#dd8452"
OVERHEAD_COLOURS = {"profile_s": "#8172b3", "extract_s": "#937860", "validate_s": "#da8bc3"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    # fixed margins (set in each plot), not a layout engine: a constrained layout costs
    # seconds per figure on a small CPU
    return Figure(figsize=(width, height), dpi=_DPI)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _not_measured(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, color="#555")
    ax.set_xticks([])
    ax.set_yticks([])


def latency_plot(performance: dict[str, Any], path: Path, *, title: str = "") -> Path:
    """``plots/latency.png``: per-image latency of full model and fragment (median, with the
    min–max of the timed batches), and the cumulative time of N images with the one-off
    profile / extract / validate overhead, where the two lines cross at the break-even."""
    fig = _figure(10, 4.2)
    left, right = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.84, wspace=0.25)
    full, frag = performance.get("latency_full_ms"), performance.get("latency_fragment_ms")
    if full is None or frag is None:
        _not_measured(left, "per-image latency was not measured in this run")
        _not_measured(right, "no break-even without both latencies")
    else:
        spreads = [
            performance.get("latency_full_ms_range"),
            performance.get("latency_fragment_ms_range"),
        ]
        errors = [
            [m - (s or [m, m])[0] for m, s in zip((full, frag), spreads, strict=True)],
            [(s or [m, m])[1] - m for m, s in zip((full, frag), spreads, strict=True)],
        ]
        bars = left.bar(
            ["full model", "fragment"],
            [full, frag],
            yerr=errors,
            capsize=6,
            color=[FULL_COLOUR, FRAGMENT_COLOUR],
        )
        left.bar_label(bars, labels=[f"{full:.1f} ms", f"{frag:.1f} ms"], padding=3)
        left.set_ylabel("ms per image (median; bar: min–max)")
        left.margins(y=0.15)
        batch, steps = performance.get("batch_size"), performance.get("steps")
        left.set_title(f"per-image latency, batch {batch}, {steps} steps ({full / frag:.2f}×)")
        _cumulative(right, performance, full, frag)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _cumulative(ax: Axes, performance: dict[str, Any], full: float, frag: float) -> None:
    parts = {k: performance.get(k) or 0.0 for k in OVERHEAD_COLOURS}
    overhead = performance.get("overhead_s")
    if overhead is None:
        overhead = sum(parts.values())
    saving = (full - frag) / 1000.0
    break_even = overhead / saving if saving > 0 else None
    horizon = max(10, int(2 * break_even) + 1) if break_even is not None else 50
    n = list(range(horizon + 1))
    ax.plot(n, [i * full / 1000 for i in n], color=FULL_COLOUR, label="full model")
    ax.plot(n, [overhead + i * frag / 1000 for i in n], color=FRAGMENT_COLOUR, label="fragment")
    bottom = 0.0
    for key, colour in OVERHEAD_COLOURS.items():
        ax.bar(
            0,
            parts[key],
            bottom=bottom,
            width=horizon / 25,
            color=colour,
            label=f"{key[:-2]} {parts[key]:.1f} s",
        )
        bottom += parts[key]
    if break_even is not None:
        ax.axvline(break_even, color="#333", linestyle=":", linewidth=1)
        title = f"cumulative time: all overhead pays back after {break_even:.1f} images"
        delivered = performance.get("delivered_full_model_images")
        if performance.get("chain_s") is not None and delivered:
            from fragjobs.validation.break_even import break_even_delivered

            counted = break_even_delivered(
                performance["chain_s"], delivered, full / 1000.0, frag / 1000.0
            )
            if counted is not None:
                title += (
                    f"\n(break-even {counted:.1f}, counting {delivered} delivered "
                    "full-model images)"
                )
        ax.set_title(title, fontsize=9)
    else:
        ax.set_title("cumulative time: the fragment is not faster, never pays back")
    if performance.get("profile_reused") or performance.get("fragment_reused"):
        ax.text(
            0.02,
            0.98,
            "profile/fragment reused from the store: small overhead",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            color="#555",
        )
    ax.set_xlabel("images generated")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8, loc="lower right")


def quality_tradeoff_plot(
    attempts: Sequence[dict[str, Any]],
    path: Path,
    *,
    chosen: str | None,
    ssim_min: float | None = None,
    clip_delta_max: float | None = None,
    title: str = "",
) -> Path:
    """``plots/quality_tradeoff.png``: the worst validation seed's SSIM, and CLIP Δ, against
    measured speed-up for every fragment the chain tried (the gate ladder's attempts), the
    chosen one marked: a speed-up is claimed only at the fidelity the gate accepts.

    Each attempt is ``{"key", "ssim_worst", "clip_delta", "speedup", "passed"}``; a ``None``
    speed-up or metric leaves that point out and says so.
    """
    fig = _figure(10, 4.2)
    axes = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.88, wspace=0.25)
    for ax, metric, label, limit, better in (
        (axes[0], "ssim_worst", "SSIM vs full model (worst validation seed)", ssim_min, ">="),
        (axes[1], "clip_delta", "CLIP-score drop (CLIP Δ)", clip_delta_max, "<="),
    ):
        points = [a for a in attempts if a.get(metric) is not None and a.get("speedup") is not None]
        if not points:
            _not_measured(ax, f"{metric} was not computed for any fragment of this run")
            continue
        for i, attempt in enumerate(attempts, start=1):
            if attempt not in points:
                continue
            marker = "*" if attempt["key"] == chosen else ("o" if attempt["passed"] else "X")
            size = 260 if attempt["key"] == chosen else 80
            ax.scatter(
                attempt["speedup"],
                attempt[metric],
                marker=marker,
                s=size,
                color=FRAGMENT_COLOUR if attempt["passed"] else "#c44e52",
                zorder=3,
            )
            note = f"#{i}" + (" chosen" if attempt["key"] == chosen else "")
            note += "" if attempt["passed"] else " (gate failed)"
            ax.annotate(
                note,
                (attempt["speedup"], attempt[metric]),
                textcoords="offset points",
                xytext=(8, 6),
                fontsize=8,
            )
        if limit is not None:
            ax.axhline(limit, color="#333", linestyle="--", linewidth=1)
            ax.annotate(
                f"gate: {metric} {better} {limit:g}",
                (0.01, limit),
                xycoords=("axes fraction", "data"),
                fontsize=8,
                va="bottom",
            )
        ax.axvline(1.0, color="#999", linewidth=0.8)
        ax.set_xlabel("measured speed-up (full / fragment latency)")
        ax.set_ylabel(label)
        ax.margins(0.25)
    missing = [a["key"] for a in attempts if a.get("speedup") is None]
    if missing:
        fig.text(0.01, 0.01, f"speed-up not measured for {len(missing)} fragment(s)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


TREND_METRICS = (
    ("speed-up (full / fragment)", lambda r: r.hypothesis("H4").get("values", {}).get("speedup")),
    ("SSIM vs full model", lambda r: (r.summary.get("quality") or {}).get("ssim")),
    (
        "break-even (images)",
        lambda r: r.hypothesis("H5").get("values", {}).get("break_even_variants"),
    ),
)


def trend_plot(reports: Sequence[Report], path: Path) -> Path:
    """Speed-up, SSIM and break-even of every VALID run in time order, one line per base
    model (INVALID runs are left out)."""
    runs = [r for r in reports if r.valid]
    fig = _figure(10, 8)
    axes = fig.subplots(len(TREND_METRICS), 1, sharex=True)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.17, top=0.95, hspace=0.12)
    order = {r.run_id: i for i, r in enumerate(runs)}
    models = sorted({str(r.model) for r in runs})
    for ax, (label, read) in zip(axes, TREND_METRICS, strict=True):
        ax.set_ylabel(label, fontsize=9)
        if not runs:
            _not_measured(ax, "no valid run yet")
            continue
        for model in models:
            xs, ys = [], []
            for r in runs:
                value = read(r)
                if str(r.model) == model and isinstance(value, int | float):
                    xs.append(order[r.run_id])
                    ys.append(value)
            ax.plot(xs, ys, marker="o", label=model)
        ax.grid(alpha=0.3)
    if runs:
        axes[0].legend(fontsize=8, title="base model", title_fontsize=8)
        axes[-1].set_xticks(
            range(len(runs)), [r.run_id for r in runs], rotation=45, ha="right", fontsize=7
        )
    fig.suptitle("trends over runs (VALID runs only)", fontsize=10)
    return _save(fig, path)
