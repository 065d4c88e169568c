"""Flower on the farm's broker, never without a login."""

from __future__ import annotations

import sys

from fragjobs.errors import ConfigError
from fragjobs.farm.launcher import farm_env
from fragjobs.farm.settings import FarmSettings


def flower_command(port: int = 5555, address: str = "127.0.0.1") -> list[str]:
    """The ``celery -A tasks.app flower`` command line (this interpreter's celery)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.app",
        "flower",
        f"--port={int(port)}",
        f"--address={address}",
    ]


def flower_env(settings: FarmSettings, base: dict[str, str] | None = None) -> dict[str, str]:
    """Flower's environment: :func:`farm_env` plus ``FLOWER_BASIC_AUTH=user:password``.

    The login travels in the environment, not on the command line, where ``ps`` shows it.

    Raises:
        ConfigError: ``FRAGJOBS_FLOWER_USER`` / ``FRAGJOBS_FLOWER_PASSWORD`` unset, or
            a value Flower cannot take (``:`` in the user, ``,`` in either).
    """
    user = settings.flower_user
    password = settings.flower_password.get_secret_value() if settings.flower_password else ""
    if not user or not password:
        raise ConfigError(
            "set FRAGJOBS_FLOWER_USER and FRAGJOBS_FLOWER_PASSWORD: Flower can revoke and "
            "terminate tasks, so fragjobs never starts it without a login"
        )
    if ":" in user or "," in user or "," in password:
        raise ConfigError(
            "FRAGJOBS_FLOWER_USER may not contain ':' or ',', FRAGJOBS_FLOWER_PASSWORD not ','"
        )
    env = farm_env(base)
    env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    return env
