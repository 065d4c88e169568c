"""Train fragjobs' own small text-to-image model from procedural scenes, within a time budget.

Usage::

    python -m fragjobs.builtin.train --out DIR --budget-minutes 8 --device cuda --seed 0
    python -m fragjobs.builtin.train --out DIR --budget-minutes 8 --device cuda --resume
    python -m fragjobs.builtin.train --out /tmp/smoke --budget-minutes 0.5 --device cpu

Stages, each with a share of the budget (``--shares``, default 14 % / 18 % / 60 %; the rest is
for assembly and evaluation) and checkpointed to ``DIR/ckpt`` (safetensors + JSON, no pickle):

1. ``clip``: a tiny ``CLIPModel`` (byte-level tokenizer) trained contrastively on scenes and
   complete captions; captions of the same scene count as positives of each other.
2. ``vae``: an ``AutoencoderKL`` on full 64×64 images (L1 + L2 + a small KL);
   ``scaling_factor`` is measured on data and stored in its config.
3. ``unet``: a ``UNet2DConditionModel`` on 16×16×4 latents, cross-attending to the frozen CLIP
   text encoder's ``last_hidden_state``: v-prediction on a zero-terminal-SNR schedule (so the
   background colour is learnt, not read from leaked signal in the noise), min-SNR weighting,
   EMA, 10 % empty captions, captions mixed from templates, bf16 autocast on CUDA.

Scenes are drawn on the device with torch ops (:mod:`fragjobs.builtin.scenes`); captions
come from a bank tokenised once, so no per-image Python runs in the training loop. The
held-out combinations of :data:`scenes.HELD_OUT` are never trained on.

Outputs in ``DIR``: ``pipeline/`` (a ``StableDiffusionPipeline`` folder, DPM-Solver++
scheduler), ``clip/`` (``CLIPModel`` + tokenizer + 64×64 ``CLIPImageProcessor``, loadable with
``CLIPModel``/``CLIPProcessor.from_pretrained``), ``eval.json`` (zero-shot attribute accuracy on
held-out combinations) and ``train_log.json``.

Each stage stops when its share of the wall clock is used, at least one step in. The budget
runs from the start of :func:`train`; interpreter start-up and imports (about 10 s) come
before it, so give a little less than a hard wall-clock limit.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextModel,
)

from fragjobs.builtin import captions, reading, scenes
from fragjobs.builtin.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_byte_tokenizer

MAX_TOKENS = 77
STAGES = ("clip", "vae", "unet")

TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": MAX_TOKENS,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "projection_dim": 128,
}
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "image_size": scenes.IMAGE_SIZE,
    "patch_size": 8,
    "projection_dim": 128,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": scenes.IMAGE_SIZE,
    # A one-head attention would be the pipeline's only module with fewer than four heads.
    "mid_block_add_attention": False,
}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3,
    "up_block_types": ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    "attention_head_dim": 4,  # diffusers' legacy name for the number of heads
    "norm_num_groups": 8,
}
NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
}
"""Shared by the training noise and the pipeline's scheduler, so both use the same betas."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; :meth:`for_device` picks batch sizes for CUDA or CPU.

    Attributes:
        out: output folder.
        budget_minutes: wall-clock budget for the whole run (stages, assembly, evaluation).
        device: ``"cuda"``, ``"cuda:1"`` or ``"cpu"``.
        seed: seeds model initialisation, data and captions.
        resume: continue from ``out/ckpt`` (finished stages are loaded, not retrained).
        shares: fractions of the budget for the clip, vae and unet stages.
        captions_per_scene: captions tokenised per bank entry (the first is canonical).
        pair_scenes: two-shape scenes in the caption bank.
        two_shapes: fraction of training scenes with two shapes.
        caption_omit: probability of leaving size or background out of a UNet caption.
        caption_dropout: fraction of UNet captions replaced by the empty prompt.
        min_snr_gamma: γ of min-SNR loss weighting.
        ema_decay: final EMA decay of the UNet weights.
        kl_weight: weight of the VAE's KL term (per-image sum).
        scale_images: images encoded to measure the latent scaling factor and PSNR.
        eval_steps, eval_guidance, eval_seeds, eval_batch: evaluation sampling.
        checkpoint_every_s, log_every_s: intervals of checkpoints and progress lines.
    """

    out: Path
    budget_minutes: float
    device: str = "cuda"
    seed: int = 0
    resume: bool = False
    shares: tuple[float, float, float] = (0.14, 0.18, 0.60)
    clip_batch: int = 512
    vae_batch: int = 256
    unet_batch: int = 512
    clip_lr: float = 1e-3
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    captions_per_scene: int = 16
    pair_scenes: int = 2048
    two_shapes: float = 0.1
    caption_omit: float = 0.25
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    kl_weight: float = 1e-6
    scale_images: int = 2048
    eval_steps: int = 20
    eval_guidance: float = 6.0
    eval_seeds: int = 4
    eval_batch: int = 128
    checkpoint_every_s: float = 60.0
    log_every_s: float = 10.0

    def __post_init__(self) -> None:
        if self.budget_minutes <= 0:
            raise ValueError(f"budget_minutes must be > 0, got {self.budget_minutes}")
        if len(self.shares) != 3 or min(self.shares) <= 0 or sum(self.shares) > 1.0:
            raise ValueError(
                f"shares must be three positive fractions (clip, vae, unet) summing to at most "
                f"1, got {self.shares}"
            )
        for name in ("clip_batch", "vae_batch", "unet_batch", "captions_per_scene", "eval_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def for_device(cls, out: Path, budget_minutes: float, device: str, **overrides: Any):
        """Defaults for ``device``: large batches on CUDA, a few images per step on CPU."""
        if torch.device(device).type == "cpu":
            cpu = {
                "clip_batch": 16,
                "vae_batch": 8,
                "unet_batch": 16,
                "captions_per_scene": 2,
                "pair_scenes": 64,
                "scale_images": 16,
                "eval_batch": 4,
                "eval_seeds": 1,
                "log_every_s": 2.0,
            }
            overrides = cpu | overrides
        return cls(out=Path(out), budget_minutes=budget_minutes, device=device, **overrides)


# --------------------------------------------------------------------------------------------
# Run context: clock, budget, log, checkpoints


class Budget:
    """Wall-clock budget split into stage shares plus a final reserve."""

    def __init__(self, total_s: float, shares: dict[str, float]) -> None:
        self.start = time.monotonic()
        self.total_s = total_s
        self.shares = shares

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left of the whole budget."""
        return self.total_s - self.elapsed()

    def allowance(self, stage: str, used_s: float) -> float:
        """Seconds the stage may still run: its share minus what it used, and never into the
        time reserved for later stages and the final reserve."""
        names = list(self.shares)
        later = sum(self.shares[n] for n in names[names.index(stage) + 1 :])
        reserve = 1.0 - sum(self.shares.values())
        by_share = self.shares[stage] * self.total_s - used_s
        by_clock = self.total_s * (1.0 - later - reserve) - self.elapsed()
        return max(0.0, min(by_share, by_clock))


