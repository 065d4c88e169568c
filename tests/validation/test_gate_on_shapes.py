"""The gate end to end on the shipped shapes model: the ladder still ends with a ready fragment,
judged on its worst seed, colour included."""

from __future__ import annotations

from fragjobs import chain
from fragjobs.validation import load_thresholds

PROMPT = "a blue square at the top"
VALIDATION_SEEDS = [1000, 1001]


def test_the_ladder_on_shapes_ends_with_a_ready_fragment_gated_on_its_worst_seed(ws) -> None:
    thresholds = load_thresholds()
    prof = chain.profile(PROMPT, model="shapes", seeds=[0, 1], steps=8, ws=ws, progress=False)
    ext, val, attempts = chain.extract_and_validate(
        prof.profile_id,
        chain.extraction_config(caching=False),
        seeds=VALIDATION_SEEDS,
        ws=ws,
        model="shapes",
        progress=False,
    )
    assert val.passed
    assert ws.catalog.get_fragment(ext.key).status == "ready"
    ssim, colour = val.gate.checks[:2]
    assert (ssim.name, colour.name) == ("ssim", "colour_delta_e")
    assert ssim.seed in VALIDATION_SEEDS and colour.seed in VALIDATION_SEEDS
    assert ssim.value == min(val.metrics.ssim_per_image) >= thresholds.ssim_min
    assert colour.value == max(val.metrics.colour_delta_e_per_image)
    assert colour.value <= thresholds.colour_delta_e_max
    last = attempts[-1]
    assert last["ssim_worst"] == ssim.value and last["colour_delta_e_worst"] == colour.value
    for failed in attempts[:-1]:  # each rung the gate refused says why, naming a seed
        assert not failed["passed"] and "on seed" in failed["gate_reason"]
