"""The doctor's checks: one function per check, each returning a :class:`Check`.

The checks of this machine (versions, device, capacity, thresholds, built-in models) are
here, those of the services (database, store, farm settings, broker) in
:mod:`~fragjobs.doctor.services`; :func:`run_checks` runs them all, each under a time limit.
Heavy modules (torch, diffusers) are imported inside the checks that need them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from fragjobs.config import Settings
from fragjobs.doctor.outcome import FAIL, OK, WARN, Check, gib, one_line
from fragjobs.doctor.services import (
    check_broker,
    check_database,
    check_farm_settings,
    check_store,
    recorded_ids,
)
from fragjobs.errors import FragjobsError

FREE_MEMORY_SHARE = 0.8
"""The memory budget without ``FRAGJOBS_MEMORY_BUDGET_MB``: free memory × this."""
HASHED_SEEDED_BYTES = 256 * 2**20
"""A seeded built-in is built and hashed here only when its weights are at most this big."""
_REQUIRED_DISTRIBUTIONS = ("torch", "diffusers", "transformers")
T = TypeVar("T")


def check_versions(settings: Settings, *, farm: bool) -> Check:
    """Python and the installed torch, diffusers, transformers and celery (when installed).

    Read from the installed distributions' metadata, so nothing heavy is imported.
    """
    import platform

    found, missing = [f"Python {platform.python_version()}"], []
    for name in (*_REQUIRED_DISTRIBUTIONS, "celery"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            if name in _REQUIRED_DISTRIBUTIONS or farm:
                missing.append(name)
    if missing:
        extra = "'fragjobs[farm]'" if missing == ["celery"] else "fragjobs"
        return Check(
            "versions",
            FAIL,
            f"{', '.join(found)}; missing: {', '.join(missing)}",
            f"pip install {extra}",
        )
    return Check("versions", OK, ", ".join(found))


def _device_memory(settings: Settings) -> tuple[str, int, int]:
    """(the device ``FRAGJOBS_DEVICE`` resolves to, its free bytes, its total bytes).

    Raises:
        ConfigError: this machine has no such device.
    """
    import psutil
    import torch

    from fragjobs.base_models import resolve_device

    device = resolve_device(settings.device)
    if device.type == "cuda":
        index = device.index or 0
        free, total = torch.cuda.mem_get_info(index)
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})", free, total
    memory = psutil.virtual_memory()
    return device.type, memory.available, memory.total


def check_device(settings: Settings) -> Check:
    """The device ``FRAGJOBS_DEVICE`` resolves to and its free memory.

    CUDA missing is fine on ``auto`` or ``cpu`` and a failure when ``FRAGJOBS_DEVICE`` names
    a CUDA (or MPS) device.
    """
    import torch

    try:
        label, free, total = _device_memory(settings)
    except FragjobsError as exc:
        return Check(
            "device",
            FAIL,
            one_line(exc),
            "set FRAGJOBS_DEVICE=auto (or cpu), or install a torch build for this device",
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1:
        each = (torch.cuda.mem_get_info(i) for i in range(gpus))
        seen = ", ".join(f"cuda:{i} {gib(free)} free" for i, (free, _) in enumerate(each))
    else:
        seen = f"{gpus} CUDA device visible" if gpus else "no CUDA device"
    seen += f" (torch {torch.__version__})"
    return Check(
        "device",
        OK,
        f"{label}: {gib(free)} free of {gib(total)}; FRAGJOBS_DEVICE={settings.device}; {seen}",
    )


def check_capacity(settings: Settings) -> Check:
    """The largest built-in model and batch that fit the memory budget (estimated).

    The budget is ``FRAGJOBS_MEMORY_BUDGET_MB`` when set, else the device's free memory ×
    :data:`FREE_MEMORY_SHARE`. It fails (needed) when the default model, if a built-in, does
    not fit one image.
    """
    from fragjobs.doctor.estimates import builtin_footprints

    try:
        label, free, _ = _device_memory(settings)
    except FragjobsError as exc:
        return Check("capacity", FAIL, f"no device to measure: {one_line(exc)}", "see device")
    if settings.memory_budget_mb is not None:
        budget, source = settings.memory_budget_mb * 2**20, "FRAGJOBS_MEMORY_BUDGET_MB"
    else:
        budget, source = free * FREE_MEMORY_SHARE, f"free × {FREE_MEMORY_SHARE}"
    footprints = builtin_footprints()
    batches = {f.name: f.largest_batch(budget) for f in footprints}
    fitting = [f for f in footprints if batches[f.name] > 0]
    each = ", ".join(f"{f.name} ≤ {batches[f.name]}" for f in reversed(footprints))
    head = f"{label}: budget {gib(budget)} ({source})"
    if fitting:
        largest = fitting[-1]
        detail = (
            f"{head}: largest built-in that fits is {largest.name}, batch ≤ "
            f"{batches[largest.name]} (estimated: {gib(largest.weight_bytes)} weights + "
            f"{largest.per_image_bytes / 2**20:.0f} MiB per {largest.height}×{largest.width} "
            f"image); batches: {each}"
        )
    else:
        detail = f"{head}: no built-in model fits one image (estimated)"
    default = settings.default_model
    if default in batches and batches[default] == 0:
        return Check(
            "capacity",
            FAIL,
            f"{detail}; the default model {default} does not fit",
            "free device memory, raise FRAGJOBS_MEMORY_BUDGET_MB, or set "
            "FRAGJOBS_DEFAULT_MODEL to a smaller model",
        )
    return Check("capacity", OK, detail)


def check_thresholds(settings: Settings) -> Check:
    """The quality gate's thresholds file is valid (as the chain reads it)."""
    from importlib.resources import files

    from fragjobs.validation.gate import load_thresholds

    path = settings.thresholds_path
    shown = str(path) if path is not None else "the packaged thresholds.yaml"
    try:
        thresholds = load_thresholds(path or Path(str(files("fragjobs") / "thresholds.yaml")))
    except FragjobsError as exc:
        return Check(
            "thresholds",
            FAIL,
            one_line(exc),
            "correct the file, or unset FRAGJOBS_THRESHOLDS_PATH to use the packaged one",
        )
    return Check(
        "thresholds",
        OK,
        f"{shown}: ssim_min {thresholds.ssim_min}, lpips_max {thresholds.lpips_max}, "
        f"required {', '.join(thresholds.required_metrics)}",
    )


