"""What the commands share: one-line errors, seed lists, and the chain's knobs as options."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from fragjobs.errors import FragjobsError, InvalidInputError


def fail_cleanly(func: Callable) -> Callable:
    """Turn a :class:`~fragjobs.errors.FragjobsError` into ``error: <reason>`` and exit 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FragjobsError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def parse_seeds(text: str | None) -> list[int] | None:
    """``"0,1,2"`` → ``[0, 1, 2]``; None stays None."""
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise InvalidInputError(f"seeds must be comma-separated integers, got {text!r}") from exc


_KNOB_OPTIONS = [
    click.option("--model", default=None, help="Built-in name, diffusers folder or hub id."),
    click.option("--variants", default=None, type=int, help="Seed variants [8]."),
    click.option(
        "--threshold",
        default=None,
        type=float,
        help="Fraction of attention heads kept, in (0, 1] [FRAGJOBS_DEFAULT_THRESHOLD: 0.75].",
    ),
    click.option(
        "--low-rank/--no-low-rank",
        default=None,
        help="Factorise linear layers where it pays (default: off; no layer qualified on the "
        "built-ins).",
    ),
    click.option("--no-int8", is_flag=True, help="Keep weights in float."),
    click.option("--no-caching", is_flag=True, help="No block-caching schedule."),
    click.option(
        "--fidelity",
        default=None,
        type=float,
        help="SSIM vs the full model the fragment must keep on the profiling seeds, in (0, 1] "
        "(head pruning may spend half of the loss, block caching the rest) "
        "[FRAGJOBS_DEFAULT_FIDELITY: 0.9].",
    ),
    click.option(
        "--model-level/--per-prompt",
        default=None,
        help="Try the base's model-level fragment (extracted once per base, gated on this "
        "prompt) before extracting the prompt's own [FRAGJOBS_MODEL_LEVEL: on]; the farm "
        "always extracts the prompt's own.",
    ),
    click.option(
        "--paraphrase",
        "paraphrases",
        multiple=True,
        help="A paraphrase of PROMPT on which reuse is measured (H3); repeatable.",
    ),
]


def knob_options(func: Callable) -> Callable:
    """Add the chain's knobs as options (the same for ``run`` and ``farm run``)."""
    for option in reversed(_KNOB_OPTIONS):
        func = option(func)
    return func


KNOB_PARAMS = (
    "model",
    "variants",
    "threshold",
    "low_rank",
    "no_int8",
    "no_caching",
    "fidelity",
    "model_level",
    "paraphrases",
)


def knobs_from_options(options: dict[str, Any], **more: Any) -> Any:
    """The :class:`~fragjobs.chain.knobs.ChainKnobs` of :func:`knob_options`' values.

    Raises:
        InvalidInputError: a knob out of range (nothing was loaded or written).
    """
    from fragjobs.chain.knobs import ChainKnobs

    return ChainKnobs.from_settings(
        model=options["model"],
        variants=options["variants"],
        threshold=options["threshold"],
        fidelity=options["fidelity"],
        low_rank=options["low_rank"],
        int8=not options["no_int8"],
        caching=not options["no_caching"],
        model_level=options["model_level"],
        paraphrases=list(options["paraphrases"]),
        **more,
    )


def check_out_dir(path: Path) -> Path:
    """``path`` if it is a folder or can become one (checked before any work starts).

    Raises:
        InvalidInputError: it is a file, or a folder above it cannot be written.
    """
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"--out {path} exists and is not a folder")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise InvalidInputError(f"--out {path}: {existing} is not a folder")
    import os

    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInputError(f"--out {path}: cannot write into {existing}")
    return path
