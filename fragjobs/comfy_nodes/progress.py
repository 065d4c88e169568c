"""ComfyUI's progress bar and interrupt button for one node's run.

Inside ComfyUI a :class:`NodeProgress` drives ``comfy.utils.ProgressBar`` (the bar on the
node) and asks ``comfy.model_management`` whether the user pressed *Cancel*; outside ComfyUI
(a script, a test) both are no-ops, so the package imports and runs without ComfyUI.

The unit of progress is one denoising step: :meth:`NodeProgress.per_unet_call` hooks the
UNets a pipeline call runs, so the bar moves and a cancel is honoured at every step, not only
between images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_RUNNING: list[NodeProgress] = []
"""The node runs whose UNet hooks are live, innermost last (ComfyUI runs one node at a time)."""


def _comfy_modules() -> tuple[Any, Any]:
    """(``comfy.model_management``, ``comfy.utils``), or (None, None) outside ComfyUI."""
    try:
        import comfy.model_management
        import comfy.utils
    except ImportError:
        return None, None
    return comfy.model_management, comfy.utils


class NodeProgress:
    """Progress (``done`` of ``total`` steps) and interrupt checks of one node run.

    Example::

        progress = NodeProgress(total=steps)
        with progress.per_unet_call(fragjobs.families.denoiser(pipe)):
            pipe(prompt, num_inference_steps=steps)
        progress.finish()
    """

    def __init__(self, total: int) -> None:
        self.total = max(int(total), 1)
        self.done = 0
        self._management, utils = _comfy_modules()
        self._bar = utils.ProgressBar(self.total) if utils is not None else None

    def update(self, done: int) -> None:
        """Set the progress to ``done`` steps (clamped to ``total``)."""
        self.done = min(max(int(done), 0), self.total)
        if self._bar is not None:
            self._bar.update_absolute(self.done, self.total)

    def advance(self, steps: int = 1) -> None:
        """Move the progress on by ``steps``."""
        self.update(self.done + steps)

    def finish(self) -> None:
        """Show the run as complete (work that was reused from the library took no steps)."""
        self.update(self.total)

    def check_interrupt(self) -> None:
        """Raise ComfyUI's ``InterruptProcessingException`` if the user cancelled the run."""
        if self._management is not None:
            self._management.throw_exception_if_processing_interrupted()

    @contextlib.contextmanager
    def per_unet_call(self, *unets: Any) -> Iterator[NodeProgress]:
        """Within the block, every forward call of ``unets`` checks for a cancel, then counts.

        The hooks are removed on the way out, whatever happens. A cancel raises out of the
        pipeline call; the chain's steps clean up after such an exception (a profile or a
        generation job that did not finish is not left half-written or marked done).
        Never hook a UNet that is deep-copied inside the block: the copy would keep the hook
        (harmless outside a node's run, since the hook then finds no run, but untidy).
        """
        handles = []
        _RUNNING.append(self)
        try:
            for unet in {id(u): u for u in unets if u is not None}.values():
                handles.append(unet.register_forward_pre_hook(_on_unet_call))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            _RUNNING.remove(self)


def _on_unet_call(_module: Any, _args: Any) -> None:
    # A module-level function, not a closure: a deep copy of a hooked UNet shares it, and it
    # acts only while a node's run is live.
    if _RUNNING:
        run = _RUNNING[-1]
        run.check_interrupt()
        run.advance()
