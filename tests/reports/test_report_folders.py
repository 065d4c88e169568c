"""Report folders, the regression gate and ``fragjobs report``, on synthetic runs (no model).

Each run here is written by the same builder as ``fragjobs run`` (:func:`write_run_report`)
from a summary made by :func:`build_metrics_summary`: only the measurements are made up.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fragjobs.cli import main
from fragjobs.errors import InvalidInputError
from fragjobs.keys import FRAGMENT_FILE
from fragjobs.manifest import (
    ArtifactFile,
    ArtifactsLayer,
    BaseModelLayer,
    CompressionLayer,
    FragmentManifest,
    PerformanceLayer,
    ProfilingLayer,
    PruningLayer,
    QualityLayer,
)
from fragjobs.reports import build_metrics_summary
from fragjobs.reports.builder import RunData, write_run_report
from fragjobs.reports.folders import (
    find_baseline,
    list_reports,
    new_report_folder,
    read_report,
    resolve_report,
    run_sort_key,
)
from fragjobs.reports.regression import evaluate_regression
from fragjobs.validation import QualityMetrics, evaluate_gate, load_thresholds

THRESHOLDS = load_thresholds(Path(__file__).parents[2] / "fragjobs" / "thresholds.yaml")
PROMPT = "a red circle on the left"
BASE_SHA = "a" * 64


def manifest(base_sha: str = BASE_SHA, heads_kept: int = 60) -> FragmentManifest:
    return FragmentManifest(
        key="shapes_0123456789abcdef_01234567",
        base_model=BaseModelLayer(name="shapes", sha256=base_sha, source="builtin:shapes"),
        profiling=ProfilingLayer(
            profile_id="p1",
            prompt=PROMPT,
            prompt_sha256="b" * 64,
            seeds=[0, 1],
            steps=4,
            step_stride=2,
            sampled_steps=[0, 2],
            guidance_scale=7.5,
            height=64,
            width=64,
            num_heads=80,
            rank_stability=0.9,
        ),
        pruning=PruningLayer(
            threshold=0.75,
            min_heads_per_layer=1,
            rank_margin=0.25,
            heads_total=80,
            heads_kept=heads_kept,
            keep={},
            reasons={},
            params_before=10,
            params_after=8,
        ),
        compression=CompressionLayer(
            low_rank=None, int8=None, weight_bytes_base=1000, weight_bytes_fragment=400
        ),
        quality=QualityLayer(
            seeds=[1000, 1001],
            metrics={"clip_delta": 0.01, "lpips": None},
            gate={"passed": True},
            thresholds={},
        ),
        performance=PerformanceLayer(
            device="cpu",
            steps=4,
            batch_size=2,
            measured_latency_full_ms=20.0,
            measured_latency_fragment_ms=10.0,
            measured_speedup=2.0,
            memory_kind="rss",
            measured_peak_full_bytes=2 * 2**20,
            measured_peak_fragment_bytes=2**20,
        ),
        artifacts=ArtifactsLayer(files={FRAGMENT_FILE: ArtifactFile(sha256="c" * 64, size=9)}),
    )


def quality(ssim: float = 0.95, clip_delta: float | None = 0.01) -> QualityMetrics:
    return QualityMetrics(
        ssim=ssim,
        ssim_per_image=[ssim, ssim - 0.02],
        psnr_db=30.0,
        psnr_per_image=[30.0, 30.0],
        lpips=None,
        lpips_reason="no LPIPS weights",
        clip_full=0.31,
        clip_fragment=None if clip_delta is None else 0.31 - clip_delta,
        clip_delta=clip_delta,
        clip_reason=None if clip_delta is not None else "no CLIP model",
        num_images=2,
        height=64,
        width=64,
        colour_delta_e=1.5,
        colour_delta_e_per_image=[1.0, 2.0],
    )


def write_run(
    root: Path,
    *,
    ssim: float = 0.95,
    speedup: float = 2.0,
    clip_delta: float | None = 0.01,
    base_sha: str = BASE_SHA,
    prompt: str = PROMPT,
    with_manifest: bool = True,
    when: datetime | None = None,
    spread: float = 1.05,
) -> Path:
    metrics = quality(ssim, clip_delta)
    summary = build_metrics_summary(
        quality=metrics,
        gate=evaluate_gate(metrics, THRESHOLDS),
        thresholds=THRESHOLDS,
        performance={
            "latency_full_ms": 10.0 * speedup,
            "latency_fragment_ms": 10.0,
            "latency_full_ms_range": [9.8 * speedup, 10.2 * speedup],
            "latency_fragment_ms_range": [10.0, 10.0 * spread],
            "overhead_s": 3.0,
            "profile_s": 1.0,
            "extract_s": 1.0,
            "validate_s": 1.0,
            "batch_size": 2,
            "steps": 4,
        },
        memory={
            "full_bytes": 1000,
            "fragment_bytes": 400,
            "peak_full_bytes": 2000,
            "peak_fragment_bytes": 1500,
            "peak_kind": "cpu_peak_rss_fresh_process",
        },
        reuse=None,
        model="shapes",
        prompt=prompt,
        device="cpu (test)",
    )
    summary["fragment"] = {
        "key": "shapes_0123456789abcdef_01234567",
        "verified": True,
        "used_for_generation": True,
        "fallback_reason": None,
        "stored_at": "file:///store/fragments/shapes/k",
        "attempts": [
            {
                "key": "shapes_0123456789abcdef_01234567",
                "ssim": ssim,
                "ssim_worst": ssim - 0.02,
                "colour_delta_e_worst": 2.0,
                "clip_delta": clip_delta,
                "speedup": speedup,
                "passed": True,
                "heads_kept": 60,
                "heads_total": 80,
                "caching_min_ssim": None,
            }
        ],
    }
    data = RunData(
        summary=summary,
        manifest=manifest(base_sha) if with_manifest else None,
        compare_reason="synthetic run",
    )
    return write_run_report(root, data, THRESHOLDS, now=when)


# --- folders -------------------------------------------------------------------------------


def test_report_folders_are_timestamped_and_never_shared(tmp_path: Path) -> None:
    when = datetime(2025, 3, 4, 5, 6)
    names = [new_report_folder(tmp_path, when).name for _ in range(3)]
    assert names == ["2025-03-04_0506", "2025-03-04_0506-2", "2025-03-04_0506-3"]
    assert run_sort_key("2025-03-04_0506-10") > run_sort_key("2025-03-04_0506-2")


def test_a_run_folder_has_every_file_and_the_seed_names(tmp_path: Path) -> None:
    folder = write_run(tmp_path)
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {
        "metrics_summary.json",
        "fragment_manifest.json",
        "regression_diff.json",
        "plots/latency.png",
        "plots/quality_tradeoff.png",
        "index.html",
    } <= names
    summary = json.loads((folder / "metrics_summary.json").read_text())
    assert summary["report"]["status"] == "VALID" and summary["run_id"] == folder.name
    assert summary["base_model_hash"] == BASE_SHA and summary["fragment_hash"] == "c" * 64
    h = summary["hypotheses"]
    assert h["H1"]["values"]["pruned_head_pct"] == 25.0
    assert h["H2"]["values"]["vram_reduction_pct"] == 25.0 and h["H2"]["values"]["lpips"] is None
    assert h["H4"]["values"]["batch_speedup"] == h["H4"]["values"]["speedup"] == 2.0
    assert h["H3"]["values"]["reuse_pass_rate"] is None
    assert summary["quality"]["clip_mean_full"] == 0.31
    assert summary["memory"]["peak_full_mb"] == round(2000 / 2**20, 1)
    assert any("compare.png not written: synthetic run" in n for n in summary["notes"])
    doc = json.loads((folder / "fragment_manifest.json").read_text())
    assert doc["pruning"]["head_retention_ratio"] == 0.75 and doc["pruning"]["removed"] == 20
    assert doc["pruning"]["heads_kept"] == 60  # ours stay beside the seed's
    assert doc["quality"]["clip_delta_mean"] == 0.01 and doc["quality"]["samples"] == 2
    assert doc["performance"]["peak_vram_full_mb"] == 2.0
    assert doc["performance"]["latency_fragment_ms"] == 10.0
    assert doc["reuse"]["similarity_metric"] == "cosine_clip_text"
    assert doc["artifacts"]["hashes"]["fragment_state_sha256"] == "c" * 64
    read_back = FragmentManifest.from_bytes(json.dumps(doc).encode())  # seed names dropped
    assert read_back == manifest().model_copy(update={"created_at": doc["created_at"]})
    diff = json.loads((folder / "regression_diff.json").read_text())
    assert diff["status"] == "NO_BASELINE" and "no earlier VALID run" in diff["baseline_reason"]


def test_profiling_raw_parquet_holds_the_raw_statistics(tmp_path: Path) -> None:
    import torch

    from fragjobs.profiling import ProfileConfig, PromptProfile
    from fragjobs.reports.profiling_raw import write_profiling_raw

    profile = PromptProfile(
        prompt=PROMPT,
        config=ProfileConfig(seeds=(0, 1), steps=4),
        head_kind={"attn1": "self", "attn2": "cross"},
        energy={"attn1": torch.tensor([[1.0, 3.0], [2.0, 2.0]]), "attn2": torch.ones(2, 4)},
        entropy={"attn2": torch.full((2, 4), 0.5)},
        prompt_mass={"attn2": torch.full((2, 4), 0.25)},
        block_change={"down_blocks.0": torch.tensor([[0.3, 0.2, 0.1], [0.4, 0.2, 0.1]])},
        layer_time_ms={"down_blocks.0": 1.5},
    )
    table = pq.read_table(write_profiling_raw(profile, tmp_path / "raw.parquet", profile_id="p"))
    rows = table.to_pylist()
    assert len(rows) == 2 * 2 + 2 * 4 * 3 + 2 * 3 + 1
    assert {
        "statistic": "energy",
        "module": "attn1",
        "kind": "self",
        "head": 1,
        "step": None,
        "seed": 1,
        "value": 2.0,
    } in rows
    assert {
        "statistic": "block_change",
        "module": "down_blocks.0",
        "kind": "block",
        "head": None,
        "step": 3,
        "seed": 0,
        "value": pytest.approx(0.1),
    } in rows
    assert json.loads(table.schema.metadata[b"fragjobs.sampled_steps"]) == [0, 2]


def test_invalid_runs_are_never_baselines_nor_best(tmp_path: Path) -> None:
    good = write_run(tmp_path, when=datetime(2025, 1, 1, 10, 0))
    broken = write_run(
        tmp_path, with_manifest=False, ssim=0.99, speedup=9.0, when=datetime(2025, 1, 1, 11, 0)
    )
    latest = write_run(tmp_path, when=datetime(2025, 1, 1, 12, 0))
    report = read_report(broken)
    assert report.status == "INVALID" and "base model's hash is missing" in report.problems[0]
    assert json.loads((broken / "metrics_summary.json").read_text())["report"]["status"] == (
        "INVALID"
    )
    baseline, _ = find_baseline(tmp_path, read_report(latest))
    assert baseline.run_id == good.name  # the INVALID run in between is skipped
    assert resolve_report(tmp_path, "best").run_id in (good.name, latest.name)
    assert resolve_report(tmp_path, "latest").run_id == latest.name
    diff = json.loads((latest / "regression_diff.json").read_text())
    assert diff["baseline"]["run_id"] == good.name and diff["status"] == "PASS"


def test_missing_or_malformed_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no report folder"):
        read_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="metrics_summary.json is missing"):
        read_report(tmp_path / "empty")
    (tmp_path / "empty" / "metrics_summary.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        read_report(tmp_path / "empty")
    with pytest.raises(InvalidInputError, match="no report 'x'"):
        resolve_report(tmp_path, "x")
    with pytest.raises(InvalidInputError, match="no valid run"):
        resolve_report(tmp_path, "best")


# --- the regression gate -------------------------------------------------------------------


def _compare(root: Path, **now: Any) -> dict[str, Any]:
    base = write_run(root, when=datetime(2025, 1, 1, 10, 0))
    current = write_run(root, when=datetime(2025, 1, 1, 11, 0), **now)
    return evaluate_regression(read_report(current), read_report(base), THRESHOLDS)


def test_no_regression_within_tolerance(tmp_path: Path) -> None:
    diff = _compare(tmp_path, ssim=0.94, speedup=1.5)  # -0.01 SSIM, -25 % speed-up: allowed
    assert diff["status"] == "PASS" and diff["passed"] and diff["regressions"] == []
    ssim = next(c for c in diff["checks"] if c["metric"] == "ssim")
    assert ssim["worse_by"] == pytest.approx(0.01) and ssim["status"] == "PASS"
    assert diff["not_run"] == ["lpips: current run: no LPIPS weights"]  # null in both runs


def test_worse_quality_and_speed_are_regressions_with_the_amount(tmp_path: Path) -> None:
    diff = _compare(tmp_path, ssim=0.89, speedup=1.2)
    assert diff["status"] == "REGRESSION"
    assert set(diff["regressions"]) == {"ssim", "ssim_worst", "speedup"}
    ssim = next(c for c in diff["checks"] if c["metric"] == "ssim")
    assert ssim["worse_by"] == pytest.approx(0.06) and "worse by 0.06" in ssim["reason"]
    speed = next(c for c in diff["checks"] if c["metric"] == "speedup")
    assert speed["relative"] and speed["worse_by"] == pytest.approx(0.8)  # 2.0 -> 1.2 > 30 %
    assert diff["baseline"]["run_id"].startswith("2025-01-01_1000")


def test_timings_a_loaded_machine_made_up_are_not_compared(tmp_path: Path) -> None:
    diff = _compare(tmp_path, speedup=0.5, spread=3.0)  # slowest repeat 3x the fastest
    speed = next(c for c in diff["checks"] if c["metric"] == "speedup")
    assert speed["status"] == "UNAVAILABLE" and "current run x3.00" in speed["reason"]
    assert diff["passed"] and any(
        n.startswith("speedup: timings too noisy") for n in diff["not_run"]
    )


def test_better_is_never_a_regression_and_direction_is_per_metric(tmp_path: Path) -> None:
    diff = _compare(tmp_path, ssim=0.99, speedup=4.0, clip_delta=0.0)
    assert diff["passed"]
    clip = next(c for c in diff["checks"] if c["metric"] == "clip_delta")
    assert clip["better"] == "lower" and clip["worse_by"] == pytest.approx(-0.01)


def test_a_required_metric_missing_now_fails(tmp_path: Path) -> None:
    base = read_report(write_run(tmp_path, when=datetime(2025, 1, 1, 10, 0)))
    now = read_report(write_run(tmp_path, clip_delta=None, when=datetime(2025, 1, 1, 11, 0)))
    assert evaluate_regression(now, base, THRESHOLDS)["passed"]  # not required: not run
    strict = THRESHOLDS.model_copy(update={"required_metrics": ("ssim", "clip_delta")})
    diff = evaluate_regression(now, base, strict)
    assert diff["regressions"] == ["clip_delta"]


def test_another_base_model_or_prompt_cannot_be_compared(tmp_path: Path) -> None:
    base = read_report(write_run(tmp_path, base_sha="d" * 64, when=datetime(2025, 1, 1, 10, 0)))
    now = read_report(write_run(tmp_path, when=datetime(2025, 1, 1, 11, 0)))
    with pytest.raises(InvalidInputError, match="another base model"):
        evaluate_regression(now, base, THRESHOLDS)
    other = read_report(write_run(tmp_path, prompt="a blue square"))
    with pytest.raises(InvalidInputError, match="another prompt"):
        evaluate_regression(other, now, THRESHOLDS)


# --- fragjobs report -----------------------------------------------------------------------


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_report_compare_exit_codes(tmp_path: Path) -> None:
    root = str(tmp_path)
    base = write_run(tmp_path, when=datetime(2025, 1, 1, 10, 0))
    good = write_run(tmp_path, ssim=0.95, when=datetime(2025, 1, 1, 11, 0))
    gate = str(Path(__file__).parents[2] / "fragjobs" / "thresholds.yaml")
    done = invoke("report", "--reports", root, "--compare", good.name, "--gate", gate)
    assert done.exit_code == 0, done.output
    assert f"{good.name} vs baseline {base.name}: no regression" in done.output
    worse = write_run(tmp_path, ssim=0.80, when=datetime(2025, 1, 1, 12, 0))
    done = invoke(
        "report", "--reports", root, "--compare", "latest", "--baseline", base.name, "--gate", gate
    )
    assert done.exit_code == 1
    assert "REGRESSION in gate_passed, ssim, ssim_worst" in done.output
    assert "ssim 0.8 vs baseline 0.95: worse by 0.15" in done.output
    diff = json.loads((worse / "regression_diff.json").read_text())
    assert diff["status"] == "REGRESSION" and diff["baseline"]["run_id"] == base.name
    done = invoke("report", "--reports", root, "--compare", base.name, "--gate", gate)
    assert done.exit_code == 2 and "no baseline" in done.output  # nothing earlier


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ("ssim_min: 0.9\n", "missing key"),
        ("{THRESHOLDS}\nssim_minimum: 0.9\n", "unknown key 'ssim_minimum'"),
        ("{THRESHOLDS}\nrequired_metrics: 3\n", "required_metrics"),
        (None, "cannot read"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, thresholds: str | None, message: str
) -> None:
    root = tmp_path / "reports"
    base = write_run(root, when=datetime(2025, 1, 1, 10, 0))
    now = write_run(root, when=datetime(2025, 1, 1, 11, 0))
    packaged = (Path(__file__).parents[2] / "fragjobs" / "thresholds.yaml").read_text()
    gate = tmp_path / "t.yaml"
    if thresholds is not None:
        gate.write_text(thresholds.replace("{THRESHOLDS}", packaged))
    before = (now / "regression_diff.json").read_bytes()
    done = CliRunner().invoke(
        main, ["report", "--reports", str(root), "--compare", now.name, "--gate", str(gate)]
    )
    assert done.exit_code == 2
    (line,) = done.output.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert (now / "regression_diff.json").read_bytes() == before
    assert base.is_dir()


def test_bad_report_folders_and_other_base_models_exit_2(tmp_path: Path) -> None:
    root = str(tmp_path)
    other = write_run(tmp_path, base_sha="d" * 64, when=datetime(2025, 1, 1, 10, 0))
    now = write_run(tmp_path, when=datetime(2025, 1, 1, 11, 0))
    before = (now / "regression_diff.json").read_bytes()
    for args in (
        ["--compare", now.name, "--baseline", other.name],
        ["--compare", "2020-01-01_0000"],
        ["--compare", str(tmp_path / "missing")],
    ):
        done = CliRunner().invoke(main, ["report", "--reports", root, *args])
        assert done.exit_code == 2, done.output
        assert len(done.output.strip().splitlines()) == 1 and "error: " in done.output
    assert (now / "regression_diff.json").read_bytes() == before
    done = CliRunner().invoke(main, ["report", "--reports", root, "show", "nope"])
    assert done.exit_code == 2


def test_report_ls_show_and_html(tmp_path: Path) -> None:
    first = write_run(tmp_path, when=datetime(2025, 1, 1, 10, 0))
    write_run(tmp_path, with_manifest=False, when=datetime(2025, 1, 1, 11, 0))
    done = invoke("report", "ls", "--reports", str(tmp_path))
    lines = done.output.strip().splitlines()
    assert lines[1].split()[:2] == [first.name, "VALID"] and "INVALID" in lines[2]
    done = invoke("report", "show", "latest", "--reports", str(tmp_path))
    assert "INVALID" in done.output and "H4  batch speed-up" in done.output
    done = invoke("report", "show", first.name, "--reports", str(tmp_path))
    assert "speedup=2" in done.output and "could not run: lpips" in done.output
    done = invoke("report", "--reports", str(tmp_path), "html")  # given to the group: the same
    assert done.exit_code == 0
    page = (tmp_path / "index.html").read_text()
    assert f'href="{first.name}/index.html"' in page and "data:image/png;base64," in page
    assert (tmp_path / "trends.png").is_file()
    assert len(list_reports(tmp_path)) == 2


def test_the_results_page_is_the_index_page_with_the_ablation(tmp_path: Path) -> None:
    from fragjobs.bench.results import ablation_section
    from fragjobs.reports.html import write_index_page

    run = write_run(tmp_path / "results")
    results = {
        "ablation": [
            {
                "prompt": PROMPT,
                "heads_kept": "58/80",
                "own": 0.91,
                "other": 0.8,
                "model_level": 0.85,
                "random": 0.7,
            }
        ]
    }
    page = write_index_page(
        tmp_path / "results",
        title="fragjobs results on shapes",
        sections=[ablation_section(results)],
        out=tmp_path / "results.html",
    )
    html = page.read_text()
    assert f'href="results/{run.name}/index.html"' in html and (tmp_path / "trends.png").is_file()
    assert "Does a prompt&#39;s own profile make the better fragment?" in html
    assert "<td>0.91</td>" in html and "58/80" in html
