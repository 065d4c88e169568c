"""The full model's images the chain makes anyway: kept, looked up, delivered.

Profiling generates the prompt's profiling seeds with the full model and keeps their final
latents in the profile (``stats.safetensors``); validation generates its held-out seeds with
the full model and keeps their final latents beside the profile
(``profiles/<profile-id>/full_model_<seed>.safetensors``). Both are the full model's images,
the reference a fragment is judged against, so a chain delivers them as its first variants
and the fragment generates only the rest (:func:`fragjobs.chain.knobs.variant_seeds`); a later
validation of the same prompt, settings and seeds (a rerun, a revalidation) decodes them
instead of generating them again (:func:`full_model_images`).

A stored image is used only for the base (sha256), prompt (normalised), steps, guidance and
size it was made with (:class:`FullImageSpec`); each kept file carries them and the sha256 of
its latents, and a file that does not match is ignored (generated again and replaced).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fragjobs.errors import IntegrityError, InvalidInputError, ObjectNotFoundError
from fragjobs.generation import GenerationConfig, decode_latents
from fragjobs.generation.generate import generate_latents
from fragjobs.keys import PROFILE_STATS_FILE, normalise_prompt, profile_object

log = logging.getLogger("fragjobs")

SCHEMA = "fragjobs.full_model_latents/1"
PROFILE_LATENTS = "latents/final"
"""The tensor of the profile's ``stats.safetensors`` holding its seeds' final latents."""


@dataclass(frozen=True)
class FullImageSpec:
    """What a full-model image depends on besides its seed."""

    base_sha256: str
    prompt: str
    steps: int
    guidance_scale: float
    height: int
    width: int

    @classmethod
    def of(cls, base_sha256: str, prompt: str, gen: GenerationConfig) -> FullImageSpec:
        """The spec of ``prompt`` on the base ``base_sha256`` with ``gen``'s settings."""
        return cls(
            base_sha256,
            normalise_prompt(prompt),
            gen.steps,
            float(gen.guidance_scale),
            gen.height,
            gen.width,
        )


def full_image_object(profile_id: str, seed: int) -> str:
    """``profiles/<profile-id>/full_model_<seed>.safetensors``."""
    return profile_object(profile_id, f"full_model_{int(seed)}.safetensors")


def stored_full_latents(
    ws: Any, profile_id: str, spec: FullImageSpec, seeds: list[int]
) -> dict[int, torch.Tensor]:
    """The full model's final latents kept for ``seeds`` (those found and matching ``spec``).

    The profile's own seeds come from its ``stats.safetensors`` when its prompt, settings and
    base match ``spec``; the others from the files validation kept.
    """
    found = _profile_latents(ws, profile_id, spec, seeds)
    for seed in seeds:
        if seed not in found:
            latents = _kept_latents(ws, profile_id, spec, seed)
            if latents is not None:
                found[seed] = latents
    return found


def store_full_latents(
    ws: Any, profile_id: str, spec: FullImageSpec, seeds: list[int], latents: torch.Tensor
) -> None:
    """Keep the full model's final latents of ``seeds`` (one file per seed)."""
    for seed, one in zip(seeds, latents, strict=True):
        tensor = one.detach().float().cpu().contiguous()
        meta = {
            "schema": SCHEMA,
            "seed": str(seed),
            "spec": json.dumps(asdict(spec), sort_keys=True),
            "latents_sha256": _tensor_sha256(tensor),
        }
        ws.store.put_bytes(
            full_image_object(profile_id, seed), save_tensors({"latents": tensor}, meta)
        )


@torch.no_grad()
def full_model_latents(
    pipe: Any,
    prompt: str,
    seeds: list[int],
    gen: GenerationConfig,
    *,
    progress: bool = False,
    desc: str = "full model",
) -> torch.Tensor:
    """The full model's final latents of ``seeds``, ``gen.batch_size`` at a time (each seed
    from its own generator, as :func:`fragjobs.generation.generate_images` makes images)."""
    return generate_latents(pipe, prompt, seeds, gen, progress=progress, desc=desc)