# -- built-in models -------------------------------------------------------------------------


def check_builtin_model(name: str, settings: Settings, recorded: dict[str, str]) -> Check:
    """A built-in model's hash: shipped files against their recorded sha256s, and its id
    against the one the catalog recorded for it (fragments made with another id do not apply
    here)."""
    from fragjobs.base_identity import hash_weight_files
    from fragjobs.base_models import load_base
    from fragjobs.builtin import BUILTINS
    from fragjobs.builtin.configs import verify_shipped_weights
    from fragjobs.doctor.estimates import footprint

    spec, check_name = BUILTINS[name], f"model {name}"
    needed = name == settings.default_model
    try:
        if spec.folder is not None:
            root = spec.folder.parent
            listed = root / "weights.sha256.json"
            if not listed.is_file():
                model_id = hash_weight_files(spec.folder, name)
                return Check(
                    check_name,
                    WARN,
                    f"shipped files have no recorded sha256s to compare; id {model_id[:16]}",
                    "reinstall fragjobs",
                    needed,
                )
            verify_shipped_weights(root)
            model_id = hash_weight_files(spec.folder, name)
            found = f"shipped files match {listed.name}; id {model_id[:16]}"
        else:
            weights = footprint(name).weight_bytes
            if weights > HASHED_SEEDED_BYTES:
                return Check(
                    check_name,
                    OK,
                    f"seeded weights built in code, nothing shipped to check; id not computed "
                    f"here ({gib(weights)} of weights: it is computed on first load)",
                    needed=needed,
                )
            model_id = load_base(name, device="cpu", settings=settings).info.sha256
            found = f"seeded weights built in code, nothing shipped to check; id {model_id[:16]}"
    except FragjobsError as exc:
        return Check(check_name, FAIL, one_line(exc), "reinstall fragjobs", needed)
    known = recorded.get(f"builtin:{name}")
    if known is not None and known != model_id:
        return Check(
            check_name,
            WARN,
            f"{found}, but the catalog recorded {known[:16]}: fragments of {name} made there "
            "do not apply here",
            "use the same torch and diffusers versions as the machines that made them",
            needed=False,
        )
    found += " (as the catalog records)" if known else ""
    return Check(check_name, OK, found, None, needed)


# -- running them ----------------------------------------------------------------------------


def _within(limit_s: float, run: Callable[[], T]) -> T:
    """``run()`` in a thread given ``limit_s`` seconds: its result or its exception.

    Raises:
        TimeoutError: it did not finish in time (the thread is left to end on its own).
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(run())
        except Exception as exc:  # a doctor reports every failure, whatever its type
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    if outcome:
        return outcome[0]
    if failure:
        raise failure[0]
    raise TimeoutError(f"no answer within {limit_s:.0f} s")


def _timed(name: str, limit_s: float, needed: bool, run: Callable[[], Check]) -> Check:
    """``run()`` within ``limit_s`` seconds; one that raises or overruns fails (``needed``
    as given) instead of stopping the doctor."""
    try:
        return _within(limit_s, run)
    except TimeoutError as exc:
        return Check(name, FAIL, str(exc), "see what it waits for (run with -v)", needed)
    except Exception as exc:  # a doctor reports every failure, whatever its type
        return Check(name, FAIL, one_line(exc), "run with -v for details", needed)


def run_checks(settings: Settings, *, farm: bool) -> list[Check]:
    """Run every check, in order, each under its own time limit; return them all.

    Args:
        settings: the setup to check.
        farm: include the farm's checks (its settings, the broker); workers pass True.
    """
    checks = [
        _timed("versions", 30, True, lambda: check_versions(settings, farm=farm)),
        _timed("device", 120, True, lambda: check_device(settings)),
        _timed("capacity", 120, True, lambda: check_capacity(settings)),
        _timed("database", 20, True, lambda: check_database(settings)),
        _timed("store", 30, True, lambda: check_store(settings)),
        _timed("thresholds", 10, True, lambda: check_thresholds(settings)),
    ]
    if farm:
        checks.append(_timed("farm settings", 10, True, lambda: check_farm_settings(settings)))
        checks.append(_timed("broker", 20, True, lambda: check_broker(settings)))
    from fragjobs.builtin import BUILTINS

    try:
        recorded = _within(20, lambda: recorded_ids(settings))
    except Exception:  # the database check says what is wrong with the database
        recorded = {}
    for name in BUILTINS:
        checks.append(
            _timed(
                f"model {name}",
                120,
                name == settings.default_model,
                lambda name=name: check_builtin_model(name, settings, recorded),
            )
        )
    return checks
