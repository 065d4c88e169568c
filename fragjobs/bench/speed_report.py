"""The speed benchmark's results as one markdown table and a speed-up vs SSIM plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One markdown table for all models."""
    cols = [
        "method",
        "latency_ms",
        "speedup",
        "ssim",
        "ssim_min",
        "psnr_db",
        "bytes_ratio",
        "rss_held_mib",
        "rss_peak_mib",
        "cuda_peak_mib",
        "break_even_variants",
    ]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for result in results:
        label = f"{result['model']} {result['size']}px {result['steps']} steps"
        for row in result["rows"]:
            cells = [
                str(row.get(c, row.get("unavailable", "")) if c == "latency_ms" else row.get(c, ""))
                for c in cols
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Speed-up vs SSIM, one marker per method, one panel per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(results), 4))
    for i, result in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        for row in result["rows"]:
            if "speedup" in row:
                ax.scatter(row["ssim"], row["speedup"])
                ax.annotate(row["method"], (row["ssim"], row["speedup"]), fontsize=8)
        ax.set_xlabel("SSIM vs full model")
        ax.set_ylabel("speed-up vs full model")
        ax.set_title(f"{result['model']} {result['size']}px, {result['steps']} steps")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
