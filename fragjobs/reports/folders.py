"""Report folders: ``<reports root>/YYYY-MM-DD_HHMM[-n]/``, one per run.

A folder holds ``metrics_summary.json`` (whose ``report`` section says whether the run is
``VALID``), ``fragment_manifest.json``, ``head_importance.json``, ``profiling_raw.parquet``,
``regression_diff.json``, ``plots/``, ``images/``, ``compare.png`` and ``index.html``. The
root is ``<data dir>/reports`` unless a run is given another.

A run whose quality metrics are missing is ``INVALID``: it is listed, shown and can be
compared (exit 2), but it is never chosen as a baseline nor as ``best``. A folder without a
readable ``metrics_summary.json`` is not a report; naming one is refused with one line.
Reading never imports torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fragjobs.config import Settings, get_settings
from fragjobs.errors import InvalidInputError

SUMMARY_FILE = "metrics_summary.json"
MANIFEST_FILE = "fragment_manifest.json"
IMPORTANCE_FILE = "head_importance.json"
RAW_FILE = "profiling_raw.parquet"
DIFF_FILE = "regression_diff.json"
HTML_FILE = "index.html"
COMPARE_FILE = "compare.png"
LATENCY_PLOT = "plots/latency.png"
TRADEOFF_PLOT = "plots/quality_tradeoff.png"

RUN_ID = re.compile(r"^(?P<stamp>\d{4}-\d{2}-\d{2}_\d{4})(?:-(?P<n>\d+))?$")
VALID, INVALID = "VALID", "INVALID"


def default_reports_root(settings: Settings | None = None) -> Path:
    """``<data dir>/reports``: where runs write their report folders by default."""
    return (settings or get_settings()).data_dir / "reports"


def new_report_folder(root: Path, now: datetime | None = None) -> Path:
    """Create and return ``root/YYYY-MM-DD_HHMM`` (local time), or ``...-2``, ``-3``, ... when
    that minute's folder exists already (created atomically: two runs never share one)."""
    stamp = (now or datetime.now()).strftime("%Y-%m-%d_%H%M")
    root.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        folder = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            n += 1
            continue
        return folder


def run_sort_key(run_id: str) -> tuple[str, int]:
    """Chronological order of run ids (``..._1200`` < ``..._1200-2`` < ``..._1200-10``)."""
    match = RUN_ID.match(run_id)
    if match is None:
        return (run_id, 0)
    return (match["stamp"], int(match["n"] or 1))


