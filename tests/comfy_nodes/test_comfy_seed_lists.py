"""Seed lists as ComfyUI users write them (fragjobs.comfy_nodes.seed_lists)."""

from __future__ import annotations

import pytest

from fragjobs.comfy_nodes.seed_lists import parse_seed_list, seed_list_error
from fragjobs.errors import InvalidInputError


@pytest.mark.parametrize(
    ("text", "seeds"),
    [
        ("1,2,3", [1, 2, 3]),
        ("0-7", [0, 1, 2, 3, 4, 5, 6, 7]),
        (" 0-3, 10 ,20 - 22 ", [0, 1, 2, 3, 10, 20, 21, 22]),
        ("42", [42]),
        ("5-5", [5]),
        ("9,3,7", [9, 3, 7]),
        (str(2**63 - 1), [2**63 - 1]),
    ],
)
def test_seeds_and_ranges_in_the_order_written(text, seeds):
    assert parse_seed_list(text, max_seeds=100) == seeds
    assert seed_list_error(text) is True


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "seed_list is empty"),
        ("   ", "seed_list is empty"),
        ("1,,2", "item '' is not a seed"),
        ("a", "item 'a' is not a seed"),
        ("1.5", "item '1.5' is not a seed"),
        ("-3", "item '-3' is not a seed"),
        ("1-2-3", "item '1-2-3' is not a seed"),
        ("7-3", "range '7-3' runs backwards"),
        ("1,2,1", "seed 1 appears twice"),
        ("0-3,2", "seed 2 appears twice"),
        ("0-100", "more than 10 seeds"),
        (str(2**63), "seed must be between 0 and"),
    ],
)
def test_malformed_lists_say_what_is_wrong(text, match):
    with pytest.raises(InvalidInputError, match=match):
        parse_seed_list(text, max_seeds=10)


def test_a_huge_range_is_refused_before_it_is_expanded():
    with pytest.raises(InvalidInputError, match="more than 10000 seeds"):
        parse_seed_list(f"0-{2**62}", max_seeds=10_000)


def test_validation_reports_the_reason_and_waits_for_linked_inputs():
    assert seed_list_error(None) is True  # a linked input is not known before the run
    assert "runs backwards" in seed_list_error("3-1")
