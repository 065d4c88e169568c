"""The break-even arithmetic on known numbers, both definitions side by side."""

from __future__ import annotations

import math

import pytest

from fragjobs.errors import InvalidInputError
from fragjobs.validation.break_even import (
    break_even_delivered,
    break_even_old,
    saving_per_image,
)


def test_old_definition_counts_all_overhead() -> None:
    # 0.5 s full, 0.25 s fragment: 0.25 s saved per image; 10 s of overhead pays back in 40.
    assert break_even_old(10.0, 0.5, 0.25) == pytest.approx(40.0)


def test_delivered_definition_credits_each_full_image_at_the_full_models_time() -> None:
    # 8 delivered full-model images would have cost 4 s anyway: 6 s beyond them / 0.25 = 24.
    assert break_even_delivered(10.0, 8, 0.5, 0.25) == pytest.approx(24.0)
    # with nothing delivered the two definitions agree
    assert break_even_delivered(10.0, 0, 0.5, 0.25) == pytest.approx(break_even_old(10, 0.5, 0.25))


def test_delivered_is_zero_when_the_chain_cost_no_more_than_its_images() -> None:
    assert break_even_delivered(3.0, 8, 0.5, 0.25) == 0.0
    assert break_even_delivered(4.0, 8, 0.5, 0.25) == 0.0


def test_delivered_solves_equal_total_time() -> None:
    chain, delivered, full, fragment = 7.3, 5, 0.61, 0.23
    k = break_even_delivered(chain, delivered, full, fragment)
    assert k is not None
    assert chain + k * fragment == pytest.approx((delivered + k) * full)


@pytest.mark.parametrize("fragment", [0.5, 0.75])
def test_no_saving_never_pays_back(fragment: float) -> None:
    assert saving_per_image(0.5, fragment) is None
    assert break_even_old(10.0, 0.5, fragment) is None
    assert break_even_delivered(10.0, 8, 0.5, fragment) is None


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: break_even_old(-1.0, 0.5, 0.25), "overhead_s"),
        (lambda: break_even_old(math.nan, 0.5, 0.25), "overhead_s"),
        (lambda: break_even_old(1.0, 0.0, 0.25), "full_s_per_image"),
        (lambda: break_even_old(1.0, 0.5, math.inf), "fragment_s_per_image"),
        (lambda: break_even_delivered(-0.1, 2, 0.5, 0.25), "chain_s"),
        (lambda: break_even_delivered(1.0, -1, 0.5, 0.25), "delivered_full"),
        (lambda: break_even_delivered(1.0, 2.0, 0.5, 0.25), "delivered_full"),
        (lambda: break_even_delivered(1.0, True, 0.5, 0.25), "delivered_full"),
    ],
)
def test_bad_input_is_refused(call, name: str) -> None:
    with pytest.raises(InvalidInputError, match=name):
        call()
