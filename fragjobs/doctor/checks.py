"""The doctor's checks: one function per check, each returning a :class:`Check`.

Every check runs under a time limit (:func:`run_checks`), and a server that does not answer
fails its check in seconds (database and broker ``connect_timeout``
:data:`CONNECT_TIMEOUT_S`, S3 connect and read timeouts, one attempt). Heavy modules (torch,
diffusers, boto3, redis) are imported inside the checks that need them.

A check is *needed* when the configured mode cannot work without it: the broker only on the
farm, CUDA only when ``FRAGJOBS_DEVICE`` asks for it, a built-in model's files only when it
is ``FRAGJOBS_DEFAULT_MODEL``. :func:`exit_status` is 1 when a needed check fails.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from fragjobs.config import Settings
from fragjobs.errors import FragjobsError

OK, WARN, FAIL = "OK", "WARN", "FAIL"
Status = Literal["OK", "WARN", "FAIL"]
CONNECT_TIMEOUT_S = 3
"""Seconds a database, broker or S3 endpoint gets to accept a connection."""
PROBE_PREFIX = "doctor-probe-"
"""Names of the store's probe objects, at its root (fragjobs' own objects are in folders)."""
FREE_MEMORY_SHARE = 0.8
"""The memory budget without ``FRAGJOBS_MEMORY_BUDGET_MB``: free memory × this."""
HASHED_SEEDED_BYTES = 256 * 2**20
"""A seeded built-in is built and hashed here only when its weights are at most this big."""
_REQUIRED_DISTRIBUTIONS = ("torch", "diffusers", "transformers")
_GIB = 2**30
T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    Attributes:
        name: what was checked (``database``, ``store``, ``model shapes``, ...).
        status: ``OK``, ``WARN`` or ``FAIL``.
        detail: what was found, on one line.
        fix: what to do about a WARN or FAIL (None when there is nothing to do).
        needed: whether the configured mode needs this to work.
    """

    name: str
    status: Status
    detail: str
    fix: str | None = None
    needed: bool = True

    @property
    def broken(self) -> bool:
        """A needed check that failed: the configured mode cannot work."""
        return self.status == FAIL and self.needed

    def line(self) -> str:
        """``FAIL store            <detail> — fix: <fix>`` (the fix only when not OK)."""
        text = f"{self.status:<4} {self.name:<16} {self.detail}"
        if self.status != OK and not self.needed:
            text += " (not needed by this setup)"
        if self.status != OK and self.fix:
            text += f" — fix: {self.fix}"
        return text

    def as_dict(self) -> dict[str, Any]:
        """The check as a JSON-ready dict."""
        return asdict(self)


def exit_status(checks: list[Check]) -> int:
    """1 when a needed check failed, else 0."""
    return 1 if any(check.broken for check in checks) else 0


def farm_configured(settings: Settings) -> bool:
    """Whether this setup uses the farm: ``FRAGJOBS_BROKER_URL`` is set (environment or the
    ``.env`` file named by ``FRAGJOBS_ENV_FILE``). Workers run the doctor with the farm's
    checks whatever this says."""
    return "broker_url" in settings.model_fields_set


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, FragjobsError) else f"{type(exc).__name__}: {text}"


def _gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB"


