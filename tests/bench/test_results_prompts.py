"""The results page's other prompts (`fragjobs results --prompts-seed`) and the model-level
calibration prompts: both drawn from the shapes vocabulary, in the forms users write."""

import pytest

from fragjobs.bench.results import PROMPTS, fresh_prompts
from fragjobs.chain.model_level import CALIBRATION_PROMPTS, builtin_calibration_prompts


def test_fresh_prompts_are_new_distinct_and_the_same_for_a_seed():
    drawn = fresh_prompts(7, 40)
    assert drawn == fresh_prompts(7, 40)
    assert drawn != fresh_prompts(8, 40)
    assert len(set(drawn)) == 40
    assert not set(drawn) & (set(PROMPTS) | set(builtin_calibration_prompts()))
    with_background = [p for p in drawn if p.endswith(" background")]
    assert 0 < len(with_background) < len(drawn)  # both forms, like the page's own prompts
    assert len(fresh_prompts(3)) == len(PROMPTS)
    with pytest.raises(ValueError, match="n must be >= 1"):
        fresh_prompts(3, 0)


def test_calibration_prompts_mix_the_forms_users_write():
    prompts = builtin_calibration_prompts()
    assert prompts == builtin_calibration_prompts()
    assert len(set(prompts)) == CALIBRATION_PROMPTS
    backgrounds = [p.endswith(" background") for p in prompts]
    assert backgrounds.count(True) == backgrounds.count(False) == CALIBRATION_PROMPTS // 2
    sized = [any(w in p.split() for w in ("small", "large")) for p in prompts]
    assert 0 < sized.count(True) < CALIBRATION_PROMPTS
    assert not set(prompts) & set(PROMPTS)
