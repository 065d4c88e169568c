"""Which fragment point dominates each peer point of one benchmark run.

A fragment point *covers* a peer point when its mean SSIM is at least the peer's and its
worst-seed SSIM is at least the peer's worst; among those, the fastest is reported with its
speed ratio to the peer (peer latency ÷ fragment latency, both from the same interleaved run).
The peer is *dominated* when that ratio is >= 1 (issue 16 asks for >= 1.15).
"""

from __future__ import annotations

from typing import Any


def dominance(fragments: list[dict[str, Any]], peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per timed peer row: the fastest covering fragment row and its speed ratio.

    Args:
        fragments: rows with ``method``, ``latency_ms``, ``ssim`` and ``ssim_min``.
        peers: the same for the peers; rows without ``latency_ms`` (unavailable) are skipped.

    Returns:
        ``{"peer", "fragment" (None when no fragment covers it), "ratio" (None likewise),
        "dominated"}`` per peer, in the peers' order.
    """
    out = []
    for peer in peers:
        if "latency_ms" not in peer:
            continue
        covering = [
            row
            for row in fragments
            if "latency_ms" in row
            and row["ssim"] >= peer["ssim"]
            and row["ssim_min"] >= peer["ssim_min"]
        ]
        best = min(covering, key=lambda row: row["latency_ms"], default=None)
        ratio = None if best is None else round(peer["latency_ms"] / best["latency_ms"], 3)
        out.append(
            {
                "peer": peer["method"],
                "fragment": None if best is None else best["method"],
                "ratio": ratio,
                "dominated": ratio is not None and ratio >= 1.0,
            }
        )
    return out


def dominance_lines(fragments: list[dict[str, Any]], peers: list[dict[str, Any]]) -> list[str]:
    """The dominance of :func:`dominance` as markdown bullet lines, one per peer point."""
    by_name = {row["method"]: row for row in [*fragments, *peers]}
    lines = []
    for entry in dominance(fragments, peers):
        peer = by_name[entry["peer"]]
        head = f"- {peer['method']} ({_point(peer)}): "
        if entry["fragment"] is None:
            lines.append(
                head + f"not dominated: no fragment point has mean >= {peer['ssim']:.3f} "
                f"and worst >= {peer['ssim_min']:.3f}"
            )
            continue
        fragment = by_name[entry["fragment"]]
        verdict = "dominated" if entry["dominated"] else "not dominated (slower)"
        lines.append(
            head + f"{verdict} by {fragment['method']} ({_point(fragment)}), "
            f"{entry['ratio']:.2f}× the peer's speed"
        )
    return lines


def _point(row: dict[str, Any]) -> str:
    return f"{row['speedup']:.2f}×, SSIM {row['ssim']:.3f} / worst {row['ssim_min']:.3f}"