# -- versions and devices --------------------------------------------------------------------


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
            _one_line(exc),
            "set FRAGJOBS_DEVICE=auto (or cpu), or install a torch build for this device",
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1:
        each = (torch.cuda.mem_get_info(i) for i in range(gpus))
        seen = ", ".join(f"cuda:{i} {_gib(free)} free" for i, (free, _) in enumerate(each))
    else:
        seen = f"{gpus} CUDA device visible" if gpus else "no CUDA device"
    seen += f" (torch {torch.__version__})"
    return Check(
        "device",
        OK,
        f"{label}: {_gib(free)} free of {_gib(total)}; FRAGJOBS_DEVICE={settings.device}; {seen}",
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
        return Check("capacity", FAIL, f"no device to measure: {_one_line(exc)}", "see device")
    if settings.memory_budget_mb is not None:
        budget, source = settings.memory_budget_mb * 2**20, "FRAGJOBS_MEMORY_BUDGET_MB"
    else:
        budget, source = free * FREE_MEMORY_SHARE, f"free × {FREE_MEMORY_SHARE}"
    footprints = builtin_footprints()
    batches = {f.name: f.largest_batch(budget) for f in footprints}
    fitting = [f for f in footprints if batches[f.name] > 0]
    each = ", ".join(f"{f.name} ≤ {batches[f.name]}" for f in reversed(footprints))
    head = f"{label}: budget {_gib(budget)} ({source})"
    if fitting:
        largest = fitting[-1]
        detail = (
            f"{head}: largest built-in that fits is {largest.name}, batch ≤ "
            f"{batches[largest.name]} (estimated: {_gib(largest.weight_bytes)} weights + "
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


# -- catalog, store, thresholds --------------------------------------------------------------


def _with_connect_timeout(url: str) -> str:
    """``url`` with ``connect_timeout`` for a PostgreSQL server (unless it has one)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or "connect_timeout" in parsed.query:
        return url
    return parsed.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_S)}).render_as_string(
        hide_password=False
    )


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL naming one; None for any other database."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if database.startswith("file:") else Path(database).expanduser()


def check_database(settings: Settings) -> Check:
    """The catalog database answers and is at this code's schema revision.

    The embedded SQLite file is created and upgraded by any command that opens it, so a
    missing or older one is only reported; a server database (PostgreSQL) behind this code's
    revision fails with the command that fixes it.
    """
    from fragjobs.catalog import UPGRADE_COMMAND, current_revision, head_revision, mask_url

    url = probe = settings.resolved_database_url
    try:
        shown, head = mask_url(url), head_revision()
        sqlite = _sqlite_file(url)
        if sqlite is not None and not sqlite.is_file():
            return Check(
                "database",
                OK,
                f"{shown} not created yet: the embedded catalog is made at schema {head} on "
                "first use",
            )
        probe = _with_connect_timeout(url)
        current = current_revision(probe)
    except FragjobsError as exc:
        return Check(
            "database",
            FAIL,
            _one_line(exc).replace(mask_url(probe), shown) if probe != url else _one_line(exc),
            "start the database server or correct FRAGJOBS_DATABASE_URL",
        )
    if current == head:
        return Check("database", OK, f"{shown} at schema {head}")
    state = "has no fragjobs schema" if current is None else f"is at schema {current}"
    detail = f"{shown} {state}, this fragjobs needs {head}"
    fix = f"run: {UPGRADE_COMMAND}"
    if sqlite is not None:
        return Check(
            "database", WARN, f"{detail}; upgraded when a command opens it", fix, needed=False
        )
    return Check("database", FAIL, detail, fix)


def check_store(settings: Settings) -> Check:
    """A probe object is written, read back, its sha256 checked, and deleted.

    The probe is named ``doctor-probe-<random>`` at the store's root; it is deleted whatever
    happens once written, and the check fails if it is still there afterwards.
    """
    from fragjobs.storage import open_store

    url = settings.resolved_storage_url
    s3 = urlsplit(url).scheme.lower() == "s3"
    fix = (
        "check that the bucket of FRAGJOBS_STORAGE_URL exists (fragjobs never creates "
        "buckets), FRAGJOBS_S3_ENDPOINT_URL and the AWS credentials"
        if s3
        else "point FRAGJOBS_STORAGE_URL (or FRAGJOBS_DATA_DIR) at a folder this user can write"
    )
    kwargs: dict[str, Any] = (
        {
            "settings": settings,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": 2 * CONNECT_TIMEOUT_S,
            "max_attempts": 1,
        }
        if s3
        else {}
    )
    data = b"fragjobs doctor probe\n" + os.urandom(32)
    expected = hashlib.sha256(data).hexdigest()
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        store = open_store(url, **kwargs)
        written = store.put_bytes(name, data)
        try:
            read = store.get_bytes(name, expected_sha256=expected)
        finally:
            store.delete(name)
        left = store.exists(name)
    except FragjobsError as exc:
        return Check("store", FAIL, _one_line(exc), fix)
    if written.sha256 != expected or read != data:
        return Check("store", FAIL, f"{store.url}: the probe object came back changed", fix)
    if left:
        return Check("store", FAIL, f"{store.url}: the probe object {name} was not deleted", fix)
    return Check("store", OK, f"{store.url}: probe object written, read, sha256 checked, deleted")


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
            _one_line(exc),
            "correct the file, or unset FRAGJOBS_THRESHOLDS_PATH to use the packaged one",
        )
    return Check(
        "thresholds",
        OK,
        f"{shown}: ssim_min {thresholds.ssim_min}, lpips_max {thresholds.lpips_max}, "
        f"required {', '.join(thresholds.required_metrics)}",
    )


# -- built-in models -------------------------------------------------------------------------


def _recorded_ids(settings: Settings) -> dict[str, str]:
    """The catalog's base-model ids by source (``builtin:NAME``); empty when it cannot say
    (the database check reports why)."""
    from fragjobs.catalog import Catalog

    sqlite = _sqlite_file(settings.resolved_database_url)
    if sqlite is not None and not sqlite.is_file():
        return {}
    try:
        catalog = Catalog(_with_connect_timeout(settings.resolved_database_url))
    except FragjobsError:
        return {}
    try:
        return {base.source: base.sha256 for base in catalog.list_base_models()}
    except FragjobsError:
        return {}
    finally:
        catalog.dispose()


def check_builtin_model(name: str, settings: Settings, recorded: dict[str, str]) -> Check:
    """A built-in model's hash: shipped files against their recorded sha256s, and its id
    against the one the catalog recorded for it (fragments made with another id do not apply
    here)."""
    from fragjobs.base_models import hash_weight_files, load_base
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
                    f"here ({_gib(weights)} of weights: it is computed on first load)",
                    needed=needed,
                )
            model_id = load_base(name, device="cpu", settings=settings).info.sha256
            found = f"seeded weights built in code, nothing shipped to check; id {model_id[:16]}"
    except FragjobsError as exc:
        return Check(check_name, FAIL, _one_line(exc), "reinstall fragjobs", needed)
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


# -- the farm --------------------------------------------------------------------------------


def check_farm_settings(settings: Settings) -> Check:
    """The farm's own settings load (task limits, no placeholder secrets)."""
    from fragjobs.farm.doctor_checks import check_farm_settings as farm_settings

    try:
        return Check("farm settings", OK, farm_settings())
    except FragjobsError as exc:
        return Check("farm settings", FAIL, _one_line(exc), "correct the FRAGJOBS_* variable")


def check_broker(settings: Settings) -> Check:
    """The broker answers within :data:`CONNECT_TIMEOUT_S`."""
    from fragjobs.farm.doctor_checks import ping_broker

    try:
        return Check("broker", OK, ping_broker(settings.broker_url, CONNECT_TIMEOUT_S))
    except FragjobsError as exc:
        return Check(
            "broker",
            FAIL,
            _one_line(exc),
            "start the broker (Redis) or correct FRAGJOBS_BROKER_URL",
        )


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
        return Check(name, FAIL, _one_line(exc), "run with -v for details", needed)


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
        recorded = _within(20, lambda: _recorded_ids(settings))
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
