"""Loading a base from a diffusers folder or a hub id, whole or with its denoiser built apart.

A folder must be a pipeline of a supported family (:mod:`fragjobs.families`), checked from its
``model_index.json`` before any weight is read. :func:`load_folder_with_denoiser` gives the
pipeline a denoiser made by a builder from the folder's config and a reader of its safetensors
(tensor by tensor, row ranges when only some rows are kept): the lean fragment load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fragjobs.base_identity import BaseModelInfo, folder_info
from fragjobs.builtin import BUILTINS
from fragjobs.builtin.streaming import Selection
from fragjobs.config import Settings, get_settings
from fragjobs.errors import UnknownModelError
from fragjobs.families import denoiser, family_of_class

UnetReader = Callable[[Mapping[str, Selection]], dict[str, torch.Tensor]]
"""Reads base UNet tensors: ``{state-dict name: selection}`` → ``{name: tensor}`` (names the
base lacks are left out; a selection keeps only those rows/columns)."""

UnetBuilder = Callable[[BaseModelInfo, Any, UnetReader], Any]
"""Builds the UNet a pipeline gets instead of the base's: called with the base's identity, the
base UNet on the meta device (config and structure, no weights) and a reader of its tensors."""


def load_folder(
    folder: Path, settings: Settings, unet: UnetBuilder | None = None
) -> tuple[Any, BaseModelInfo]:
    from diffusers import DiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise UnknownModelError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json). "
            + unknown_message(str(folder), settings)
        )
    check_pipeline_class(folder)
    try:
        if unet is None:
            pipe = DiffusionPipeline.from_pretrained(
                folder, local_files_only=True, low_cpu_mem_usage=True
            )
        else:
            pipe = load_folder_with_denoiser(folder, settings, unet)
    except (OSError, ValueError) as exc:
        raise UnknownModelError(f"cannot load pipeline folder {folder}: {exc}") from exc
    denoiser(pipe)  # refuses a pipeline without its family's denoiser
    return pipe, folder_info(folder, settings, image_size(pipe))


def load_hub(
    model_id: str, settings: Settings, unet: UnetBuilder | None = None
) -> tuple[Any, BaseModelInfo]:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                model_id, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]
            )
        )
    except Exception as exc:  # the hub client raises many unrelated types when offline
        raise UnknownModelError(
            unknown_message(model_id, settings) + f" (hub lookup failed: {type(exc).__name__})"
        ) from exc
    pipe, info = load_folder(folder, settings, unet)
    return pipe, BaseModelInfo(
        model_id, info.sha256, f"hub:{model_id}", info.height, info.width, info.default_steps
    )


def load_folder_with_denoiser(
    folder: Path, settings: Settings, build: UnetBuilder, name: str | None = None
) -> Any:
    """A pipeline folder's components, its denoiser (the family's UNet or transformer) made
    by ``build`` from the folder's config and safetensors files (read tensor by tensor, never
    all at once)."""
    import diffusers
    from accelerate import init_empty_weights

    index = json.loads((folder / "model_index.json").read_text())
    family = family_of_class(index.get("_class_name"), str(folder))
    denoiser_class = getattr(diffusers, family.denoiser_class)
    config = denoiser_class.load_config(folder / family.denoiser)
    with init_empty_weights():
        skeleton = denoiser_class.from_config(config)
    vae = diffusers.AutoencoderKL.load_config(folder / "vae")
    size = int(config.get("sample_size") or 64) * 2 ** (len(vae["block_out_channels"]) - 1)
    info = folder_info(folder, settings, size, name=name)
    built = build(info, skeleton, safetensors_reader(folder / family.denoiser))
    return diffusers.DiffusionPipeline.from_pretrained(
        folder, **{family.denoiser: built}, local_files_only=True, low_cpu_mem_usage=True
    )


def safetensors_reader(folder: Path) -> UnetReader:
    """Reads a model folder's tensors from its safetensors file(s); a selection reads only
    the kept rows/columns' byte ranges."""
    from safetensors import safe_open

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    single = folder / "diffusion_pytorch_model.safetensors"
    if weight_map is None and not single.is_file():
        raise UnknownModelError(
            f"{folder} has no safetensors weights; a fragment is built from safetensors only"
        )

    def read(wanted: Mapping[str, Selection]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            path = single if weight_map is None else folder / weight_map.get(name, "")
            if weight_map is None or name in weight_map:
                by_file.setdefault(path, []).append(name)
        out = {}
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as fh:
                present = set(fh.keys())
                for name in names:
                    if name in present:
                        out[name] = _read_selected(fh, name, wanted[name])
        return out

    return read


def _read_selected(fh: Any, name: str, selection: Selection) -> torch.Tensor:
    if selection is None:
        return fh.get_tensor(name)
    dim, index = selection
    part = fh.get_slice(name)
    runs, start = [], 0
    values = index.tolist()
    for i in range(1, len(values) + 1):  # contiguous runs: one read each
        if i == len(values) or values[i] != values[i - 1] + 1:
            cut = [slice(None)] * len(part.get_shape())
            cut[dim] = slice(values[start], values[i - 1] + 1)
            runs.append(part[tuple(cut)])
            start = i
    return torch.cat(runs, dim=dim)


def check_pipeline_class(folder: Path) -> None:
    """Refuse a folder of an unsupported pipeline class before any weight is read."""
    try:
        class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise UnknownModelError(f"{folder}/model_index.json is unreadable: {exc}") from exc
    family_of_class(class_name, str(folder))


def image_size(pipe: Any) -> int:
    """A pipeline's default image side: its denoiser's sample size times the VAE's scale."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    return int(getattr(denoiser(pipe).config, "sample_size", 64)) * scale


def available_models(settings: Settings | None = None) -> list[str]:
    """Built-in names plus diffusers folders under ``<data_dir>/models``."""
    settings = settings or get_settings()
    names = sorted(BUILTINS)
    models_dir = settings.data_dir / "models"
    if models_dir.is_dir():
        names += sorted(str(p) for p in models_dir.iterdir() if (p / "model_index.json").is_file())
    return names


def unknown_message(model: str, settings: Settings) -> str:
    """The one line for a model name that is nothing fragjobs can load, with what exists."""
    return (
        f"unknown model {model!r}: not a built-in, a local diffusers folder or a reachable hub id."
        f" Available: {', '.join(available_models(settings))}"
    )
