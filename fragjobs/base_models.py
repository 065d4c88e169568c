"""Load a diffusers text-to-image pipeline and give it an identity.

A base model is named by a built-in name (``tiny-sd``, ``sd15-shape``, ``tiny-sdxl``,
``tiny-pixart``, …), a local diffusers folder (one with ``model_index.json``) or a hub id (only
when the hub is reachable), of a supported pipeline family (:mod:`fragjobs.families`: SD
1.x/2.x, SDXL, PixArt-α; any other class is refused before its weights are read). Its id is a
sha256 over its weights plus its name (:mod:`fragjobs.base_identity`); folders and hub ids load
through :mod:`fragjobs.base_folders`, the seeded built-ins here.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fragjobs.base_folders import (
    UnetBuilder,
    image_size,
    load_folder,
    load_folder_with_denoiser,
    load_hub,
    unknown_message,
)
from fragjobs.base_identity import (
    BaseModelInfo,
    cached_hash,
    folder_info,
    hash_state_dicts,
)
from fragjobs.builtin import BUILTINS
from fragjobs.builtin.configs import verify_shipped_weights
from fragjobs.builtin.streaming import Selection, build_keeping, unet_layout
from fragjobs.config import Settings, get_settings
from fragjobs.errors import ConfigError, InvalidInputError, UnknownModelError
from fragjobs.families import family_of

_BASE_ATTR = "_fragjobs_base"


@dataclass
class LoadedBase:
    """A loaded pipeline together with its identity."""

    pipe: Any
    info: BaseModelInfo


def load_base(
    model: str,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    settings: Settings | None = None,
    unet: UnetBuilder | None = None,
) -> LoadedBase:
    """Load ``model`` (built-in name, local folder or hub id) and compute its identity.

    Args:
        unet: build the pipeline's UNet instead of loading the base's (see
            :data:`UnetBuilder`): the base UNet's weights are then never all in memory, only
            what the builder reads (a folder's from its safetensors files, a built-in's while
            its seeded build runs, :mod:`fragjobs.builtin.streaming`). The other components
            load as usual. ``fragjobs.extraction.load_fragment_pipeline`` uses it.

    Raises:
        InvalidInputError: ``model`` is not a non-empty string.
        UnknownModelError: nothing of that name exists; the message lists what does.
    """
    settings = settings or get_settings()
    if not isinstance(model, str) or not model.strip():
        raise InvalidInputError(f"model must be a non-empty string, got {model!r}")
    model = model.strip()
    _quiet_loading_bars()
    if model in BUILTINS and BUILTINS[model].folder is None and unet is not None:
        pipe, info = _build_builtin_with_unet(model, settings, unet)
    elif model in BUILTINS and BUILTINS[model].folder is None:
        pipe = BUILTINS[model].build()
        sha = cached_hash(_builtin_hash_key(model), settings, lambda: hash_state_dicts(pipe, model))
        info = _builtin_info(model, sha)
    elif model in BUILTINS:
        spec = BUILTINS[model]
        if unet is None:
            pipe = spec.build()
        else:
            verify_shipped_weights(spec.folder.parent)
            pipe = load_folder_with_denoiser(spec.folder, settings, unet, name=model)
        info = _builtin_info(
            model, folder_info(spec.folder, settings, image_size(pipe), name=model).sha256
        )
    elif Path(model).expanduser().is_dir():
        pipe, info = load_folder(Path(model).expanduser().resolve(), settings, unet)
    elif Path(model).suffix or model.startswith((".", "/", "~")):
        raise UnknownModelError(unknown_message(model, settings))
    else:
        pipe, info = load_hub(model, settings, unet)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(resolve_device(device or settings.device))
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    setattr(pipe, _BASE_ATTR, info)
    return LoadedBase(pipe, info)


def _quiet_loading_bars() -> None:
    """Diffusers' "Loading pipeline components" bar follows HF_HUB_DISABLE_PROGRESS_BARS,
    as transformers' and the hub's bars do (the command line sets it unless -v)."""
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()


def identify(pipe: Any, settings: Settings | None = None) -> BaseModelInfo:
    """The identity of a pipeline: the one recorded by ``load_base``, else its folder's hash.

    Raises:
        UnknownModelError: the pipeline was not loaded by fragjobs nor from a local folder.
    """
    info = getattr(pipe, _BASE_ATTR, None)
    if isinstance(info, BaseModelInfo):
        return info
    path = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    if path and Path(path).is_dir():
        info = folder_info(Path(path).resolve(), settings or get_settings(), image_size(pipe))
        setattr(pipe, _BASE_ATTR, info)
        return info
    raise UnknownModelError(
        "cannot identify this pipeline's base model: load it with fragjobs.load_base(...) "
        "or DiffusionPipeline.from_pretrained(<local folder>)"
    )


def resolve_device(device: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``.

    Raises:
        ConfigError: a device this machine does not have (``FRAGJOBS_DEVICE``).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"FRAGJOBS_DEVICE={device!r} is not a device: {exc}") from None
    if resolved.type == "cuda" and (
        not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(
            f"FRAGJOBS_DEVICE={device!r}: this machine has no such CUDA device "
            f"({torch.cuda.device_count()} visible); use auto or cpu"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"FRAGJOBS_DEVICE={device!r}: MPS is not available here; use cpu")
    return resolved


def _build_builtin_with_unet(
    model: str, settings: Settings, build: UnetBuilder
) -> tuple[Any, BaseModelInfo]:
    """A seeded built-in whose UNet is made by ``build``: the built-in runs once with empty
    weights (the UNet's structure), then for real keeping only the UNet tensors read."""
    spec = BUILTINS[model]
    sha = cached_hash(
        _builtin_hash_key(model), settings, lambda: _hash_builtin_elsewhere(model, settings)
    )
    info = _builtin_info(model, sha)
    layout = unet_layout(spec.build)
    built: dict[str, Any] = {}

    def read(wanted: Mapping[str, Selection]) -> dict[str, torch.Tensor]:
        built["pipe"], tensors = build_keeping(spec.build, layout, wanted)
        return tensors

    unet = build(info, layout.skeleton, read)
    pipe = built["pipe"] if "pipe" in built else build_keeping(spec.build, layout, {})[0]
    setattr(pipe, family_of(pipe).denoiser, unet)
    return pipe, info


def _hash_builtin_elsewhere(model: str, settings: Settings) -> str:
    """A built-in's id computed by a child process (it builds the whole model; this one must
    not), which leaves it in the hash cache of ``settings.data_dir``."""
    code = (
        "import sys; from pathlib import Path; from fragjobs.base_models import load_base; "
        "from fragjobs.config import Settings; "
        "print(load_base(sys.argv[1], device='cpu', "
        "settings=Settings(data_dir=Path(sys.argv[2]))).info.sha256)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, model, str(settings.data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"could not compute the id of built-in {model}: {tail[0]}")
    return done.stdout.strip().splitlines()[-1]


def _builtin_hash_key(model: str) -> tuple:
    return ("builtin", model, torch.__version__, _diffusers_version())


def _builtin_info(model: str, sha: str) -> BaseModelInfo:
    spec = BUILTINS[model]
    return BaseModelInfo(
        model,
        sha,
        f"builtin:{model}",
        spec.height,
        spec.width,
        spec.default_steps,
        spec.default_guidance,
        str(spec.clip_folder) if spec.clip_folder else None,
    )


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
