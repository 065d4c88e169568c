"""The gate ladder's caching rung on the shipped shapes model: after a schedule fails its
gate, the next one recomputes at least what it did, with a longer warm-up, and its knobs
rebuild the same fragment."""

from __future__ import annotations

from fragjobs import chain
from fragjobs.chain.ladder import WARMUP_STEP, conservative_config
from fragjobs.chain.rebuild import extraction_config_of
from fragjobs.extraction import caching_schedule

PROMPT = "a green triangle on the right over a black background"


def test_the_caching_rung_after_a_failed_gate_computes_more_than_the_failed_schedule(ws):
    prof = chain.profile(PROMPT, model="shapes", seeds=[0, 1], steps=10, ws=ws, progress=False)
    config = chain.extraction_config(1.0, int8=False, fidelity=0.9)
    failed = chain.extract(prof.profile_id, config, ws=ws, model="shapes")
    schedule = caching_schedule(failed.manifest)
    assert schedule is not None, "the loose rung should keep a schedule on shapes"

    following = conservative_config(config, failed.manifest)
    assert following is not None
    caching = following.caching
    assert caching.min_ssim == 0.95  # half the SSIM loss
    assert caching.warmup == round(config.caching.warmup + WARMUP_STEP, 6)
    assert dict(caching.floor) == schedule.recompute

    stricter = chain.extract(prof.profile_id, following, ws=ws, model="shapes")
    assert stricter.key != failed.key
    routing = stricter.manifest.dynamic_routing
    assert routing.search, "the rung searched"
    assert routing.enabled, routing.reason
    for block, steps in schedule.recompute.items():
        assert set(steps) <= set(routing.schedule[block])
    assert routing.warmup_steps > schedule.warmup_steps
    assert routing.estimated_cost > schedule.estimated_cost
    row = ws.catalog.get_fragment(stricter.key)
    assert extraction_config_of(row) == following  # the floor is among the recorded knobs
