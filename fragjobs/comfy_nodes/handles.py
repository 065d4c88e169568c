"""What travels between the fragjobs nodes: names, keys and hashes, never pipelines.

ComfyUI passes a node's outputs to the next node as Python objects of a named type. The
fragjobs types carry only what the chain's functions take (a model name, a profile id, a
fragment key) and what a user reads off them; the pipelines stay warm in the process
(:func:`fragjobs.chain.base`, :func:`fragjobs.chain.warm_fragment_unet`), as they do for the
CLI and the farm's workers.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_TYPE = "FRAGJOBS_MODEL"
"""ComfyUI type of :class:`FragjobsModel` (a base, or a base with a fragment loaded)."""
PROFILE_TYPE = "FRAGJOBS_PROFILE"
"""ComfyUI type of :class:`ProfilingData`."""
FRAGMENT_TYPE = "FRAGJOBS_FRAGMENT"
"""ComfyUI type of :class:`FragmentMetadata`."""


@dataclass(frozen=True)
class FragjobsModel:
    """A base model, optionally with a fragment to generate with.

    Attributes:
        model: what :func:`fragjobs.load_base` takes (built-in name or diffusers folder).
        name, sha256: the base's identity (``BaseModelInfo``).
        fragment_key: the fragment to generate with; None: the full model.
        fragment_steps, fragment_guidance: the generation settings the fragment was profiled
            with (and so only runs at).
        fallback_reason: why a requested fragment is not used (the full model is), or None.
    """

    model: str
    name: str
    sha256: str
    fragment_key: str | None = None
    fragment_steps: int | None = None
    fragment_guidance: float | None = None
    fallback_reason: str | None = None


@dataclass(frozen=True)
class ProfilingData:
    """A stored profile of ``prompt`` on ``model``; ``profile_id``: None if profiling was off."""

    profile_id: str | None
    model: str
    prompt: str
    reused: bool = False


@dataclass(frozen=True)
class FragmentMetadata:
    """An extracted fragment and its gate verdict, as :class:`FragmentExtractor` made it.

    Attributes:
        key: the fragment's key in the library.
        model: the base it was made on (what :func:`fragjobs.load_base` takes).
        prompt: the prompt it was profiled on.
        passed: whether it passed the quality gate (then its status is ``ready``).
        status: its catalog status (``ready``, ``failed_gate``, ...).
        ssim: mean SSIM against the full model on the validation seeds.
        heads_kept, heads_total: attention heads kept by head pruning.
        caching: whether a block-caching schedule is in use.
        speedup: measured latency of the full model over the fragment's, or None.
        attempts: fragments extracted by the gate ladder to get this one.
    """

    key: str
    model: str
    prompt: str
    passed: bool
    status: str
    ssim: float | None
    heads_kept: int
    heads_total: int
    caching: bool
    speedup: float | None
    attempts: int

    def summary(self) -> str:
        """One line for a person: key, verdict, heads, caching, speed-up."""
        verdict = "passed the gate" if self.passed else f"FAILED the gate ({self.status})"
        ssim = f", SSIM {self.ssim:.3f}" if self.ssim is not None else ""
        speed = f", speed-up {self.speedup:.2f}x" if self.speedup is not None else ""
        tries = f", {self.attempts} attempts" if self.attempts > 1 else ""
        return (
            f"{self.key}: {verdict}{ssim}; {self.heads_kept}/{self.heads_total} heads kept, "
            f"block caching {'on' if self.caching else 'off'}{speed}{tries}"
        )
