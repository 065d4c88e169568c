"""Generation within a memory budget, and down a ladder of fallbacks on out-of-memory.

The batch size is chosen to fit the budget (:mod:`fragjobs.generation.budget`): from the
estimated per-sample cost first, then from the one measured on the first batch, never above
the batch size asked for. When a batch runs out of memory, or when even one image is
estimated over budget before anything runs, the job steps down one rung at a time:

1. halve the batch (down to 1), and never go back above it in this job;
2. attention slicing and VAE tiling;
3. model CPU offload (accelerate; only from an accelerator device);
4. the full model on the CPU (a pipeline the caller provides).

The failed batch is run again, so no image is lost; each seed has its own generator, so a
seed's image is the one it would have been without the ladder (up to the float rounding of
batched and sliced kernels), except from the full-model rung on, which runs another model.
Every step, and every rung passed over with its reason, is recorded in :attr:`metrics`.
Whatever a rung changed on the pipeline (attention processors, VAE tiling, offload hooks) is
undone when the run ends: the pipelines are shared with later jobs.

Example::

    images, metrics = generate_within_budget(pipe, prompt, seeds, config, budget_mb=None)
"""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from fragjobs.generation.budget import (
    MemoryBudget,
    PeakMemory,
    check_budget_mb,
    choose_batch_size,
    device_weight_bytes,
    estimate_per_sample_bytes,
    largest_component_bytes,
)
from fragjobs.generation.generate import GenerationConfig, generate_images
from fragjobs.keys import check_seeds, normalise_prompt

HALVE_BATCH = "halve_batch"
SLICING_TILING = "attention_slicing_vae_tiling"
MODEL_CPU_OFFLOAD = "model_cpu_offload"
FULL_MODEL_ON_CPU = "full_model_on_cpu"
GIVE_UP = "give_up"
RUNGS = (SLICING_TILING, MODEL_CPU_OFFLOAD, FULL_MODEL_ON_CPU)

_OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "defaultcpuallocator",
    "mps backend out of memory",
)

