"""Package names imported on first use (PEP 562), so importing a package stays cheap.

A package lists ``{name: module}`` and sets ``__getattr__ = lazy_getattr(globals(), EXPORTS)``;
``package.name`` (or ``from package import name``) then imports ``module`` the first time and
keeps the value in the package's namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_getattr(namespace: dict[str, Any], exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` on first use."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
