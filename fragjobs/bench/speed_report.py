"""The speed benchmark's results: one markdown table, a dominance list and a speed vs SSIM plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fragjobs.bench.dominance import dominance_lines
from fragjobs.bench.timing import SPREAD_LIMIT

COLUMNS = [
    "method",
    "latency_ms",
    "latency_min_ms",
    "latency_max_ms",
    "spread",
    "speedup",
    "ssim",
    "ssim_min",
    "psnr_db",
    "bytes_ratio",
    "rss_held_mib",
    "rss_peak_mib",
    "cuda_peak_mib",
    "break_even_old",
    "break_even_delivered",
]


def fragment_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of extracted fragments (they carry ``extract_s``; the model-level one
    ``build_s``)."""
    return [row for row in result["rows"] if "extract_s" in row or "build_s" in row]


def peer_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of peers: neither the full model nor a fragment."""
    fragments = {id(row) for row in fragment_rows(result)}
    return [r for r in result["rows"] if r["method"] != "full" and id(r) not in fragments]


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One markdown table for all models; an unavailable peer's row says why, without figures."""
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for result in results:
        label = size_label(result)
        for row in result["rows"]:
            if "unavailable" in row:
                cells = [row["method"], f"unavailable: {row['unavailable']}"]
                cells += [""] * (len(COLUMNS) - 2)
            else:
                cells = [_cell(row, column) for column in COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_label(result: dict[str, Any]) -> str:
    """``sdxl-shape 128px (native 512px) 4 steps``: the model, the size it ran at (and its
    own when smaller or larger) and the steps."""
    native = result.get("native_size")
    size = f"{result['size']}px"
    if native is not None and native != result["size"]:
        size += f" (native {native}px)"
    return f"{result['model']} {size} {result['steps']} steps"


def _cell(row: dict[str, Any], column: str) -> str:
    if column == "spread":
        return "WIDE" if row.get("spread_wide") else ""
    value = row.get(column, "")
    return "" if value is None and column.startswith("break_even") else str(value)


def markdown_report(results: list[dict[str, Any]], machine: str) -> str:
    """The benchmark's markdown: the machine, the table, the spread rule and the dominance."""
    parts = [
        f"machine: {machine}",
        "",
        markdown_table(results),
        "",
        f"latency_ms: median of the repeats (min / max beside it); spread WIDE: the slowest "
        f"repeat took more than {SPREAD_LIMIT}× the fastest, so the machine's load changed "
        "during the run and that row's ratios are uncertain.",
        "break_even_old: (profile + extract + validate s) ÷ (full − fragment s per image); "
        "break_even_delivered: the same seconds beyond delivering the full-model images the "
        "chain computed anyway (profiling and evaluation seeds) ÷ the same saving "
        "(fragjobs.validation.break_even). model_level (the base's model-level fragment, "
        "built once per base: build_s in bench.json): what a prompt pays to use it is only "
        "the gate, the full model and the fragment on four seeds and the metrics (gate_s), "
        "counted beyond the four full-model images it delivers.",
    ]
    for result in results:
        lines = dominance_lines(fragment_rows(result), peer_rows(result))
        parts += [
            "",
            f"Dominance on {result['model']} (for each peer point, the fastest fragment point "
            "with mean SSIM >= the peer's and worst-seed SSIM >= the peer's worst; ratio = "
            "peer latency ÷ fragment latency):",
            "",
            *(lines or ["- no peer point was timed"]),
        ]
    return "\n".join(parts) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Speed-up vs SSIM, one panel per model: a marker at each method's mean SSIM and a
    whisker down to its worst seed; fragments round, peers square, the full model a star."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(results), 5))
    for i, result in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        fragments = {row["method"] for row in fragment_rows(result)}
        for row in result["rows"]:
            if "speedup" not in row:
                continue
            kind = "fragment" if row["method"] in fragments else "peer"
            if row["method"] == "full":
                kind = "full"
            colour = {"fragment": "C0", "peer": "C3", "full": "k"}[kind]
            ax.plot(
                [row["ssim_min"], row["ssim"]],
                [row["speedup"], row["speedup"]],
                color=colour,
                alpha=0.5,
                linewidth=1,
            )
            ax.plot(row["ssim_min"], row["speedup"], "|", color=colour, markersize=8)
            ax.plot(
                row["ssim"],
                row["speedup"],
                {"fragment": "o", "peer": "s", "full": "*"}[kind],
                color=colour,
                label=None,
            )
            ax.annotate(row["method"], (row["ssim"], row["speedup"]), fontsize=7)
        ax.set_xlabel("SSIM vs full model: marker = mean, whisker end = worst seed")
        ax.set_ylabel("speed-up vs full model")
        ax.set_title(f"{size_label(result)} (blue: fragments, red: peers)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
