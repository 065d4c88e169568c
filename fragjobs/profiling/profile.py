"""Profile a pipeline on one prompt over several seeds (DESIGN §1 step 1).

Example::

    profile = profile_prompt(pipe, "a dog on a jet ski", ProfileConfig(seeds=(0, 1, 2, 3)))
    profile.head_scores()      # {attention module: tensor(heads)}
    profile.save(folder)       # stats.safetensors + head_importance.json
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fragjobs.errors import InvalidInputError, ManifestError
from fragjobs.families import denoiser, denoiser_blocks, family_of
from fragjobs.keys import (
    PROFILE_IMPORTANCE_FILE,
    PROFILE_STATS_FILE,
    check_int,
    check_seeds,
    normalise_prompt,
)
from fragjobs.profiling.processor import ProfilingAttnProcessor, RecordingState

SCHEMA = "fragjobs.head_importance/1"


@dataclass(frozen=True)
class ProfileConfig:
    """How to profile.

    Args:
        seeds: seeds generated while profiling (default 4).
        steps: inference steps per generation.
        step_stride: record head statistics every ``step_stride``-th step only (temporal
            down-sampling); block changes and timings are recorded at every step.
        guidance_scale: classifier-free guidance scale, as used for generation.
        height, width: image size; ``None`` → the base model's default.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 10
    step_stride: int = 2
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(check_seeds(list(self.seeds))))
        check_int(self.steps, "steps", minimum=1, maximum=1000)
        check_int(self.step_stride, "step_stride", minimum=1, maximum=1000)
        if not isinstance(self.guidance_scale, int | float) or self.guidance_scale < 0:
            raise InvalidInputError(f"guidance_scale must be >= 0, got {self.guidance_scale!r}")
        for side in (self.height, self.width):
            if side is not None:
                check_int(side, "image size", minimum=8, maximum=4096)

    def sampled_steps(self) -> list[int]:
        """The step indices at which head statistics are recorded."""
        return list(range(0, self.steps, self.step_stride))


