"""The benchmark runs every method in one process and derives ratios from its own timings."""

from __future__ import annotations

from fragjobs.bench import bench_model, markdown_table


def test_bench_times_methods_interleaved_and_reports_break_even():
    result = bench_model(
        "tiny-sd",
        threshold=0.75,
        fidelity=0.9,
        steps=4,
        size=None,
        batch_size=2,
        repeats=2,
        prompt="a dog on a jet ski",
        methods=("int8", "caching@0.8", "tome_0.5"),
        profile_seeds=(0, 1),
        log=lambda _line: None,
    )
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["full", "int8", "caching@0.8", "tome_0.5"]
    assert rows["full"]["speedup"] == 1.0 and rows["full"]["ssim"] == 1.0
    assert rows["int8"]["bytes_ratio"] < 0.6  # int8 weights: fewer bytes held
    caching = rows["caching@0.8"]
    assert caching["fidelity"] == 0.8 and caching["validate_s"] > 0
    for row in (rows["int8"], caching):
        assert row["latency_ms"] > 0
        assert row["speedup"] == round(rows["full"]["latency_ms"] / row["latency_ms"], 3)
        saved = (rows["full"]["latency_ms"] - row["latency_ms"]) / 1000
        if saved > 0:
            overhead = result["profile_s"] + row["extract_s"] + row["validate_s"]
            assert (
                abs(row["break_even_variants"] - overhead / saved) < 0.1 + 0.01 * overhead / saved
            )
        else:
            assert row["break_even_variants"] is None
    # a peer that is not installed is a row saying so, not a missing row
    assert "latency_ms" in rows["tome_0.5"] or "pip install" in rows["tome_0.5"]["unavailable"]
    table = markdown_table([result])
    assert table.count("| tiny-sd 64px 4 steps |") == 4
