"""HTML pages of reports (Jinja2): one run's ``index.html``, and the index over all runs.

A run's page is self-contained: its plots, comparison image and variants are embedded as
``data:`` URIs, so it can be mailed or attached to a CI job; the only links are relative ones
to the JSON and Parquet files beside it. The index page embeds its trend plot and links each
run's page relatively.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from fragjobs.reports.folders import (
    COMPARE_FILE,
    DIFF_FILE,
    HTML_FILE,
    IMPORTANCE_FILE,
    LATENCY_PLOT,
    MANIFEST_FILE,
    RAW_FILE,
    SUMMARY_FILE,
    TRADEOFF_PLOT,
    Report,
    list_reports,
    read_report,
)

INDEX_FILE = "index.html"
TREND_PLOT = "trends.png"


def _environment() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("fragjobs.reports", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["fmt"] = format_value
    env.globals["css"] = files("fragjobs.reports").joinpath("templates/base.css").read_text()
    return env


def format_value(value: Any) -> str:
    """A number as a person reads it (4 significant digits); ``None`` as ``—``."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def data_uri(path: Path) -> str | None:
    """``path`` (a PNG) as a ``data:`` URI, or None when it does not exist."""
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_run_page(folder: Path) -> Path:
    """Write ``folder/index.html`` from the files in the report folder; return its path.

    Raises:
        InvalidInputError: ``folder`` is not a report folder.
    """
    report = read_report(folder)
    summary = report.summary
    try:
        diff = json.loads((folder / DIFF_FILE).read_text())
    except (OSError, ValueError):
        diff = {
            "status": "NOT_COMPARED",
            "baseline": None,
            "checks": [],
            "baseline_reason": f"{DIFF_FILE} is missing",
        }
    fragment = summary.get("fragment") or {}
    plots = [
        {"src": uri, "alt": alt}
        for uri, alt in (
            (data_uri(folder / LATENCY_PLOT), "latency: full vs fragment, and overhead"),
            (data_uri(folder / TRADEOFF_PLOT), "quality vs speed-up of every fragment tried"),
        )
        if uri is not None
    ]
    delivery = summary.get("delivery") or {}
    images = sorted(
        (
            {"seed": int(p.stem), "src": data_uri(p), "made_by": _made_by(delivery, int(p.stem))}
            for p in (folder / "images").glob("*.png")
            if p.stem.isdigit()
        ),
        key=lambda i: _delivery_order(delivery, i["seed"]),
    )
    listed = [SUMMARY_FILE, MANIFEST_FILE, IMPORTANCE_FILE, RAW_FILE, DIFF_FILE]
    html = (
        _environment()
        .get_template("run.html.j2")
        .render(
            run_id=report.run_id,
            status=report.status,
            problems=report.problems,
            summary=summary,
            gate=summary.get("gate") or {"passed": False, "checks": [], "not_run": []},
            hypotheses=sorted((summary.get("hypotheses") or {}).items()),
            diff=diff,
            plots=plots,
            compare=data_uri(folder / COMPARE_FILE),
            compare_reason=(summary.get("report") or {}).get("compare_reason") or "not available",
            images=images,
            delivery={
                "full_model_seeds": delivery.get("full_model_seeds") or [],
                "from_profiling": delivery.get("from_profiling") or [],
                "from_validation": delivery.get("from_validation") or [],
            },
            fragment={
                "key": fragment.get("key"),
                "verified": fragment.get("verified"),
                "stored_at": fragment.get("stored_at"),
                "used_for_generation": fragment.get("used_for_generation"),
                "fallback_reason": fragment.get("fallback_reason"),
            },
            manifest=report.manifest(),
            attempts=fragment.get("attempts") or [],
            files=[name for name in listed if (folder / name).is_file()],
        )
    )
    path = folder / HTML_FILE
    path.write_text(html, encoding="utf-8")
    return path


def _made_by(delivery: dict[str, Any], seed: int) -> str:
    """Which model made a variant, from the report's ``delivery`` ("" when not recorded)."""
    if seed in (delivery.get("from_profiling") or []):
        return "full model (profiling)"
    if seed in (delivery.get("from_validation") or []):
        return "full model (validation)"
    if seed in (delivery.get("full_model_seeds") or []):
        return "full model"
    return "fragment" if seed in (delivery.get("fragment_seeds") or []) else ""


def _delivery_order(delivery: dict[str, Any], seed: int) -> tuple[int, int]:
    """Variants in the order they were delivered, else by seed."""
    order = delivery.get("seeds") or []
    return (order.index(seed), seed) if seed in order else (len(order), seed)


def write_index_page(
    root: Path,
    *,
    reports: Sequence[Report] | None = None,
    title: str = "fragjobs reports",
    sections: Sequence[dict[str, Any]] = (),
    out: Path | None = None,
) -> Path:
    """Write the index over every report under ``root`` (``root/index.html``, or ``out``)
    with the trend plot (speed-up, SSIM, break-even per base model) beside it.

    ``sections``: extra tables, each ``{"title", "text", "columns", "rows"}``.
    """
    from fragjobs.reports.plots import trend_plot

    reports = list(reports) if reports is not None else list_reports(root)
    out = out or root / INDEX_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    trend_path = trend_plot(reports, out.parent / TREND_PLOT)
    rows = []
    for r in reversed(reports):
        page = r.path / HTML_FILE
        rows.append(
            {
                "run_id": r.run_id,
                "link": _relative(page, out.parent) if page.is_file() else None,
                "status": r.status,
                "model": r.model,
                "prompt": r.prompt,
                "gate": {True: "passed", False: "failed", None: "—"}[r.gate_passed],
                "ssim": (r.summary.get("quality") or {}).get("ssim"),
                "ssim_worst": r.hypothesis("H1").get("values", {}).get("ssim_worst"),
                "colour_worst": r.hypothesis("H1").get("values", {}).get("colour_delta_e_worst"),
                "speedup": r.hypothesis("H4").get("values", {}).get("speedup"),
                "break_even": r.hypothesis("H5").get("values", {}).get("break_even_variants"),
                "statuses": [
                    (k, (r.summary.get("hypotheses") or {}).get(k, {}).get("status", "—"))
                    for k in ("H1", "H2", "H3", "H4", "H5")
                ],
            }
        )
    html = (
        _environment()
        .get_template("index.html.j2")
        .render(
            title=title,
            root=str(root),
            runs=rows,
            trend=data_uri(trend_path),
            sections=list(sections),
        )
    )
    out.write_text(html, encoding="utf-8")
    return out


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
