"""The benchmark's honest output: repeat spread, dominance of peer points, the plot."""

from __future__ import annotations

import pytest

from fragjobs.bench.dominance import dominance, dominance_lines
from fragjobs.bench.speed_report import markdown_report, plot
from fragjobs.bench.timing import SPREAD_LIMIT, spread


def _row(method, latency, ssim, worst, **extra):
    return {
        "method": method,
        "latency_ms": latency,
        "speedup": round(100 / latency, 3),
        "ssim": ssim,
        "ssim_min": worst,
        **extra,
    }


FRAGMENTS = [
    _row("caching@0.98", 50.0, 0.98, 0.95, extract_s=1.0),
    _row("caching@0.95", 40.0, 0.96, 0.90, extract_s=1.0),
    _row("all", 30.0, 0.90, 0.50, extract_s=1.0),
]
PEERS = [
    _row("deepcache_3", 60.0, 0.97, 0.93),  # only caching@0.98 covers it: 60/50
    _row("deepcache_5", 35.0, 0.95, 0.85),  # both cachings cover it; the faster is slower
    _row("pab_2", 20.0, 0.99, 0.99),  # nothing covers it
    {"method": "fbc_0.05", "unavailable": "no transformer-block list"},
]


def test_dominance_picks_the_fastest_fragment_at_least_as_good_on_mean_and_worst():
    by_peer = {entry["peer"]: entry for entry in dominance(FRAGMENTS, PEERS)}
    assert list(by_peer) == ["deepcache_3", "deepcache_5", "pab_2"]  # unavailable: skipped
    assert by_peer["deepcache_3"] == {
        "peer": "deepcache_3",
        "fragment": "caching@0.98",
        "ratio": 1.2,
        "dominated": True,
    }
    # all (30 ms) is faster but its worst seed (0.50) is below the peer's (0.85)
    assert by_peer["deepcache_5"]["fragment"] == "caching@0.95"
    assert by_peer["deepcache_5"]["ratio"] == 0.875 and not by_peer["deepcache_5"]["dominated"]
    assert by_peer["pab_2"]["fragment"] is None and not by_peer["pab_2"]["dominated"]


def test_dominance_requires_the_worst_seed_too():
    # same mean as the peer, worse worst seed: not covering
    entry = dominance([_row("f", 10.0, 0.97, 0.80, extract_s=1)], [_row("p", 50.0, 0.97, 0.81)])
    assert entry[0]["fragment"] is None


def test_dominance_lines_say_which_fragment_and_the_ratio():
    lines = dominance_lines(FRAGMENTS, PEERS)
    assert len(lines) == 3
    assert lines[0].startswith("- deepcache_3 (1.67×, SSIM 0.970 / worst 0.930): dominated by")
    assert "caching@0.98" in lines[0] and "1.20× the peer's speed" in lines[0]
    assert "not dominated (slower)" in lines[1] and "0.88×" in lines[1]
    assert "not dominated: no fragment point has mean >= 0.990 and worst >= 0.990" in lines[2]


def test_spread_flags_a_wide_repeat_range():
    wide = spread([100.0, 110.0, 126.0])
    assert wide == {
        "latency_ms": 110.0,
        "latency_min_ms": 100.0,
        "latency_max_ms": 126.0,
        "spread_wide": True,
    }
    assert not spread([100.0, 125.0, 110.0])["spread_wide"]  # exactly the limit: not wide
    assert SPREAD_LIMIT == 1.25
    with pytest.raises(ValueError):
        spread([])


def test_report_shows_spread_unavailable_reason_and_dominance_and_the_plot_is_written(tmp_path):
    full = _row("full", 100.0, 1.0, 1.0, latency_min_ms=90.0, latency_max_ms=130.0)
    full["spread_wide"] = True
    result = {
        "model": "shapes",
        "size": 64,
        "steps": 20,
        "rows": [full, *FRAGMENTS, *PEERS],
    }
    text = markdown_report([result], "test machine")
    table_rows = [line for line in text.splitlines() if line.startswith("| shapes")]
    assert len(table_rows) == 1 + len(FRAGMENTS) + len(PEERS)
    assert "| full | 100.0 | 90.0 | 130.0 | WIDE |" in table_rows[0]
    assert "| fbc_0.05 | unavailable: no transformer-block list |" in table_rows[-1]
    assert "more than 1.25× the fastest" in text
    assert "- deepcache_3 (1.67×" in text and "Dominance on shapes" in text
    path = tmp_path / "bench.png"
    plot([result], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