@dataclass
class PromptProfile:
    """What profiling measured: per-head, per-block and per-layer statistics."""

    prompt: str
    config: ProfileConfig
    head_kind: dict[str, str]
    energy: dict[str, torch.Tensor]  # module → (seeds, heads)
    entropy: dict[str, torch.Tensor] = field(default_factory=dict)  # cross only
    prompt_mass: dict[str, torch.Tensor] = field(default_factory=dict)  # cross only
    block_change: dict[str, torch.Tensor] = field(default_factory=dict)  # block → (seeds, steps-1)
    layer_time_ms: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    # the full model's final latents for the profiling seeds (reference images for the
    # caching search, so the extraction need not regenerate them); None if not recorded
    final_latents: torch.Tensor | None = None

    def head_scores(self) -> dict[str, torch.Tensor]:
        """Importance per head: energy share within its module, averaged over seeds.

        A score of 1.0 means "as much as the average head of that module"; dividing by the
        module mean makes modules of different scale comparable under one global threshold.
        """
        return {name: _normalised(e).mean(0) for name, e in self.energy.items()}

    def rank_std(self) -> dict[str, torch.Tensor]:
        """Per head: std across seeds of its rank within the module, as a fraction of heads."""
        out = {}
        for name, energy in self.energy.items():
            ranks = energy.argsort(dim=1).argsort(dim=1).float() / max(energy.shape[1] - 1, 1)
            out[name] = ranks.std(0, unbiased=False)
        return out

    def rank_stability(self) -> float | None:
        """Mean pairwise Spearman correlation of all head scores between seeds.

        ``None`` when fewer than two seeds were profiled (stability cannot be measured).
        """
        if len(self.config.seeds) < 2:
            return None
        per_seed = torch.cat([_normalised(e) for e in self.energy.values()], dim=1)
        ranks = per_seed.argsort(dim=1).argsort(dim=1).float()
        ranks = ranks - ranks.mean(1, keepdim=True)
        ranks = ranks / ranks.norm(dim=1, keepdim=True).clamp_min(1e-12)
        corr = ranks @ ranks.T
        n = corr.shape[0]
        return float((corr.sum() - corr.diagonal().sum()) / (n * (n - 1)))

    def mean_block_change(self) -> dict[str, list[float]]:
        """Per block: relative output change at each step (mean over seeds)."""
        return {b: [round(float(v), 6) for v in c.mean(0)] for b, c in self.block_change.items()}

    def importance_document(self) -> dict[str, Any]:
        """The JSON document saved as ``head_importance.json``."""
        scores, rank_std = self.head_scores(), self.rank_std()
        modules = {}
        for name in sorted(self.energy):
            modules[name] = {
                "kind": self.head_kind[name],
                "heads": int(self.energy[name].shape[1]),
                "score": _rounded(scores[name]),
                "energy": _rounded(self.energy[name].mean(0)),
                "rank_std": _rounded(rank_std[name]),
                "entropy": _rounded(self.entropy[name].mean(0)) if name in self.entropy else None,
                "prompt_mass": (
                    _rounded(self.prompt_mass[name].mean(0)) if name in self.prompt_mass else None
                ),
            }
        stability = self.rank_stability()
        return {
            "schema": SCHEMA,
            "prompt": self.prompt,
            "config": {**asdict(self.config), "sampled_steps": self.config.sampled_steps()},
            "num_heads": sum(m["heads"] for m in modules.values()),
            "rank_stability": {
                "mean_spearman": None if stability is None else round(stability, 6),
                "reason": None if stability is not None else "needs at least two seeds",
            },
            "modules": modules,
            "block_change": self.mean_block_change(),
            "measured": {
                "layer_time_ms": {k: round(v, 4) for k, v in sorted(self.layer_time_ms.items())},
                "elapsed_s": round(self.elapsed_s, 3),
            },
        }

    def save(self, folder: Path) -> tuple[Path, Path]:
        """Write ``stats.safetensors`` and ``head_importance.json`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for prefix, table in (
            ("energy", self.energy),
            ("entropy", self.entropy),
            ("prompt_mass", self.prompt_mass),
            ("block_change", self.block_change),
        ):
            for name, tensor in table.items():
                tensors[f"{prefix}/{name}"] = tensor.contiguous().float()
        if self.final_latents is not None:
            tensors["latents/final"] = self.final_latents.contiguous().float()
        meta = {
            "schema": SCHEMA,
            "prompt": self.prompt,
            "config": json.dumps(asdict(self.config), sort_keys=True),
            "head_kind": json.dumps(self.head_kind, sort_keys=True),
            "layer_time_ms": json.dumps(self.layer_time_ms, sort_keys=True),
            "elapsed_s": json.dumps(self.elapsed_s),
        }
        stats_path = folder / PROFILE_STATS_FILE
        save_file(tensors, str(stats_path), metadata=meta)
        doc_path = folder / PROFILE_IMPORTANCE_FILE
        doc_path.write_text(json.dumps(self.importance_document(), indent=2, sort_keys=True))
        return stats_path, doc_path

    @classmethod
    def load(cls, stats_path: Path) -> PromptProfile:
        """Read a profile back from ``stats.safetensors``."""
        from safetensors import safe_open

        try:
            with safe_open(str(stats_path), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(stats_path))
            config = json.loads(meta["config"])
            head_kind = json.loads(meta["head_kind"])
            layer_time_ms = json.loads(meta.get("layer_time_ms", "{}"))
            elapsed_s = float(json.loads(meta.get("elapsed_s", "0")))
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ManifestError(f"unreadable profile {stats_path}: {exc}") from exc
        tables: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, tensor in tensors.items():
            prefix, name = key.split("/", 1)
            tables[prefix][name] = tensor
        config["seeds"] = tuple(config["seeds"])
        return cls(
            prompt=meta["prompt"],
            config=ProfileConfig(**config),
            head_kind=head_kind,
            energy=tables["energy"],
            entropy=tables["entropy"],
            prompt_mass=tables["prompt_mass"],
            block_change=tables["block_change"],
            layer_time_ms=layer_time_ms,
            elapsed_s=elapsed_s,
            final_latents=tables["latents"].get("final"),
        )


def attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every diffusers ``Attention`` module of the denoiser (UNet or transformer), by name."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}


@torch.no_grad()
def profile_prompt(
    pipe: Any, prompt: str, config: ProfileConfig | None = None, *, progress: bool = True
) -> PromptProfile:
    """Generate ``prompt`` for every seed in one batch while recording statistics.

    The pipeline's attention processors are swapped for profiling ones and restored
    afterwards, whatever happens.

    Raises:
        InvalidInputError: empty prompt or invalid config.
    """
    prompt_text = prompt.strip() if isinstance(prompt, str) else prompt
    normalise_prompt(prompt)
    config = config or ProfileConfig()
    unet = denoiser(pipe)
    seeds = list(config.seeds)
    n = len(seeds)
    cfg = config.guidance_scale > 1.0
    state = RecordingState(token_mask=_word_token_mask(pipe, prompt_text, n, cfg))
    original = unet.attn_processors
    unet.set_attn_processor(
        {
            f"{name}.processor": ProfilingAttnProcessor(name, state)
            for name in attention_modules(unet)
        }
    )
    sampled = set(config.sampled_steps())
    step = {"i": -1}
    previous: dict[str, torch.Tensor] = {}
    changes: dict[str, list[torch.Tensor]] = defaultdict(list)
    times: dict[str, list[float]] = defaultdict(list)
    handles = []

    def on_unet_call(_module, _args):
        step["i"] += 1
        state.recording = step["i"] in sampled

    handles.append(unet.register_forward_pre_hook(on_unet_call))
    for block_name, block in denoiser_blocks(unet).items():
        handles += _timing_and_change_hooks(
            block_name, block, n, previous, changes, times, lambda: state.recording
        )

    bar = tqdm(total=config.steps, desc="profile", disable=not progress, leave=False)
    started = time.perf_counter()
    try:
        latents = pipe(
            prompt_text,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale,
            num_images_per_prompt=n,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            height=config.height,
            width=config.width,
            output_type="latent",
            **family_of(pipe).call_kwargs,
            callback_on_step_end=lambda _p, _i, _t, kw: (bar.update(1), kw)[1],
        ).images
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        unet.set_attn_processor(original)
    elapsed = time.perf_counter() - started

    energy, entropy, mass, kind = {}, {}, {}, {}
    for name, acc in state.modules.items():
        kind[name] = acc.kind
        energy[name] = _per_seed(acc.energy / acc.calls, n, cfg, cond_only=False)
        if acc.entropy is not None:
            entropy[name] = _per_seed(acc.entropy / acc.calls, n, cfg, cond_only=True)
        if acc.prompt_mass is not None:
            mass[name] = _per_seed(acc.prompt_mass / acc.calls, n, cfg, cond_only=True)
    return PromptProfile(
        prompt=prompt_text,
        config=config,
        head_kind=kind,
        energy=energy,
        entropy=entropy,
        prompt_mass=mass,
        block_change={b: torch.stack(c, dim=1) for b, c in changes.items()},
        layer_time_ms=_block_times_ms(times),
        elapsed_s=elapsed,
        final_latents=latents.detach().float().cpu(),
    )


def _block_times_ms(times: dict[str, list[float]]) -> dict[str, float]:
    """Mean time per block call (ms), from the steps without head recording when any ran."""
    out = {}
    for name in {k.rstrip("*") for k in times}:
        samples = times.get(name) or times[f"{name}*"]
        out[name] = 1000 * sum(samples) / len(samples)
    return dict(sorted(out.items()))


def _timing_and_change_hooks(name, block, n, previous, changes, times, recording):
    """Hooks recording the block's output change per step and its time.

    Times are kept apart for steps that record head statistics (slower attention) and the
    others (plain SDPA, the time a generation spends): ``times[name]`` vs ``times[name + "*"]``.
    """
    started: dict[str, float] = {}

    def pre(_module, _args):
        started[name] = time.perf_counter()

    def post(_module, _args, output):
        slot = f"{name}*" if recording() else name
        times[slot].append(time.perf_counter() - started[name])
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.detach().float()
        if name in previous:
            delta = (hidden - previous[name]).flatten(1).norm(dim=1)
            rel = delta / previous[name].flatten(1).norm(dim=1).clamp_min(1e-12)
            changes[name].append(rel.view(-1, n).mean(0).cpu())  # mean over the CFG pair
        previous[name] = hidden

    return [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]


def _word_token_mask(pipe: Any, prompt: str, n: int, cfg: bool) -> torch.Tensor:
    """1 on the prompt's word tokens, over the text length the denoiser attends to.

    SDXL concatenates its two encoders' states feature-wise, token by token, and both
    tokenizers split a prompt alike (CLIP's BPE): the first one's mask serves both. A start
    token (an attention sink) and the end token are not words.
    """
    tokenizer = pipe.tokenizer
    length = family_of(pipe).text_tokens or tokenizer.model_max_length
    tokens = tokenizer(
        prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    ids, mask = tokens.input_ids[0], tokens.attention_mask[0].clone().float()
    used = int(tokens.attention_mask[0].sum())
    if tokenizer.bos_token_id is not None and int(ids[0]) == tokenizer.bos_token_id:
        mask[0] = 0.0
    if tokenizer.eos_token_id is not None and int(ids[used - 1]) == tokenizer.eos_token_id:
        mask[used - 1] = 0.0
    cond = mask.expand(n, -1)
    return torch.cat([torch.zeros_like(cond), cond]) if cfg else cond


def _per_seed(values: torch.Tensor, n: int, cfg: bool, *, cond_only: bool) -> torch.Tensor:
    """(batch, heads) → (seeds, heads); the CFG batch is [uncond × n, cond × n]."""
    if not cfg:
        return values
    uncond, cond = values[:n], values[n:]
    return cond if cond_only else (uncond + cond) / 2


def _normalised(energy: torch.Tensor) -> torch.Tensor:
    return energy / energy.mean(dim=-1, keepdim=True).clamp_min(1e-12)


def _rounded(tensor: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in tensor]
