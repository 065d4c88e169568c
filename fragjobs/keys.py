"""Identities and object names (DESIGN §3).

A fragment key is ``<base-name>_<sha256(normalised prompt)[:16]>_<sha256(params JSON)[:8]>``.
Keys and object names are validated before they reach a path or an object name, so that no
user-supplied string can escape the store (``/``, ``..``, upper case, spaces are rejected).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from fragjobs.errors import InvalidInputError, InvalidKeyError

KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}$")
_SEGMENT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
FRAGMENT_FILE = "fragment.safetensors"
MANIFEST_FILE = "manifest.json"
PROFILE_STATS_FILE = "stats.safetensors"
PROFILE_IMPORTANCE_FILE = "head_importance.json"


MAX_PROMPT_CHARS = 2000
"""Longest prompt taken. Text encoders read far less (CLIP: 77 tokens, about 300
characters); the chain warns when the model's tokenizer truncates a prompt."""


def normalise_prompt(prompt: str) -> str:
    """Lower-case, strip and collapse whitespace; raise on a prompt no model can take.

    Raises:
        InvalidInputError: not a string, empty, longer than :data:`MAX_PROMPT_CHARS`, or
            holding a NUL/control character or a lone surrogate (not valid UTF-8).
    """
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInputError(
            f"prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS} "
            "(text encoders read about 300 characters: 77 tokens)"
        )
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"prompt is not valid text (a lone surrogate at position {exc.start})"
        ) from None
    bad = next((c for c in prompt if ord(c) < 32 and c not in "\t\n\r"), None)
    if bad is not None:
        raise InvalidInputError(f"prompt holds the control character {bad!r}: remove it")
    normalised = " ".join(prompt.lower().split())
    if not normalised:
        raise InvalidInputError("prompt is empty: give a non-blank text prompt")
    return normalised


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_hex(data: bytes | str) -> str:
    """Hex sha256 of bytes (strings are UTF-8 encoded)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def prompt_hash(prompt: str) -> str:
    """sha256 of the normalised prompt."""
    return sha256_hex(normalise_prompt(prompt))


def params_hash(params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of extraction parameters."""
    return sha256_hex(canonical_json(params))


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid fragment/profile key, else raise InvalidKeyError."""
    if not isinstance(key, str) or not KEY_PATTERN.match(key) or ".." in key:
        raise InvalidKeyError(
            f"invalid key {key!r}: keys use only lower-case letters, digits, '.', '_' and '-' "
            "(no '/', no '..')"
        )
    return key


def base_name_slug(name: str) -> str:
    """A key-safe version of a base model name (``runwayml/stable-diffusion-v1-5`` → ...)."""
    # no "_" in the slug: it separates the slug from the hashes in a key
    slug = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.")
    return slug[:64] or "model"


def make_fragment_key(base_name: str, prompt: str, params: dict[str, Any]) -> str:
    """The fragment key of (base model, prompt, extraction params)."""
    key = f"{base_name_slug(base_name)}_{prompt_hash(prompt)[:16]}_{params_hash(params)[:8]}"
    return validate_key(key)


def validate_object_name(name: str) -> str:
    """Return ``name`` if it is a safe relative object name (``a/b/c.json``), else raise."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        raise InvalidKeyError(f"invalid object name {name!r}: must be a relative path")
    for segment in name.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT_PATTERN.match(segment):
            raise InvalidKeyError(
                f"invalid object name {name!r}: segment {segment!r} is not [A-Za-z0-9._-]"
            )
    return name


def fragment_object(base_name: str, key: str, filename: str) -> str:
    """``fragments/<base-name>/<key>/<filename>``."""
    return f"fragments/{base_name_slug(base_name)}/{validate_key(key)}/{filename}"


def profile_object(profile_id: str, filename: str) -> str:
    """``profiles/<profile-id>/<filename>``."""
    return f"profiles/{validate_key(profile_id)}/{filename}"


def generation_object(job_id: str, filename: str) -> str:
    """``generations/<job-id>/<filename>``."""
    return f"generations/{validate_key(job_id)}/{filename}"


def check_int(value: Any, what: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    """Return ``value`` as int if it is an integer (not bool) within range, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{what} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise InvalidInputError(f"{what} must be {bound}, got {value}")
    return value


def check_seeds(seeds: Any) -> list[int]:
    """Validate a list of seeds: non-empty, integers in [0, 2**63), no duplicates."""
    if not isinstance(seeds, list | tuple | range):
        raise InvalidInputError(f"seeds must be a list of integers, got {seeds!r}")
    out = [check_int(s, "seed", minimum=0, maximum=2**63 - 1) for s in seeds]
    if not out:
        raise InvalidInputError("seeds must not be empty")
    if len(set(out)) != len(out):
        raise InvalidInputError(f"seeds must be distinct, got {out}")
    return out


def check_fraction(value: Any, what: str) -> float:
    """Validate a threshold in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{what} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise InvalidInputError(f"{what} must be in (0, 1], got {value}")
    return float(value)