class CheckpointStore:
    """``DIR/ckpt/<stage>.safetensors`` (tensors) and ``<stage>.json`` (state), written
    atomically so an interrupted write never leaves a half checkpoint."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def save(self, stage: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Write one stage's checkpoint (tensors first, the JSON that marks it valid last)."""
        self.root.mkdir(parents=True, exist_ok=True)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        weights = self.root / f"{stage}.safetensors"
        save_file(cpu, str(weights) + ".tmp")
        os.replace(str(weights) + ".tmp", weights)
        state = self.root / f"{stage}.json"
        state.with_suffix(".json.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(state.with_suffix(".json.tmp"), state)

    def load(self, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The stage's tensors and state, or ``None`` when it has no checkpoint."""
        state = self.root / f"{stage}.json"
        if not state.exists():
            return None
        return load_file(self.root / f"{stage}.safetensors"), json.loads(state.read_text())


@dataclass
class RunContext:
    """What every stage needs: config, device, budget, checkpoints and the log."""

    config: TrainConfig
    device: torch.device
    budget: Budget
    store: CheckpointStore
    log: dict[str, Any] = field(default_factory=dict)

    def say(self, message: str) -> None:
        """Print a progress line with the elapsed time (flushed, for log tails)."""
        print(f"[{self.budget.elapsed():7.1f}s] {message}", flush=True)

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast on CUDA; plain float32 elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def generator(self, stage: str, step: int) -> torch.Generator:
        """A data generator on the device, seeded by (seed, stage, step) so resumes differ."""
        seed = self.config.seed * 1_000_003 + STAGES.index(stage) * 7919 + step
        return torch.Generator(self.device).manual_seed(seed)

    def write_log(self) -> None:
        """Write ``train_log.json`` (called after every stage and at the end)."""
        path = self.config.out / "train_log.json"
        path.write_text(json.dumps(self.log, indent=1, default=str))


# --------------------------------------------------------------------------------------------
# Data: a caption bank over scene attributes


@dataclass
class CaptionBank:
    """Scene attributes with pre-tokenised captions, all on the device.

    Entry ``i`` is one scene's attributes (``background[i]``, ``objects[i]``) and
    ``tokens[i]`` holds ``K`` captions of it (the canonical one first). Drawing a batch picks
    entries and captions at random and fresh jitter, entirely with tensor ops.
    """

    background: torch.Tensor
    objects: torch.Tensor
    tokens: torch.Tensor
    singles: int
    two_shapes: float

    @classmethod
    def build(
        cls,
        specs: Sequence[scenes.SceneSpec],
        singles: int,
        *,
        captions_per_scene: int,
        omit: float,
        two_shapes: float,
        tokenizer: Any,
        rng: random.Random,
        device: torch.device,
    ) -> CaptionBank:
        """Caption and tokenise ``specs`` (the first ``singles`` have one shape)."""
        texts = []
        for spec in specs:
            texts.append(captions.canonical_caption(spec))
            texts += [captions.caption(spec, rng, omit=omit) for _ in range(captions_per_scene - 1)]
        ids = byte_token_ids(texts)
        sample = texts[:: max(1, len(texts) // 256)]
        if not torch.equal(byte_token_ids(sample), tokenize(tokenizer, sample)):
            raise RuntimeError("byte_token_ids disagrees with the tokenizer: use tokenize()")
        ids = ids.view(len(specs), captions_per_scene, MAX_TOKENS)
        packed = scenes.specs_to_tensors(specs, device)
        return cls(packed.background, packed.objects, ids.to(device), singles, two_shapes)

    def draw(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, scenes.SceneTensors, torch.Tensor]:
        """``n`` random (entry index, scenes with fresh jitter, caption token ids)."""
        device = self.tokens.device
        index = torch.randint(self.singles, (n,), generator=generator, device=device)
        pairs = self.background.shape[0] - self.singles
        if pairs > 0 and self.two_shapes > 0:
            pair = self.singles + torch.randint(pairs, (n,), generator=generator, device=device)
            two = torch.rand(n, generator=generator, device=device) < self.two_shapes
            index = torch.where(two, pair, index)
        uniform = torch.rand(n, 2, 5, generator=generator, device=device)
        batch = scenes.SceneTensors(
            self.background[index], self.objects[index], scenes.jitter_from_uniform(uniform)
        )
        which = torch.randint(self.tokens.shape[1], (n,), generator=generator, device=device)
        return index, batch, self.tokens[index, which]


def tokenize(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Token ids (n, 77) exactly as ``StableDiffusionPipeline`` tokenises prompts."""
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=MAX_TOKENS,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def byte_token_ids(texts: Sequence[str]) -> torch.Tensor:
    """:func:`tokenize` for the byte tokenizer, 50× faster: its ids are the UTF-8 bytes
    between BOS and EOS, then PAD (banks check a sample against the tokenizer itself)."""
    ids = np.full((len(texts), MAX_TOKENS), PAD_ID, dtype=np.int64)
    ids[:, 0] = BOS_ID
    for row, text in zip(ids, texts, strict=True):
        data = np.frombuffer(text.encode("utf-8")[: MAX_TOKENS - 2], dtype=np.uint8)
        row[1 : 1 + data.size] = data
        row[1 + data.size] = EOS_ID
    return torch.from_numpy(ids)


def build_bank(ctx: RunContext, tokenizer: Any, *, omit: float, salt: int) -> CaptionBank:
    """A bank of every training single-shape scene plus ``pair_scenes`` two-shape scenes."""
    config = ctx.config
    singles = scenes.enumerate_specs(held_out=False)
    generator = torch.Generator().manual_seed(config.seed * 31 + salt)
    pairs = scenes.sample_specs(
        config.pair_scenes if config.two_shapes > 0 else 0,
        generator,
        held_out=False,
        two_shapes=1.0,
        jitter=False,
    )
    return CaptionBank.build(
        singles + pairs,
        len(singles),
        captions_per_scene=config.captions_per_scene,
        omit=omit,
        two_shapes=config.two_shapes,
        tokenizer=tokenizer,
        rng=random.Random(config.seed * 31 + salt),
        device=ctx.device,
    )


# --------------------------------------------------------------------------------------------
# Models


def build_clip(seed: int) -> CLIPModel:
    """The tiny CLIP (text 0.84 M, vision 0.83 M parameters), freshly initialised."""
    config = CLIPConfig(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, projection_dim=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config)


def build_vae(seed: int) -> AutoencoderKL:
    """The 64×64 → 16×16×4 ``AutoencoderKL`` (0.9 M parameters), freshly initialised."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**VAE_CONFIG)


def build_unet(seed: int) -> UNet2DConditionModel:
    """The ``UNet2DConditionModel`` (4.3 M parameters, 4 heads per attention module)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**UNET_CONFIG)


class EMA:
    """Exponential moving average of a module's parameters, with the usual warm-up
    ``decay = min(max_decay, (1 + step) / (10 + step))``."""

    def __init__(self, model: torch.nn.Module, max_decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.max_decay = max_decay
        self._targets = list(self.module.parameters())
        self._sources = list(model.parameters())

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the source module's current parameters."""
        decay = min(self.max_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._targets, self._sources, 1.0 - decay)


# --------------------------------------------------------------------------------------------
# The stage loop


@dataclass
class StageResult:
    """How a stage went: steps, seconds, loss history and stage-specific values."""

    name: str
    steps: int
    seconds: float
    history: list[list[float]]
    extra: dict[str, Any]
    resumed_done: bool = False


def run_stage(
    ctx: RunContext,
    name: str,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[int, torch.Generator], torch.Tensor],
    *,
    peak_lr: float,
    warmup_steps: int,
    after_step: Callable[[int], None] | None = None,
    finish: Callable[[], dict[str, Any]] | None = None,
) -> StageResult:
    """Train until the stage's time allowance is used, checkpointing on the way.

    The learning rate warms up linearly, then follows a cosine (to 5 %) over the stage's
    *time*, so the schedule completes whatever step rate the device reaches.

    Args:
        modules: what the checkpoint holds (e.g. ``{"model": unet, "ema": ema.module}``).
        loss_fn: ``(step, generator) -> loss``; the runner does backward and the update.
        after_step: called with the step index after each optimizer step (EMA, clamps).
        finish: computes values stored with the finished checkpoint (e.g. the VAE's
            latent scale); on a resumed finished stage they are read back instead.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step, used, history = 0, 0.0, []
    saved = ctx.store.load(name) if ctx.config.resume else None
    if saved is not None:
        tensors, meta = saved
        for prefix, module in modules.items():
            _load_module(module, tensors, prefix)
        if meta["done"]:
            ctx.say(f"{name}: finished in a previous run ({meta['step']} steps), loaded")
            return StageResult(
                name, meta["step"], meta["seconds"], meta["history"], meta["extra"], True
            )
        _load_optimizer(optimizer, tensors, meta)
        step, used, history = meta["step"], meta["seconds"], meta["history"]
        ctx.say(f"{name}: resuming at step {step} ({used:.0f}s already used)")

    def checkpoint(done: bool, extra: dict[str, Any]) -> None:
        tensors = {f"{p}.{k}": v for p, m in modules.items() for k, v in m.state_dict().items()}
        optim_tensors, optim_meta = _optimizer_state(optimizer)
        meta = {"done": done, "step": step, "seconds": round(used + spent, 3)}
        meta |= {"history": history, "extra": extra, "optimizer": optim_meta}
        ctx.store.save(name, tensors | optim_tensors, meta)

    allowance = ctx.budget.allowance(name, used)
    ctx.say(f"{name}: training for {allowance:.0f}s from step {step}")
    generator = ctx.generator(name, step)
    start = time.monotonic()
    last_log = last_checkpoint = start
    running, count, logged_step = torch.zeros((), device=ctx.device), 0, step
    spent = 0.0
    while True:
        spent = time.monotonic() - start
        if spent >= allowance and count > 0:
            break
        progress = min(1.0, (used + spent) / max(used + allowance, 1e-9))
        lr = peak_lr * min(1.0, (step + 1) / warmup_steps)
        lr *= 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(step, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        running += loss.detach()
        count += 1
        step += 1
        now = time.monotonic()
        if now - last_log >= ctx.config.log_every_s:
            mean = running.item() / max(1, step - logged_step)
            rate = (step - logged_step) / (now - last_log)
            history.append([step, round(used + now - start, 2), round(mean, 6)])
            ctx.say(f"{name} step {step:6d}  loss {mean:.4f}  lr {lr:.2e}  {rate:.1f} it/s")
            running.zero_()
            last_log, logged_step = now, step
        if now - last_checkpoint >= ctx.config.checkpoint_every_s:
            spent = now - start
            checkpoint(False, {})
            last_checkpoint = now
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    spent = time.monotonic() - start
    if step > logged_step:
        mean = running.item() / (step - logged_step)
        history.append([step, round(used + spent, 2), round(mean, 6)])
    extra = finish() if finish is not None else {}
    checkpoint(True, extra)
    ctx.say(f"{name}: done, {step} steps in {used + spent:.0f}s, last loss {history[-1][2]:.4f}")
    return StageResult(name, step, round(used + spent, 2), history, extra)


def _load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(state)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {
        f"optim.{index}.{key}": value
        for index, entries in state["state"].items()
        for key, value in entries.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = meta["optimizer"]["param_groups"]
    for group in groups:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _adamw(module: torch.nn.Module, device: torch.device, weight_decay: float):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=0.0, weight_decay=weight_decay, fused=device.type == "cuda")


# --------------------------------------------------------------------------------------------
# Stages


def train_clip(ctx: RunContext, bank: CaptionBank) -> tuple[CLIPModel, StageResult]:
    """Stage 1: contrastive CLIP on scenes and complete captions (``bank`` omits nothing)."""
    config = ctx.config
    clip = build_clip(config.seed).to(ctx.device).train()
    ctx.say(f"clip: {_count(clip) / 1e6:.2f} M parameters, bank of {bank.tokens.shape[0]} scenes")
    max_scale = math.log(100.0)

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        index, batch, ids = bank.draw(config.clip_batch, generator)
        with torch.no_grad():
            images = scenes.render_tensors(batch)
        with ctx.autocast():
            image = reading.image_embeddings(clip, images)
            text = reading.text_embeddings(clip, ids)
        logits = clip.logit_scale.exp().float() * image @ text.T
        # Several captions of one scene may share a batch: they are all positives.
        same = (index[:, None] == index[None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def clamp_scale(step: int) -> None:
        with torch.no_grad():
            clip.logit_scale.clamp_(max=max_scale)

    result = run_stage(
        ctx,
        "clip",
        {"model": clip},
        _adamw(clip, ctx.device, 0.05),
        loss_fn,
        peak_lr=config.clip_lr,
        warmup_steps=100,
        after_step=clamp_scale,
    )
    return clip.eval().requires_grad_(False), result


def train_vae(ctx: RunContext, bank: CaptionBank) -> tuple[AutoencoderKL, StageResult]:
    """Stage 2: the autoencoder on full 64×64 scenes of ``bank``; measures the latent
    scaling factor."""
    config = ctx.config
    vae = build_vae(config.seed + 1).to(ctx.device).train()
    ctx.say(f"vae: {_count(vae) / 1e6:.2f} M parameters")

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        _, batch, _ = bank.draw(config.vae_batch, generator)
        with torch.no_grad():
            x = scenes.render_tensors(batch) * 2.0 - 1.0
        with ctx.autocast():
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample(generator=generator)).sample.float()
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + config.kl_weight * kl

    @torch.no_grad()
    def finish() -> dict[str, Any]:
        vae.eval()
        generator = ctx.generator("vae", 10**9)
        latents, errors = [], []
        for _ in range(max(1, config.scale_images // config.vae_batch)):
            _, batch, _ = bank.draw(config.vae_batch, generator)
            x = scenes.render_tensors(batch) * 2.0 - 1.0
            with ctx.autocast():
                posterior = vae.encode(x).latent_dist
                z = posterior.sample(generator=generator)
                rec = vae.decode(posterior.mean).sample.float().clamp(-1, 1)
            latents.append(z.float())
            errors.append(((rec - x) / 2).pow(2).mean(dim=(1, 2, 3)))
        z = torch.cat(latents)
        psnr = (-10 * torch.log10(torch.cat(errors).clamp(min=1e-10))).mean()
        return {
            "scaling_factor": float(1.0 / z.std()),
            "latent_mean": float(z.mean()),
            "psnr_db": round(float(psnr), 2),
        }

    result = run_stage(
        ctx,
        "vae",
        {"model": vae},
        _adamw(vae, ctx.device, 0.0),
        loss_fn,
        peak_lr=config.vae_lr,
        warmup_steps=100,
        finish=finish,
    )
    vae.register_to_config(scaling_factor=result.extra["scaling_factor"])
    ctx.say(
        f"vae: scaling_factor {result.extra['scaling_factor']:.4f}, "
        f"PSNR {result.extra['psnr_db']:.2f} dB"
    )
    return vae.eval().requires_grad_(False), result


def train_unet(
    ctx: RunContext, tokenizer: Any, clip: CLIPModel, vae: AutoencoderKL
) -> tuple[UNet2DConditionModel, StageResult]:
    """Stage 3: the denoiser, conditioned on the frozen CLIP text encoder; returns the EMA."""
    config = ctx.config
    unet = build_unet(config.seed + 2).to(ctx.device).train()
    ema = EMA(unet, config.ema_decay)
    bank = build_bank(ctx, tokenizer, omit=config.caption_omit, salt=2)
    empty = tokenize(tokenizer, [""]).to(ctx.device)
    scale = vae.config.scaling_factor
    alphas = DDPMScheduler(**NOISE_SCHEDULE).alphas_cumprod.to(ctx.device, torch.float32)
    timesteps = alphas.shape[0]
    ctx.say(f"unet: {_count(unet) / 1e6:.2f} M parameters, {_heads(unet)}")

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        n = config.unet_batch
        _, batch, ids = bank.draw(n, generator)
        with torch.no_grad():
            x = scenes.render_tensors(batch) * 2.0 - 1.0
            drop = torch.rand(n, generator=generator, device=ctx.device) < config.caption_dropout
            ids = torch.where(drop[:, None], empty, ids)
            with ctx.autocast():
                z = vae.encode(x).latent_dist.sample(generator=generator)
                context = clip.text_model(input_ids=ids).last_hidden_state
            z = z.float() * scale
        t = torch.randint(timesteps, (n,), generator=generator, device=ctx.device)
        noise = torch.randn(z.shape, generator=generator, device=ctx.device)
        alpha = alphas[t]
        a, s = alpha.sqrt().view(-1, 1, 1, 1), (1.0 - alpha).sqrt().view(-1, 1, 1, 1)
        target = a * noise - s * z  # v
        with ctx.autocast():
            pred = unet(a * z + s * noise, t, encoder_hidden_states=context).sample
        # min-SNR-γ on the v-objective, whose own weight in x0-space is SNR + 1: the weight
        # is capped at high SNR and stays 1 at zero SNR, where the background is decided.
        snr1 = alpha / (1.0 - alpha) + 1.0
        weight = snr1.clamp(max=config.min_snr_gamma) / snr1
        per_image = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (weight * per_image).mean()

    result = run_stage(
        ctx,
        "unet",
        {"model": unet, "ema": ema.module},
        _adamw(unet, ctx.device, 0.01),
        loss_fn,
        peak_lr=config.unet_lr,
        warmup_steps=300,
        after_step=ema.update,
    )
    return ema.module.eval(), result


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _heads(unet: UNet2DConditionModel) -> str:
    heads = [m.heads for m in unet.modules() if type(m).__name__ == "Attention"]
    return f"{len(heads)} attention modules, {min(heads)}–{max(heads)} heads"


# --------------------------------------------------------------------------------------------
# Assembly, saving and checks


def build_scheduler() -> DPMSolverMultistepScheduler:
    """The pipeline's sampler: DPM-Solver++ on the training betas, trailing timesteps."""
    return DPMSolverMultistepScheduler(
        **NOISE_SCHEDULE, steps_offset=1, timestep_spacing="trailing"
    )


def assemble_pipeline(
    clip: CLIPModel, vae: AutoencoderKL, unet: UNet2DConditionModel, tokenizer: Any
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` of copies of the trained parts, on CPU."""
    text_encoder = CLIPTextModel(clip.config.text_config)
    # Some transformers versions wrap the transformer as ``.text_model`` in both classes,
    # others make ``CLIPModel.text_model`` a flat ``CLIPTextModel``: load into the match.
    target = getattr(text_encoder, "text_model", text_encoder)
    target.load_state_dict(clip.text_model.state_dict())
    return StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to("cpu"),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).to("cpu"),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def clip_image_processor() -> CLIPImageProcessor:
    """Image processor for 64×64 images: resize and crop are identities at that size, and the
    normalisation is the one training used (:data:`scenes.CLIP_MEAN`/``CLIP_STD``)."""
    return CLIPImageProcessor(
        size={"shortest_edge": scenes.IMAGE_SIZE},
        crop_size={"height": scenes.IMAGE_SIZE, "width": scenes.IMAGE_SIZE},
        image_mean=list(scenes.CLIP_MEAN),
        image_std=list(scenes.CLIP_STD),
    )


def save_outputs(
    ctx: RunContext, pipe: StableDiffusionPipeline, clip: CLIPModel, tokenizer: Any
) -> dict[str, Any]:
    """Save ``pipeline/`` and ``clip/``; returns the pipeline's size and how CLIP was saved.

    ``clip/`` holds the ``CLIPModel``, the tokenizer and the image processor. Where a
    transformers version refuses to wrap the byte tokenizer in a ``CLIPProcessor``, the two
    are saved side by side instead (the files ``CLIPProcessor.from_pretrained`` reads).
    """
    out = ctx.config.out
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    copy.deepcopy(clip).to("cpu").save_pretrained(out / "clip")
    try:
        CLIPProcessor(image_processor=clip_image_processor(), tokenizer=tokenizer).save_pretrained(
            out / "clip"
        )
        clip_saved_as = "CLIPProcessor"
    except (TypeError, ValueError, ImportError) as exc:
        ctx.say(f"WARNING: no CLIPProcessor ({type(exc).__name__}: {exc}); saving the parts")
        tokenizer.save_pretrained(out / "clip")
        clip_saved_as = "tokenizer only"
        try:
            clip_image_processor().save_pretrained(out / "clip")
            clip_saved_as = "tokenizer + CLIPImageProcessor"
        except ImportError as missing:  # an image backend (Pillow or torchvision) is absent
            ctx.say(f"WARNING: no CLIPImageProcessor saved: {missing}")
    size_mb = sum(f.stat().st_size for f in (out / "pipeline").rglob("*") if f.is_file()) / 1e6
    if size_mb > 30:
        ctx.say(f"WARNING: pipeline/ is {size_mb:.1f} MB, over the 30 MB target")
    return {"pipeline_mb": round(size_mb, 2), "clip_saved_as": clip_saved_as}


@torch.no_grad()
def check_outputs(out: Path, pipe: StableDiffusionPipeline, clip: CLIPModel) -> dict[str, Any]:
    """Reload the saved folders offline and compare them with the trained objects.

    Checks: ``AutoTokenizer`` on ``pipeline/tokenizer`` gives ``build_byte_tokenizer()``'s
    ids; ``CLIPProcessor`` on ``clip/`` gives training's pixel values; the reloaded CLIP and
    UNet compute what the trained ones compute.

    Raises:
        RuntimeError: naming the first saved part that does not reproduce training.
    """
    reference = build_byte_tokenizer(MAX_TOKENS)
    probes = ["", "a small red circle on the left, grey background", "héllo ✓ " * 12]
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out / "pipeline" / "tokenizer")
    if not torch.equal(tokenize(reloaded_tokenizer, probes), tokenize(reference, probes)):
        raise RuntimeError("pipeline/tokenizer does not reproduce build_byte_tokenizer() ids")
    model = CLIPModel.from_pretrained(out / "clip", local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(out / "clip", local_files_only=True)
    images = scenes.render(scenes.sample_specs(4, torch.Generator().manual_seed(0), held_out=None))
    uint8 = [(image * 255).round().to(torch.uint8) for image in images]
    inputs = processor(text=probes[1:2], images=uint8, return_tensors="pt", padding="max_length")
    pixel_error = float((inputs["pixel_values"] - reading.normalise_for_clip(images)).abs().max())
    if pixel_error > 0.05:
        raise RuntimeError(f"clip/ processor changes pixels by up to {pixel_error:.3f}")
    # Compare on CPU: TF32 on a GPU alone would differ by more than the tolerance.
    trained = reading.image_embeddings(copy.deepcopy(clip).to("cpu"), images)
    if (reading.image_embeddings(model, images) - trained).abs().max() > 1e-3:
        raise RuntimeError("clip/ weights do not reproduce the trained image embeddings")
    reloaded = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, MAX_TOKENS, TEXT_CONFIG["hidden_size"])
    reference_unet = pipe.unet.to("cpu")
    expected = reference_unet(sample, 500, encoder_hidden_states=context).sample
    if (
        reloaded.unet(sample, 500, encoder_hidden_states=context).sample - expected
    ).abs().max() > 1e-4:
        raise RuntimeError("pipeline/unet does not reproduce the trained EMA UNet")
    return {"tokenizer_round_trip": True, "clip_processor_max_pixel_error": round(pixel_error, 4)}


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    ctx: RunContext, pipe: StableDiffusionPipeline, clip: CLIPModel, tokenizer: Any
) -> dict[str, Any]:
    """Generate held-out combinations and read them back with the trained CLIP.

    Held-out specs (every held-out combination × size × background, canonical captions) ×
    ``eval_seeds`` seeds come first; then one seed of as many training combinations, if the
    budget allows. Batches stop once the budget is spent (the first one always runs).
    """
    config = ctx.config
    pipe = pipe.to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    # Shuffled, so that a run cut short by the budget still evaluates a balanced prefix.
    held_out = scenes.enumerate_specs(held_out=True)
    random.Random(config.seed).shuffle(held_out)
    seen = random.Random(config.seed).sample(scenes.enumerate_specs(held_out=False), len(held_out))
    work = [("held_out", s, seed) for seed in range(config.eval_seeds) for s in held_out]
    work += [("seen", s, 0) for s in seen]
    generated: dict[str, list[tuple[scenes.SceneSpec, torch.Tensor]]] = {}
    start = time.monotonic()
    for first in range(0, len(work), config.eval_batch):
        if first and ctx.budget.left() <= 0:
            ctx.say(f"eval: budget spent, stopping after {first} of {len(work)} images")
            break
        chunk = work[first : first + config.eval_batch]
        images = pipe(
            [captions.canonical_caption(spec) for _, spec, _ in chunk],
            num_inference_steps=config.eval_steps,
            guidance_scale=config.eval_guidance,
            height=scenes.IMAGE_SIZE,
            width=scenes.IMAGE_SIZE,
            generator=[
                torch.Generator("cpu").manual_seed(seed * 100_003 + first + i)
                for i, (_, _, seed) in enumerate(chunk)
            ],
            output_type="pt",
        ).images.float()
        for (group, spec, _), image in zip(chunk, images, strict=True):
            generated.setdefault(group, []).append((spec, image.cpu()))
    seconds = time.monotonic() - start
    report: dict[str, Any] = {
        "settings": {
            "steps": config.eval_steps,
            "guidance_scale": config.eval_guidance,
            "seeds": config.eval_seeds,
            "scheduler": type(pipe.scheduler).__name__,
            "prompts": "canonical_caption(spec)",
        },
        "seconds": round(seconds, 2),
        "targets": {"colour": 0.9, "shape": 0.85, "position": 0.8},
    }
    for group, pairs in generated.items():
        specs = [spec for spec, _ in pairs]
        images = torch.stack([image for _, image in pairs])
        report[group] = score(clip, tokenizer, specs, images)
    renders = min(2 * len(held_out), 8 * config.eval_batch)
    jittered = scenes.sample_specs(
        renders, torch.Generator().manual_seed(config.seed), held_out=True
    )
    report["reader_on_renders"] = score(
        clip, tokenizer, jittered, scenes.render(jittered, ctx.device)
    )
    if "held_out" in report:
        accuracy = report["held_out"]["accuracy"]
        report["targets_met"] = all(accuracy[k] >= v for k, v in report["targets"].items())
    return report


def score(
    clip: CLIPModel, tokenizer: Any, specs: Sequence[scenes.SceneSpec], images: torch.Tensor
) -> dict[str, Any]:
    """Accuracy of :func:`reading.read_attributes` against ``specs``, overall and per size."""
    readings = reading.read_attributes(clip, tokenizer, images)
    backgrounds = reading.read_background(images)
    rows = []
    for spec, found, background in zip(specs, readings, backgrounds, strict=True):
        truth = spec.attributes()
        row = {a: float(found[a] == truth[a]) for a in scenes.ATTRIBUTES}
        row["colour_shape_position"] = row["colour"] * row["shape"] * row["position"]
        row["background_pixels"] = float(background == spec.background)
        rows.append((spec.size, row))

    def mean(selected: list[dict[str, float]]) -> dict[str, float]:
        return {k: round(sum(r[k] for r in selected) / len(selected), 4) for k in selected[0]}

    return {
        "n": len(rows),
        "accuracy": mean([r for _, r in rows]),
        "by_size": {
            size: mean([r for s, r in rows if s == size])
            for size in scenes.SIZES
            if any(s == size for s, _ in rows)
        },
    }


# --------------------------------------------------------------------------------------------
# Entry point


def train(config: TrainConfig) -> dict[str, Any]:
    """Run all stages, save the pipeline and CLIP, evaluate; returns the training log."""
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda given but torch sees no CUDA device: use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    _quiet_libraries()
    config.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(config.budget_minutes * 60.0, dict(zip(STAGES, config.shares, strict=True)))
    ctx = RunContext(config, device, budget, CheckpointStore(config.out / "ckpt"))
    ctx.log = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": _versions(),
        "models": {"text": TEXT_CONFIG, "vision": VISION_CONFIG, "vae": VAE_CONFIG},
        "stages": {},
    }
    ctx.log["models"] |= {"unet": UNET_CONFIG, "noise": NOISE_SCHEDULE}
    ctx.say(f"device {ctx.log['device']}, budget {budget.total_s:.0f}s, out {config.out}")
    tokenizer = build_byte_tokenizer(MAX_TOKENS)

    bank = build_bank(ctx, tokenizer, omit=0.0, salt=1)
    clip, result = train_clip(ctx, bank)
    _record(ctx, result)
    vae, result = train_vae(ctx, bank)
    _record(ctx, result)
    unet, result = train_unet(ctx, tokenizer, clip, vae)
    _record(ctx, result)

    ctx.say("assembling and saving pipeline/ and clip/")
    pipe = assemble_pipeline(clip, vae, unet, tokenizer)
    ctx.log["outputs"] = save_outputs(ctx, pipe, clip, tokenizer)
    try:
        ctx.log["outputs"]["checks"] = check_outputs(config.out, pipe, clip)
    except Exception as exc:  # a one-shot run still evaluates; the log says why
        ctx.log["outputs"]["checks"] = {"failed": f"{type(exc).__name__}: {exc}"}
        ctx.say(f"CHECK FAILED: {type(exc).__name__}: {exc}")
    ctx.say(f"saved: {ctx.log['outputs']}")
    ctx.write_log()

    ctx.say("evaluating held-out combinations")
    report = evaluate(ctx, pipe, clip, tokenizer)
    (config.out / "eval.json").write_text(json.dumps(report, indent=1))
    ctx.log["eval"] = {k: report[k] for k in ("held_out", "seen", "targets_met") if k in report}
    ctx.log["total_seconds"] = round(budget.elapsed(), 1)
    ctx.write_log()
    for group in ("held_out", "seen", "reader_on_renders"):
        if group in report:
            ctx.say(f"eval {group} (n={report[group]['n']}): {report[group]['accuracy']}")
    return ctx.log


def _record(ctx: RunContext, result: StageResult) -> None:
    entry = asdict(result)
    entry["batch"] = getattr(ctx.config, f"{result.name}_batch")
    entry["steps_per_s"] = round(result.steps / max(result.seconds, 1e-9), 2)
    ctx.log["stages"][result.name] = entry
    ctx.write_log()


def _quiet_libraries() -> None:
    """Errors only, no progress bars: keep the log tail to this script's progress lines."""
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def _versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line into a :class:`TrainConfig`."""
    parser = argparse.ArgumentParser(
        prog="python -m fragjobs.builtin.train",
        description="Train fragjobs' own small text-to-image model within a time budget.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--budget-minutes", type=float, required=True, help="whole-run budget")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    parser.add_argument(
        "--shares", default=None, help="budget fractions clip,vae,unet (default 0.14,0.18,0.60)"
    )
    for stage in STAGES:
        parser.add_argument(f"--{stage}-batch", type=int, default=None)
    parser.add_argument("--eval-guidance", type=float, default=None)
    args = parser.parse_args(argv)
    if (args.out / "ckpt").exists() and not args.resume:
        parser.error(f"{args.out / 'ckpt'} exists: pass --resume to continue, or choose --out")
    overrides: dict[str, Any] = {"seed": args.seed, "resume": args.resume}
    if args.shares is not None:
        overrides["shares"] = tuple(float(x) for x in args.shares.split(","))
    for stage in STAGES:
        if getattr(args, f"{stage}_batch") is not None:
            overrides[f"{stage}_batch"] = getattr(args, f"{stage}_batch")
    if args.eval_guidance is not None:
        overrides["eval_guidance"] = args.eval_guidance
    try:
        return TrainConfig.for_device(args.out, args.budget_minutes, args.device, **overrides)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()
