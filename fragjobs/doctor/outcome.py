"""The doctor's outcome of one check (:class:`Check`) and what the checks share.

A check is *needed* when the configured mode cannot work without it: the broker only on the
farm, CUDA only when ``FRAGJOBS_DEVICE`` asks for it, a built-in model's files only when it
is ``FRAGJOBS_DEFAULT_MODEL``. :func:`exit_status` is 1 when a needed check fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from fragjobs.config import Settings
from fragjobs.errors import FragjobsError

OK, WARN, FAIL = "OK", "WARN", "FAIL"
Status = Literal["OK", "WARN", "FAIL"]
CONNECT_TIMEOUT_S = 3
"""Seconds a database, broker or S3 endpoint gets to accept a connection."""
_GIB = 2**30


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


def one_line(exc: BaseException) -> str:
    """The exception on one line; its type named unless it is one of fragjobs' own."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, FragjobsError) else f"{type(exc).__name__}: {text}"


def gib(n: float) -> str:
    """Bytes as ``1.5 GiB``."""
    return f"{n / _GIB:.1f} GiB"
