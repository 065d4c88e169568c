"""Checks of catalog inputs, run before any query so a bad value never reaches the database.

Each raises :class:`~fragjobs.errors.InvalidInputError` with a message that says what to pass.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from fragjobs.errors import InvalidInputError

_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def _check_sha256(value: Any, what: str) -> None:
    if not isinstance(value, str) or not _SHA256_PATTERN.match(value):
        raise InvalidInputError(f"{what} must be a lower-case hex sha256 (64 chars), got {value!r}")


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{what} must be a non-empty string, got {value!r}")


def _check_json_object(value: Any, what: str) -> None:
    """A dict that is strict JSON: PostgreSQL's json type refuses NaN and Infinity."""
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"{what} is not strict JSON ({exc}): only str/int/float/bool/None/list/dict, and "
            "no NaN or Infinity; record a value that cannot be computed as None"
        ) from exc


def _check_status(status: Any, allowed: tuple[str, ...], what: str) -> None:
    if status not in allowed:
        raise InvalidInputError(f"invalid {what} status {status!r}: use one of {list(allowed)}")


def _check_aware(value: Any, what: str) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInputError(f"{what} must be a timezone-aware datetime or None")


def _check_fields(given: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise InvalidInputError(f"cannot update {what} field(s) {unknown}: use {sorted(allowed)}")
