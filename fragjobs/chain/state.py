"""What one process keeps between chain calls, in one place with an explicit reset.

A process (the embedded CLI, a test, a farm worker's pool process) keeps four things warm:
the workspaces it opened (catalog connections), the base pipelines it loaded, the node's
warm caches in front of an S3 store, and the fragment UNets it built for generation. They
live on one :class:`ProcessState`, :data:`STATE`; :func:`reset_process_state` forgets all of
them, which a worker's pool process does right after fork (no database connection is shared
across processes) and a test does to start cold.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

WARM_BASES = 2
"""How many base pipelines a process keeps loaded (least recently used go)."""

WARM_FRAGMENT_UNETS = 2
"""How many fragment UNets a process keeps built for generation (least recently used go)."""


@dataclass
class ProcessState:
    """The process's warm objects, each keyed by what makes it valid.

    * ``workspaces``: (database URL, store URL) → ``Workspace``;
    * ``bases``: (model, device) → ``LoadedBase``, most recently used last;
    * ``warm_caches``: (cache folder, size cap) → ``WarmCache``;
    * ``fragment_unets``: (key, manifest sha256, file sha256, base sha256, device) →
      (manifest, UNet), most recently used last.
    """

    workspaces: dict[tuple, Any] = field(default_factory=dict)
    bases: OrderedDict[tuple, Any] = field(default_factory=OrderedDict)
    warm_caches: dict[tuple, Any] = field(default_factory=dict)
    fragment_unets: OrderedDict[tuple, tuple[Any, Any]] = field(default_factory=OrderedDict)

    def reset(self) -> None:
        """Forget everything (nothing is closed: after fork the parent still owns it)."""
        self.workspaces.clear()
        self.bases.clear()
        self.warm_caches.clear()
        self.fragment_unets.clear()

    def warm_fragment_keys(self) -> list[str]:
        """Keys of the fragments held warm, most recently used first."""
        return list(dict.fromkeys(key[0] for key in reversed(self.fragment_unets)))


STATE = ProcessState()
"""This process's state."""


def reset_process_state() -> None:
    """Forget every warm object of this process (:meth:`ProcessState.reset`)."""
    STATE.reset()


def warm_fragment_keys() -> list[str]:
    """Keys of the fragments this process holds warm, newest first."""
    return STATE.warm_fragment_keys()