BatchCallback = Callable[[list[int], torch.Tensor], None]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``torch.OutOfMemoryError`` (CUDA), a
    ``MemoryError``, or a ``RuntimeError`` saying so (CPU allocator, MPS)."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def release_cached_memory(device: torch.device) -> None:
    """Give the failed batch's memory back before the next try."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


class BudgetedGeneration:
    """One job's images under a memory budget, stepping down the ladder on out-of-memory.

    One object per job: the rungs it took stay taken until :meth:`run` returns.

    Args:
        pipe: the pipeline to generate with (fragment or full model).
        config: sampling settings; ``config.batch_size`` is the ceiling of the batch size.
        budget_mb: ``FRAGJOBS_MEMORY_BUDGET_MB`` (None: 80 % of the device's free memory).
        cpu_fallback: returns the full model on the CPU, called only when that rung is
            reached; None leaves the rung out.

    Raises:
        ConfigError: ``budget_mb`` is not a positive number (before anything runs).
    """

    def __init__(
        self,
        pipe: Any,
        config: GenerationConfig,
        budget_mb: float | None,
        *,
        cpu_fallback: Callable[[], Any] | None = None,
    ):
        self.budget_mb = check_budget_mb(budget_mb)
        self.pipe = pipe
        self.config = config
        self.cpu_fallback = cpu_fallback
        self.metrics: dict[str, Any] = {}
        self._budget: MemoryBudget | None = None
        self._resident = 0
        self._per_sample = 0
        self._ceiling = config.batch_size
        self._sliced = self._tiled = False
        self._rungs_left = list(RUNGS)
        self._undo: list[Callable[[], None]] = []

    def run(
        self, prompt: str, seeds: list[int], *, on_batch: BatchCallback | None = None
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] in the order of ``seeds``; ``on_batch(seeds, images)``
        is called after each batch (to store it before the next one can fail).

        Raises:
            torch.OutOfMemoryError: (or the allocator's error) on the last rung too; the
                metrics say what was tried.
        """
        normalise_prompt(prompt)
        seeds = check_seeds(seeds)
        try:
            return self._run(prompt, seeds, on_batch)
        finally:
            for undo in reversed(self._undo):
                undo()
            self._undo.clear()

    # -- the run ----------------------------------------------------------------------------

    def _run(self, prompt: str, seeds: list[int], on_batch: BatchCallback | None) -> torch.Tensor:
        self._use_pipe(self.pipe)
        estimate = self._per_sample
        self.metrics = {
            **self._budget.as_metrics(),
            "resident_bytes": self._resident,
            "per_sample_estimated_bytes": estimate,
            "per_sample_bytes": estimate,
            "per_sample_source": "estimated",
            "batch_size_requested": self._ceiling,
            "batch_size_chosen": None,
            "batch_size_used": None,
            "batch_sizes": [],
            "budget_steps": [],
            "oom_events": [],
            "attention_slicing": False,
            "vae_tiling": False,
            "model_cpu_offload": False,
            "full_model_on_cpu_from_seed": None,
            "over_budget": False,
        }
        batch = self._fit(self._ceiling)
        if batch == 0 and seeds:
            batch = self._descend_for_budget(seeds[0])
        self.metrics["batch_size_chosen"] = batch
        out: dict[int, torch.Tensor] = {}
        measured = False
        start = 0
        while start < len(seeds):
            chunk = seeds[start : start + batch]
            try:
                images, added = self._generate(prompt, chunk, measure=not measured)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                batch = self._step_down(exc, chunk)
                if batch == 0:
                    raise
                failed = True
            else:
                failed = False
            if failed:
                # Outside the except block: the traceback (and the failed batch's tensors)
                # are gone, so the memory can be given back.
                release_cached_memory(self._budget.device)
                continue
            out.update(zip(chunk, images, strict=True))
            self.metrics["batch_sizes"].append(len(chunk))
            self.metrics["batch_size_used"] = len(chunk)
            if on_batch is not None:
                on_batch(chunk, images)
            start += len(chunk)
            if not measured:
                measured = True
                if added > 0:
                    self._per_sample = -(-added // len(chunk))
                    self.metrics["per_sample_bytes"] = self._per_sample
                    self.metrics["per_sample_source"] = "measured"
                    batch = self._fit(self._ceiling)
                    if batch == 0:  # it ran, so it is not out of memory: one at a time
                        self.metrics["over_budget"] = True
                        batch = 1
        if not out:
            return torch.empty(0)
        return torch.stack([out[s] for s in seeds])

    def _generate(
        self, prompt: str, chunk: list[int], *, measure: bool
    ) -> tuple[torch.Tensor, int]:
        config = replace(self.config, batch_size=len(chunk))
        if not measure:
            return generate_images(self.pipe, prompt, chunk, config), 0
        with PeakMemory(self._budget.device) as peak:
            images = generate_images(self.pipe, prompt, chunk, config)
        return images, peak.added_bytes

    def _fit(self, ceiling: int) -> int:
        return choose_batch_size(self._budget, self._resident, self._per_sample, ceiling)

    def _use_pipe(self, pipe: Any) -> None:
        """Run on ``pipe`` from now on: its device's budget, weights and estimated cost."""
        self.pipe = pipe
        self._budget = MemoryBudget.for_pipe(pipe, self.budget_mb)
        self._resident = device_weight_bytes(pipe, self._budget.device)
        self._per_sample = self._estimate()

    def _estimate(self) -> int:
        return estimate_per_sample_bytes(
            self.pipe, self.config, sliced=self._sliced, tiled=self._tiled
        )

    # -- the ladder ---------------------------------------------------------------------------

    def _descend_for_budget(self, at_seed: int) -> int:
        """Even one image is estimated over budget: take the rungs that lower the estimate
        before running; run one at a time, over budget, when none is left."""
        while True:
            rung, skipped = self._next_rung(at_seed, on_estimate=True)
            need = self._resident + self._per_sample
            step: dict[str, Any] = {
                "at_seed": at_seed,
                "action": rung or "run_over_budget",
                "estimated_need_bytes": need,
                "budget_bytes": self._budget.budget_bytes,
            }
            if skipped:
                step["skipped"] = skipped
            self.metrics["budget_steps"].append(step)
            batch = self._fit(self._ceiling)
            if rung is None:
                self.metrics["over_budget"] = True
                return 1
            if batch > 0:
                return batch

    def _step_down(self, exc: BaseException, chunk: list[int]) -> int:
        """Record the out-of-memory error and take the next step; the new batch size, or 0
        when nothing is left to try."""
        event: dict[str, Any] = {
            "at_seed": chunk[0],
            "batch_size": len(chunk),
            "error": _one_line(exc),
        }
        self.metrics["oom_events"].append(event)
        if len(chunk) > 1:
            self._ceiling = len(chunk) // 2
            event["action"] = HALVE_BATCH
            event["batch_size_after"] = self._ceiling
            return self._ceiling
        rung, skipped = self._next_rung(chunk[0], on_estimate=False)
        event["action"] = rung or GIVE_UP
        if skipped:
            event["skipped"] = skipped
        return 0 if rung is None else 1

    def _next_rung(self, at_seed: int, *, on_estimate: bool) -> tuple[str | None, list[dict]]:
        """Take the next rung that can be taken; (its name or None, the rungs passed over)."""
        skipped = []
        while self._rungs_left:
            rung = self._rungs_left.pop(0)
            reason = self._take(rung, at_seed, on_estimate=on_estimate)
            if reason is None:
                return rung, skipped
            skipped.append({"action": rung, "reason": reason})
        return None, skipped

    def _take(self, rung: str, at_seed: int, *, on_estimate: bool) -> str | None:
        """Apply ``rung``; None, or why it cannot be applied."""
        if rung == SLICING_TILING:
            return self._slice_and_tile()
        if rung == MODEL_CPU_OFFLOAD:
            return self._offload()
        return self._full_model_on_cpu(at_seed, on_estimate=on_estimate)

    def _slice_and_tile(self) -> str | None:
        pipe = self.pipe
        saved = {
            name: module.attn_processors
            for name, module in pipe.components.items()
            if hasattr(module, "attn_processors") and hasattr(module, "set_attn_processor")
        }
        if not hasattr(pipe, "enable_attention_slicing"):
            return f"{type(pipe).__name__} has no attention slicing"
        pipe.enable_attention_slicing()

        def restore_processors() -> None:
            for name, processors in saved.items():
                pipe.components[name].set_attn_processor(processors)

        self._undo.append(restore_processors)
        self._sliced = True
        self.metrics["attention_slicing"] = True
        vae = getattr(pipe, "vae", None)
        if vae is not None and hasattr(vae, "enable_tiling"):
            was_tiling = getattr(vae, "use_tiling", False)
            vae.enable_tiling()
            if not was_tiling:
                self._undo.append(vae.disable_tiling)
            self._tiled = True
            self.metrics["vae_tiling"] = True
        self._per_sample = self._estimate()
        return None

    def _offload(self) -> str | None:
        device = self._budget.device
        if device.type == "cpu":
            return "the pipeline runs on the CPU: there is no device memory to offload from"
        if importlib.util.find_spec("accelerate") is None:
            return "model CPU offload needs accelerate (pip install accelerate)"
        pipe = self.pipe
        pipe.enable_model_cpu_offload(device=device)

        def undo() -> None:
            pipe.remove_all_hooks()
            pipe.to(device)

        self._undo.append(undo)
        self._resident = largest_component_bytes(pipe)
        self.metrics["model_cpu_offload"] = True
        return None

    def _full_model_on_cpu(self, at_seed: int, *, on_estimate: bool) -> str | None:
        if self.cpu_fallback is None:
            return "no full model on the CPU was given"
        if on_estimate and self._budget.device.type == "cpu":
            return "the pipeline already runs on the CPU; the full model would need more memory"
        fallback = self.cpu_fallback()
        if fallback is self.pipe:
            return "the job already runs the full model on the CPU"
        self._use_pipe(fallback)
        self.metrics["full_model_on_cpu_from_seed"] = at_seed
        self.metrics.update(
            {f"cpu_{k}": v for k, v in self._budget.as_metrics().items() if k != "device"}
        )
        return None


def generate_within_budget(
    pipe: Any,
    prompt: str,
    seeds: list[int],
    config: GenerationConfig,
    budget_mb: float | None = None,
    *,
    cpu_fallback: Callable[[], Any] | None = None,
    on_batch: BatchCallback | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """:class:`BudgetedGeneration` in one call: ``(images in seed order, metrics)``."""
    run = BudgetedGeneration(pipe, config, budget_mb, cpu_fallback=cpu_fallback)
    images = run.run(prompt, seeds, on_batch=on_batch)
    return images, run.metrics


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:limit]
