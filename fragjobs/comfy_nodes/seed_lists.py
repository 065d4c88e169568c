"""Seed lists as ComfyUI users write them: ``"1,2,3"``, ``"0-7"``, ``"0-3, 10, 20-22"``."""

from __future__ import annotations

import re

from fragjobs.config import get_settings
from fragjobs.errors import FragjobsError, InvalidInputError
from fragjobs.keys import check_seeds

_ITEM = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?$")


def parse_seed_list(text: str, *, max_seeds: int) -> list[int]:
    """The seeds of ``text``: integers and inclusive ranges separated by commas.

    Spaces around items are ignored; seeds keep the order written and must be distinct.

    Example::

        parse_seed_list("0-3, 10", max_seeds=100)   # [0, 1, 2, 3, 10]

    Raises:
        InvalidInputError: an empty list, an item that is neither ``N`` nor ``A-B`` with
            ``A <= B``, a repeated seed, or more than ``max_seeds`` seeds.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError('seed_list is empty: write seeds like "1,2,3" or a range "0-7"')
    seeds: list[int] = []
    for item in text.split(","):
        match = _ITEM.match(item.strip())
        if match is None:
            raise InvalidInputError(
                f"seed_list item {item.strip()!r} is not a seed (0, 1, ...) or a range "
                f'(0-7); write seeds like "1,2,3" or "0-7"'
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise InvalidInputError(
                f"seed_list range {item.strip()!r} runs backwards: write the smaller seed first"
            )
        if len(seeds) + (last - first + 1) > max_seeds:
            raise InvalidInputError(
                f"seed_list {text.strip()!r} has more than {max_seeds} seeds "
                "(FRAGJOBS_MAX_VARIANTS)"
            )
        seeds.extend(range(first, last + 1))
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise InvalidInputError(f"seed {seed} appears twice in seed_list {text.strip()!r}")
        seen.add(seed)
    return check_seeds(seeds)


def seed_list_error(text: str | None) -> bool | str:
    """For a node's ``VALIDATE_INPUTS``: True if ``text`` is a valid seed list (or is not known
    before the run, being linked), else what is wrong with it."""
    if text is None:
        return True
    try:
        parse_seed_list(text, max_seeds=get_settings().max_variants)
    except FragjobsError as exc:
        return str(exc)
    return True
