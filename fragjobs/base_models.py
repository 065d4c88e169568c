"""Load a diffusers text-to-image pipeline and give it an identity.

A base model is named by a built-in name (``tiny-sd``, ``sd15-shape``, ``tiny-sdxl``, …), a
local diffusers folder (one with ``model_index.json``) or a hub id (only when the hub is
reachable), of a supported pipeline class (:mod:`fragjobs.families`: SD 1.x/2.x and
SDXL; any other class is refused before its weights are read). Its id is
a sha256 over its weights plus its name (DESIGN §3):

* a folder: every weight file (``*.safetensors``, ``*.bin``, ``*.ckpt``), sorted by relative
  path, streamed; cached per (path, size, mtime) in ``<data_dir>/base_hashes.json``;
* a built-in: every tensor of every component's ``state_dict`` (sorted by name; name, dtype,
  shape and bytes), cached per (name, torch version, diffusers version).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fragjobs.builtin import BUILTINS
from fragjobs.builtin.configs import verify_shipped_weights
from fragjobs.builtin.streaming import Selection, build_keeping, unet_layout
from fragjobs.config import Settings, get_settings
from fragjobs.errors import ConfigError, InvalidInputError, UnknownModelError
from fragjobs.families import denoiser, family_of, family_of_class

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "vae")
_BASE_ATTR = "_fragjobs_base"


@dataclass(frozen=True)
class BaseModelInfo:
    """Who a pipeline is: ``name`` (as given), ``sha256`` (its id) and ``source``."""

    name: str
    sha256: str
    source: str
    height: int
    width: int
    default_steps: int
    default_guidance: float = 7.5
    clip_path: str | None = None  # a matching local CLIPModel folder, when one ships


@dataclass
class LoadedBase:
    """A loaded pipeline together with its identity."""

    pipe: Any
    info: BaseModelInfo


def available_models(settings: Settings | None = None) -> list[str]:
    """Built-in names plus diffusers folders under ``<data_dir>/models``."""
    settings = settings or get_settings()
    names = sorted(BUILTINS)
    models_dir = settings.data_dir / "models"
    if models_dir.is_dir():
        names += sorted(str(p) for p in models_dir.iterdir() if (p / "model_index.json").is_file())
    return names


UnetReader = Callable[[Mapping[str, Selection]], dict[str, torch.Tensor]]
"""Reads base UNet tensors: ``{state-dict name: selection}`` → ``{name: tensor}`` (names the
base lacks are left out; a selection keeps only those rows/columns)."""

UnetBuilder = Callable[[BaseModelInfo, Any, UnetReader], Any]
"""Builds the UNet a pipeline gets instead of the base's: called with the base's identity, the
base UNet on the meta device (config and structure, no weights) and a reader of its tensors."""


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
        sha = _cached_hash(
            _builtin_hash_key(model), settings, lambda: _hash_state_dicts(pipe, model)
        )
        info = _builtin_info(model, sha)
    elif model in BUILTINS:
        spec = BUILTINS[model]
        if unet is None:
            pipe = spec.build()
        else:
            verify_shipped_weights(spec.folder.parent)
            pipe = _load_folder_with_unet(spec.folder, settings, unet, name=model)
        info = _builtin_info(
            model, _folder_info(spec.folder, settings, _image_size(pipe), name=model).sha256
        )
    elif Path(model).expanduser().is_dir():
        pipe, info = _load_folder(Path(model).expanduser().resolve(), settings, unet)
    elif Path(model).suffix or model.startswith((".", "/", "~")):
        raise UnknownModelError(_unknown_message(model, settings))
    else:
        pipe, info = _load_hub(model, settings, unet)
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


def model_source(source: str, name: str) -> str:
    """What :func:`load_base` takes to load a base again from its recorded ``source``.

    ``builtin:NAME`` → ``NAME``, ``folder:/abs/path`` → the path, ``hub:ID`` → ``ID``,
    ``store:SHA256`` → ``store:SHA256`` unchanged (a base in the shared store, fetched into the
    node cache by :func:`fragjobs.chain.bases.base`); anything else → ``name``. A folder's
    catalog name is only its last path part, so a chain step that reloads a base must use
    this, not the name.
    """
    kind, _, where = (source or "").partition(":")
    if kind == "store" and where:
        return source
    if kind in ("builtin", "folder", "hub") and where:
        return where
    return name


def folder_sha256(folder: Path, name: str, settings: Settings | None = None) -> str:
    """The sha256 of the diffusers folder ``folder`` as base ``name``, without loading it.

    The same value, and the same cache entry, as :func:`load_base` computes for the folder
    when ``name`` is the folder's own name.

    Raises:
        UnknownModelError: the folder holds no weight files.
    """
    settings = settings or get_settings()
    stats = [
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    ]
    return _cached_hash(
        ("folder", str(folder), name, stats), settings, lambda: hash_weight_files(folder, name)
    )


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
        info = _folder_info(Path(path).resolve(), settings or get_settings(), _image_size(pipe))
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


def hash_weight_files(folder: Path, name: str) -> str:
    """sha256 over the folder's weight files (sorted relative paths, streamed) plus ``name``."""
    digest = hashlib.sha256(f"fragjobs-base-v1:{name}\n".encode())
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise UnknownModelError(f"{folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\n".encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _hash_state_dicts(pipe: Any, name: str) -> str:
    digest = hashlib.sha256(f"fragjobs-base-v1:{name}\n".encode())
    for component in _COMPONENTS:
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for key, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{component}.{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _cached_hash(cache_key: tuple, settings: Settings, compute) -> str:
    path = settings.data_dir / "base_hashes.json"
    key = json.dumps(cache_key)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    value = compute()
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation; a read-only data dir only costs a re-hash
    return value


def _folder_info(
    folder: Path, settings: Settings, size: int, name: str | None = None
) -> BaseModelInfo:
    """A folder's identity; ``size``: its default image side (:func:`_image_size`)."""
    stats = [
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    ]
    name = name or folder.name
    sha = _cached_hash(
        ("folder", str(folder), name, stats), settings, lambda: hash_weight_files(folder, name)
    )
    return BaseModelInfo(name, sha, f"folder:{folder}", size, size, 20)


def _load_folder(
    folder: Path, settings: Settings, unet: UnetBuilder | None = None
) -> tuple[Any, BaseModelInfo]:
    from diffusers import DiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise UnknownModelError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json). "
            + _unknown_message(str(folder), settings)
        )
    _check_pipeline_class(folder)
    try:
        if unet is None:
            pipe = DiffusionPipeline.from_pretrained(
                folder, local_files_only=True, low_cpu_mem_usage=True
            )
        else:
            pipe = _load_folder_with_unet(folder, settings, unet)
    except (OSError, ValueError) as exc:
        raise UnknownModelError(f"cannot load pipeline folder {folder}: {exc}") from exc
    denoiser(pipe)  # refuses a pipeline without its family's denoiser
    return pipe, _folder_info(folder, settings, _image_size(pipe))