def decode_in_batches(pipe: Any, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Final latents → images (N, 3, H, W) in [0, 1], ``batch_size`` at a time."""
    parts = [
        decode_latents(pipe, latents[i : i + batch_size])
        for i in range(0, len(latents), batch_size)
    ]
    return torch.cat(parts)


def full_model_images(
    ws: Any,
    pipe: Any,
    profile_id: str,
    spec: FullImageSpec,
    seeds: list[int],
    gen: GenerationConfig,
    *,
    progress: bool = False,
    kept: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The full model's images of ``seeds``: kept ones decoded, the others generated and kept.

    Args:
        kept: what :func:`stored_full_latents` returned for these seeds, when the caller
            looked it up already (not read again).

    Returns:
        The images (N, 3, H, W) in the order of ``seeds``, and the seeds generated now.
    """
    kept = dict(stored_full_latents(ws, profile_id, spec, seeds) if kept is None else kept)
    missing = [s for s in seeds if s not in kept]
    if missing:
        made = full_model_latents(
            pipe, spec.prompt, missing, gen, progress=progress, desc="validate: full"
        )
        store_full_latents(ws, profile_id, spec, missing, made)
        kept.update(zip(missing, made, strict=True))
    latents = torch.stack([kept[s] for s in seeds])
    return decode_in_batches(pipe, latents, gen.batch_size), missing


def stored_full_images(
    ws: Any, pipe: Any, profile_id: str, spec: FullImageSpec, seeds: list[int], batch_size: int
) -> dict[int, torch.Tensor]:
    """The full model's images kept for any of ``seeds`` (decoded), by seed; the rest absent."""
    kept = stored_full_latents(ws, profile_id, spec, seeds)
    found = [s for s in seeds if s in kept]
    if not found:
        return {}
    images = decode_in_batches(pipe, torch.stack([kept[s] for s in found]), batch_size)
    return dict(zip(found, images, strict=True))


def _profile_latents(
    ws: Any, profile_id: str, spec: FullImageSpec, seeds: list[int]
) -> dict[int, torch.Tensor]:
    """The profile's final latents of those of ``seeds`` it profiled, if it matches ``spec``."""
    row = ws.catalog.find_profile(profile_id)
    if row is None:
        return {}
    config = row.params.get("profile", {})
    profiled = list(config.get("seeds", ()))
    if not set(seeds) & set(profiled) or not _profile_matches(ws, row, config, spec):
        return {}
    try:
        data = ws.store.get_bytes(
            profile_object(profile_id, PROFILE_STATS_FILE), expected_sha256=row.stats_sha256
        )
        latents = load_tensors(data).get(PROFILE_LATENTS)
    except (IntegrityError, ObjectNotFoundError, SafetensorError) as exc:
        log.warning("profile %s: its full-model images are not usable (%s)", profile_id, exc)
        return {}
    if latents is None or len(latents) != len(profiled):
        return {}
    return {s: latents[i] for i, s in enumerate(profiled) if s in seeds}


def _profile_matches(ws: Any, row: Any, config: dict, spec: FullImageSpec) -> bool:
    made = (
        normalise_prompt(row.prompt),
        config.get("steps"),
        float(config.get("guidance_scale", -1.0)),
        config.get("height"),
        config.get("width"),
    )
    wanted = (spec.prompt, spec.steps, spec.guidance_scale, spec.height, spec.width)
    if made != wanted:
        return False
    return ws.catalog.get_base_model(row.base_model_id).sha256 == spec.base_sha256


def _kept_latents(ws: Any, profile_id: str, spec: FullImageSpec, seed: int) -> torch.Tensor | None:
    """A kept file's latents when it is whole and was made for ``spec`` and ``seed``."""
    name = full_image_object(profile_id, seed)
    try:
        data = ws.store.get_bytes(name)
    except ObjectNotFoundError:
        return None
    try:
        tensors = load_tensors(data)
        meta = _metadata(data)
        tensor = tensors["latents"]
        wanted = json.dumps(asdict(spec), sort_keys=True)
        if meta.get("spec") != wanted or meta.get("seed") != str(seed):
            return None
        if meta.get("latents_sha256") != _tensor_sha256(tensor):
            raise InvalidInputError("latents do not match their sha256")
    except (SafetensorError, InvalidInputError, KeyError, ValueError) as exc:
        log.warning("%s is not usable (%s): the full model generates it again", name, exc)
        return None
    return tensor


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors ``data`` (its JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__") or {}


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()
