"""In-place UNet edits shared by the techniques: layer patterns, swaps, the edit record.

A UNet edited in place carries the names of the irreversible edits applied to it, so that a
technique's ``remove_*`` refuses loudly (:func:`refuse_removal`) instead of leaving the UNet
silently changed, the way diffusers refuses to remove an irreversible hook.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from fragjobs.errors import InvalidInputError, IrreversibleChangeError

_EDITS_ATTR = "_fragjobs_edits"


def new_linear(in_features: int, out_features: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    """An uninitialised Linear on ``like``'s device and dtype (draws nothing from the RNG)."""
    layer = nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=like.dtype)
    return layer.to_empty(device=like.device)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def record_edit(module: nn.Module, edit: str) -> None:
    """Remember that ``edit`` (a technique's edit name) was applied to ``module`` in place."""
    edits = applied_edits(module)
    if edit not in edits:
        setattr(module, _EDITS_ATTR, (*edits, edit))


def applied_edits(module: nn.Module) -> tuple[str, ...]:
    """The edit names recorded on ``module``, in the order they were first applied."""
    return tuple(getattr(module, _EDITS_ATTR, ()))


def refuse_removal(module: nn.Module, edit: str, what: str) -> None:
    """Raise if ``edit`` was applied to ``module``; a no-op on a module without it.

    Args:
        what: what the edit destroyed, completing "<what> and cannot be undone".

    Raises:
        IrreversibleChangeError: the edit is recorded on ``module``.
    """
    if edit in applied_edits(module):
        raise IrreversibleChangeError(
            f"{what} and cannot be undone; reload the base model (fragjobs.load_base) to get "
            "the full UNet back"
        )


def check_patterns(patterns: object, what: str, hint: str) -> None:
    """Check a non-empty tuple of fnmatch patterns of layer names.

    Args:
        what: the field's name in messages; ``hint``: what to pass instead.

    Raises:
        InvalidInputError: ``patterns`` is empty, a bare string or holds a non-string.
    """
    if isinstance(patterns, str) or not isinstance(patterns, tuple | list) or not patterns:
        raise InvalidInputError(f"{what} must be a non-empty tuple of patterns; {hint}")
    if not all(isinstance(p, str) and p for p in patterns):
        raise InvalidInputError(f"{what} must hold non-empty strings, got {patterns!r}; {hint}")


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a qualified layer name matches any of the fnmatch ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