@dataclass
class Report:
    """One report folder, read back.

    ``status`` is ``VALID`` or ``INVALID``; ``problems`` say why a run is INVALID (or what of
    it is missing); ``summary`` is ``metrics_summary.json``.
    """

    path: Path
    summary: dict[str, Any]
    status: str
    problems: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def model(self) -> str | None:
        return self.summary.get("model")

    @property
    def base_model_hash(self) -> str | None:
        return self.summary.get("base_model_hash")

    @property
    def prompt(self) -> str | None:
        return self.summary.get("prompt")

    @property
    def gate_passed(self) -> bool | None:
        return (self.summary.get("gate") or {}).get("passed")

    @property
    def valid(self) -> bool:
        return self.status == VALID

    def hypothesis(self, name: str) -> dict[str, Any]:
        return (self.summary.get("hypotheses") or {}).get(name) or {}

    def manifest(self) -> dict[str, Any] | None:
        """``fragment_manifest.json``, or None when it is missing or unreadable."""
        try:
            return json.loads((self.path / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return None


def invalid_reasons(summary: dict[str, Any]) -> list[str]:
    """Why a run's summary cannot serve as a measurement (empty: it can)."""
    reasons = []
    quality = summary.get("quality")
    if not isinstance(quality, dict) or not _number(quality.get("ssim")):
        reasons.append("quality metrics are missing (no SSIM against the full model)")
    if not isinstance(summary.get("gate"), dict) or "passed" not in summary["gate"]:
        reasons.append("the quality gate's decision is missing")
    hypotheses = summary.get("hypotheses")
    if not isinstance(hypotheses, dict) or set(hypotheses) != {"H1", "H2", "H3", "H4", "H5"}:
        reasons.append("hypotheses H1-H5 are missing")
    if not summary.get("base_model_hash"):
        reasons.append("the base model's hash is missing")
    return reasons


def read_report(path: Path | str) -> Report:
    """Read a report folder.

    Raises:
        InvalidInputError: ``path`` is not a folder, or has no readable
            ``metrics_summary.json`` (a JSON object).
    """
    path = Path(path)
    if not path.is_dir():
        raise InvalidInputError(f"no report folder {path}")
    try:
        summary = json.loads((path / SUMMARY_FILE).read_text())
    except OSError:
        raise InvalidInputError(
            f"{path} is not a report folder: {SUMMARY_FILE} is missing"
        ) from None
    except ValueError as exc:
        raise InvalidInputError(f"{path / SUMMARY_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(summary, dict):
        raise InvalidInputError(f"{path / SUMMARY_FILE} must be a JSON object")
    recorded = summary.get("report") if isinstance(summary.get("report"), dict) else {}
    problems = list(recorded.get("invalid_reasons") or [])
    problems += [r for r in invalid_reasons(summary) if r not in problems]
    if not (path / MANIFEST_FILE).is_file():
        problems.append(f"{MANIFEST_FILE} is missing")
    status = INVALID if problems or recorded.get("status") == INVALID else VALID
    return Report(path, summary, status, problems)


def list_reports(root: Path) -> list[Report]:
    """Every report folder under ``root``, oldest first; malformed ones are left out."""
    if not root.is_dir():
        return []
    reports = []
    for path in sorted(root.iterdir(), key=lambda p: run_sort_key(p.name)):
        if path.is_dir() and RUN_ID.match(path.name):
            try:
                reports.append(read_report(path))
            except InvalidInputError:
                continue
    return reports


def resolve_report(root: Path, ref: str) -> Report:
    """The report ``ref`` names: ``latest``, ``best``, a run id under ``root`` or a folder.

    ``latest``: the newest report (valid or not). ``best``: among VALID runs whose gate
    passed, the highest measured speed-up (ties: higher SSIM).

    Raises:
        InvalidInputError: nothing matches; the message says what exists.
    """
    if ref in ("latest", "best"):
        reports = list_reports(root)
        if ref == "best":
            reports = [r for r in reports if r.valid and r.gate_passed]
            reports.sort(key=lambda r: (_speedup(r), _ssim(r)))
        if not reports:
            what = "no report" if ref == "latest" else "no valid run that passed its gate"
            raise InvalidInputError(f"{ref}: {what} under {root}")
        return reports[-1]
    candidate = Path(ref)
    if RUN_ID.match(ref) and (root / ref).is_dir():
        candidate = root / ref
    elif not candidate.is_dir():
        raise InvalidInputError(
            f"no report {ref!r} under {root} (give latest, best, a run id or a report folder)"
        )
    return read_report(candidate)


def find_baseline(root: Path, current: Report) -> tuple[Report | None, str | None]:
    """The newest VALID report before ``current`` of the same base model and prompt.

    Returns:
        ``(report, None)``, or ``(None, reason)`` when there is none.
    """
    key = run_sort_key(current.run_id)
    earlier = [
        r
        for r in list_reports(root)
        if r.valid
        and r.path.resolve() != current.path.resolve()
        and run_sort_key(r.run_id) < key
        and r.base_model_hash == current.base_model_hash
        and r.prompt == current.prompt
    ]
    if not earlier:
        return None, (f"no earlier VALID run of {current.model} on {current.prompt!r} under {root}")
    return earlier[-1], None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _speedup(report: Report) -> float:
    value = report.hypothesis("H4").get("values", {}).get("speedup")
    return value if _number(value) else float("-inf")


def _ssim(report: Report) -> float:
    value = (report.summary.get("quality") or {}).get("ssim")
    return value if _number(value) else float("-inf")