def _load_hub(
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
            _unknown_message(model_id, settings) + f" (hub lookup failed: {type(exc).__name__})"
        ) from exc
    pipe, info = _load_folder(folder, settings, unet)
    return pipe, BaseModelInfo(
        model_id, info.sha256, f"hub:{model_id}", info.height, info.width, info.default_steps
    )


def _load_folder_with_unet(
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
    info = _folder_info(folder, settings, size, name=name)
    built = build(info, skeleton, _safetensors_reader(folder / family.denoiser))
    return diffusers.DiffusionPipeline.from_pretrained(
        folder, **{family.denoiser: built}, local_files_only=True, low_cpu_mem_usage=True
    )


def _safetensors_reader(folder: Path) -> UnetReader:
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


def _build_builtin_with_unet(
    model: str, settings: Settings, build: UnetBuilder
) -> tuple[Any, BaseModelInfo]:
    """A seeded built-in whose UNet is made by ``build``: the built-in runs once with empty
    weights (the UNet's structure), then for real keeping only the UNet tensors read."""
    spec = BUILTINS[model]
    sha = _cached_hash(
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


def _check_pipeline_class(folder: Path) -> None:
    """Refuse a folder of an unsupported pipeline class before any weight is read."""
    try:
        class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise UnknownModelError(f"{folder}/model_index.json is unreadable: {exc}") from exc
    family_of_class(class_name, str(folder))


def _image_size(pipe: Any) -> int:
    """A pipeline's default image side: its denoiser's sample size times the VAE's scale."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    return int(getattr(denoiser(pipe).config, "sample_size", 64)) * scale


def _unknown_message(model: str, settings: Settings) -> str:
    return (
        f"unknown model {model!r}: not a built-in, a local diffusers folder or a reachable hub id."
        f" Available: {', '.join(available_models(settings))}"
    )


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


@torch.no_grad()
def prompt_embedding(pipe: Any, prompt: str) -> torch.Tensor:
    """The model's own text embedding of ``prompt`` (pooled, L2-normalised, float32, CPU).

    Used to find a fragment made for a similar prompt (``cosine_clip_text``) and to say how
    close a paraphrase is. Which encoder gives it is the pipeline family's choice
    (:mod:`fragjobs.families`): SD's text encoder, SDXL's second (projected) one, the
    mean of PixArt's T5 states.
    """
    family = family_of(pipe)
    tokenizer = getattr(pipe, family.pooled_tokenizer)
    encoder = getattr(pipe, family.pooled_encoder)
    tokens = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    output = encoder(tokens.input_ids.to(encoder.device))
    pooled = getattr(output, family.pooled_output) if family.pooled_output else None
    if pooled is None:  # no pooled output (T5): the mean of the prompt's token states
        mask = tokens.attention_mask.to(encoder.device).unsqueeze(-1).float()
        pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    pooled = pooled[0].float().cpu()
    return pooled / pooled.norm().clamp_min(1e-12)


def truncation_note(pipe: Any, prompt: str) -> str | None:
    """Why the pipeline's tokenizer cuts ``prompt`` short, or None when it reads all of it.

    Text encoders read a fixed number of tokens (CLIP: 77, start and end included); a longer
    prompt is truncated silently by diffusers. The note says how much is read.
    """
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int) or limit > 100_000:
        return None
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= limit:
        return None
    kept = tokenizer.decode(ids[: limit - 1], skip_special_tokens=True).strip()
    return (
        f"the prompt is {len(ids)} tokens long; the text encoder reads {limit}: "
        f"only {kept!r} shapes the images"
    )
