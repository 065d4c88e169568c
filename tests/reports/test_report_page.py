"""A run's index.html as a person sees it: opened in headless Chromium (Debian's ``chromium``,
installed by .ci/run), screenshotted, its tables, plots and images rendered, no broken link."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fragjobs import chain
from fragjobs.reports import plots

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A real run on tiny-sd (few steps, one seed each), written by the report builder."""
    from fragjobs.config import Settings

    root = tmp_path_factory.mktemp("page")
    ws = chain.Workspace.open(Settings(data_dir=root / "data"))
    try:
        report = chain.run(
            "a red circle on the left",
            model="tiny-sd",
            variants=2,
            steps=2,
            profile_seeds=[0],
            validation_seeds=[1000],
            out_dir=root / "reports",
            ws=ws,
            progress=False,
            measure_memory=False,
            model_level=False,  # the page of a prompt's own chain: every file and table
        )
    finally:
        ws.close()
    return report.out_dir


def test_every_link_and_image_of_the_page_resolves(run_folder: Path) -> None:
    html = (run_folder / "index.html").read_text()
    targets = re.findall(r'(?:src|href)="([^"]+)"', html)
    images = [t for t in targets if t.startswith("data:image/png;base64,")]
    assert len(images) == 2 + 1 + 2  # two plots, compare.png, two variants
    # both variants are the full model's images the chain made anyway, and say so
    assert "seed 0 · full model (profiling)" in html
    assert "seed 1000 · full model (validation)" in html
    for uri in images:
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
            image.verify()
    links = [t for t in targets if not t.startswith("data:")]
    assert "metrics_summary.json" in links and "profiling_raw.parquet" in links
    for link in links:
        assert not re.match(r"^[a-z]+:", link), f"{link}: the page links only its own folder"
        assert (run_folder / link).is_file(), f"broken link {link}"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_chromium_renders_the_tables_plots_and_images(run_folder: Path, tmp_path: Path) -> None:
    url = (run_folder / "index.html").resolve().as_uri()
    dom = _chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for table in ("gate", "hypotheses", "fragment", "attempts"):
        assert f'id="{table}"' in dom.stdout, table
    assert dom.stdout.count("<tr>") >= 3 + 5  # header + checks, and H1-H5
    shot = tmp_path / "page.png"
    done = _chromium("--window-size=1200,5000", f"--screenshot={shot}", url)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (5000, 1200)

    def rows_with(colour: str, tolerance: int = 12) -> np.ndarray:
        close = (np.abs(pixels - _rgb(colour)) <= tolerance).all(axis=-1)
        return np.nonzero(close.sum(axis=1) >= 20)[0]

    # the latency plot's bars, drawn by the browser from the embedded PNG (their height
    # depends on the timings: a slow repeat's error bar can squash them)
    full_rows, fragment_rows = rows_with(plots.FULL_COLOUR), rows_with(plots.FRAGMENT_COLOUR)
    assert len(full_rows) >= 8 and len(fragment_rows) >= 8
    # the status badges of the tables (CSS), above the plots
    assert len(rows_with("#d8f0dc", 2)) > 5 or len(rows_with("#fbd5d5", 2)) > 5
    # the variants and compare.png: tiny-sd's noise-like images, many distinct colours
    lower = pixels[max(full_rows) :].reshape(-1, 3)
    assert len(np.unique(lower[::7], axis=0)) > 2000


def test_fragments_show_prints_a_summary_the_catalog_row_and_json(
    run_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from click.testing import CliRunner

    from fragjobs.cli import main
    from fragjobs.config import get_settings

    monkeypatch.setenv("FRAGJOBS_DATA_DIR", str(run_folder.parents[1] / "data"))
    for var in ("FRAGJOBS_DATABASE_URL", "FRAGJOBS_STORAGE_URL"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    try:
        summary = json.loads((run_folder / "metrics_summary.json").read_text())
        key = summary["fragment"]["key"]
        done = CliRunner().invoke(main, ["fragments", "show", key])
        assert done.exit_code == 0, done.output
        lines = done.output.splitlines()
        assert lines[0].startswith(f"{key}  ready") or lines[0].startswith(f"{key}  failed_gate")
        assert any(line.strip().startswith("gate ") and "SSIM" in line for line in lines[:8])
        assert f"stored at  {summary['fragment']['stored_at']}" in done.output
        assert "catalog row:" in done.output and "  hit_count" in done.output
        whole = json.loads(CliRunner().invoke(main, ["fragments", "show", key, "--json"]).output)
        assert set(whole) == {"catalog", "lineage", "manifest"}
        assert whole["manifest"]["pruning"]["head_retention_ratio"] is not None
    finally:
        get_settings.cache_clear()


def test_a_farm_runs_report_reads_what_the_workers_stored(run_folder: Path) -> None:
    """run --farm builds its folder from the catalog and the store (no timings: UNAVAILABLE)."""
    import json

    from fragjobs.config import Settings
    from fragjobs.reports.builder import write_run_report
    from fragjobs.reports.farm_run import NOT_MEASURED_ON_FARM, farm_run_data
    from fragjobs.reports.folders import read_report
    from fragjobs.validation import load_thresholds

    summary = json.loads((run_folder / "metrics_summary.json").read_text())
    thresholds = load_thresholds()
    ws = chain.Workspace.open(Settings(data_dir=run_folder.parents[1] / "data"))
    try:
        data = farm_run_data(
            ws.catalog,
            ws.store,
            prompt=summary["prompt"],
            fragment_key=summary["fragment"]["key"],
            job_ids=[summary["fragment"]["job_id"]],
            fallback_reasons=[],
            errors=[],
            knobs=summary["knobs"],
            thresholds=thresholds,
        )
        folder = write_run_report(run_folder.parent, data, thresholds)
    finally:
        ws.close()
    report = read_report(folder)
    assert report.valid and report.base_model_hash == summary["base_model_hash"]
    farm = report.summary
    assert farm["quality"]["ssim"] == summary["quality"]["ssim"]  # the validation's figures
    for name in ("H2", "H4", "H5"):
        assert farm["hypotheses"][name]["status"] == "UNAVAILABLE"
        assert NOT_MEASURED_ON_FARM in farm["hypotheses"][name]["reason"]
    delivered = summary["delivery"]["seeds"]  # the run's: profiling, validation, then fragment
    assert len(delivered) == 2
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(
        f"{seed}.png" for seed in delivered
    )
    assert (folder / "profiling_raw.parquet").is_file() and not (folder / "compare.png").exists()
    assert any("compare.png not written" in note for note in farm["notes"])
    diff = json.loads((folder / "regression_diff.json").read_text())
    assert diff["baseline"]["run_id"] == run_folder.name  # the embedded run before it
