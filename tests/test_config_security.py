"""fragjobs' own configuration and logs, locked down.

A ``.env`` file is read only from the path in ``FRAGJOBS_ENV_FILE``; the farm's settings
refuse the example files' placeholder secrets with one line naming the variable; ``-v`` shows
fragjobs' DEBUG messages but not the libraries' (``-vv`` does), and credentials are masked in
whatever is logged.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from fragjobs.config import Settings
from fragjobs.errors import ConfigError
from fragjobs.farm.settings import FarmSettings
from fragjobs.logging_setup import MASK, RedactingFilter, redact

SECRET_VARIABLES = (
    "FRAGJOBS_BROKER_URL",
    "FRAGJOBS_RESULT_BACKEND",
    "FRAGJOBS_DATABASE_URL",
    "FRAGJOBS_FLOWER_USER",
    "FRAGJOBS_FLOWER_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "FRAGJOBS_ENV_FILE",
)


@pytest.fixture(autouse=True)
def _no_secrets_from_outside(monkeypatch):
    for name in (*SECRET_VARIABLES, "FRAGJOBS_DEFAULT_MODEL", "FRAGJOBS_MAX_VARIANTS"):
        monkeypatch.delenv(name, raising=False)


# -- .env only from a path the user names ----------------------------------------------------


def test_a_dotenv_in_the_current_folder_is_not_read(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("FRAGJOBS_DEFAULT_MODEL=from-the-folder\n")
    monkeypatch.chdir(tmp_path)
    assert Settings().default_model != "from-the-folder"
    assert FarmSettings().default_model != "from-the-folder"


def test_the_env_file_named_by_fragjobs_env_file_is_read(tmp_path, monkeypatch):
    named = tmp_path / "elsewhere" / "farm.env"
    named.parent.mkdir()
    named.write_text("FRAGJOBS_DEFAULT_MODEL=tiny-sd\nFRAGJOBS_MAX_VARIANTS=12\n")
    monkeypatch.setenv("FRAGJOBS_ENV_FILE", str(named))
    settings = Settings()
    assert (settings.default_model, settings.max_variants) == ("tiny-sd", 12)
    assert FarmSettings().default_model == "tiny-sd"
    monkeypatch.setenv("FRAGJOBS_MAX_VARIANTS", "7")  # the environment wins over the file
    assert Settings().max_variants == 7


def test_a_named_env_file_that_is_missing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAGJOBS_ENV_FILE", str(tmp_path / "missing.env"))
    with pytest.raises(ConfigError, match=r"^FRAGJOBS_ENV_FILE=.*missing\.env is not a file$"):
        Settings()


# -- placeholder secrets refused ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FRAGJOBS_BROKER_URL", "redis://:change-me-redis@redis:6379/0"),
        ("FRAGJOBS_RESULT_BACKEND", "redis://:change-me-redis@redis:6379/1"),
        ("FRAGJOBS_DATABASE_URL", "postgresql+psycopg://fragjobs:change-me-pg@postgres/fragjobs"),
        ("FRAGJOBS_FLOWER_PASSWORD", "change-me-flower"),
        ("AWS_SECRET_ACCESS_KEY", "CHANGE-ME-worker-s3"),
    ],
)
def test_farm_settings_refuse_a_placeholder_secret(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        FarmSettings()
    message = str(refused.value)
    assert message.startswith(f"{variable} still hold") and "\n" not in message
    assert value not in message  # the message names the variable, never its value


def test_farm_settings_take_real_secrets(monkeypatch):
    monkeypatch.setenv("FRAGJOBS_BROKER_URL", "redis://:0f3c9a@redis:6379/0")
    monkeypatch.setenv("FRAGJOBS_FLOWER_PASSWORD", "d41d8cd9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "8f14e45f")
    settings = FarmSettings()
    assert settings.broker_url == "redis://:0f3c9a@redis:6379/0"
    assert settings.flower_password.get_secret_value() == "d41d8cd9"


def test_flower_refuses_a_placeholder_password_in_one_line(monkeypatch):
    from fragjobs.cli import main

    monkeypatch.setenv("FRAGJOBS_FLOWER_USER", "ops")
    monkeypatch.setenv("FRAGJOBS_FLOWER_PASSWORD", "change-me-flower")
    result = CliRunner().invoke(main, ["flower"])
    assert result.exit_code == 2
    assert "FRAGJOBS_FLOWER_PASSWORD still hold" in result.output
    assert "Traceback" not in result.output and "change-me-flower" not in result.output


# -- logs: levels and masking -----------------------------------------------------------------

KEY_ID, SIGNATURE = "AKIAPROBEKEYID0", "ab" * 32
AUTHORIZATION = (
    f"AWS4-HMAC-SHA256 Credential={KEY_ID}/20250101/us-east-1/s3/aws4_request, "
    f"SignedHeaders=host;x-amz-date, Signature={SIGNATURE}"
)


@pytest.mark.parametrize(
    ("text", "secrets", "kept"),
    [
        (  # botocore's "Sending http request" line
            f"headers={{'X-Amz-Date': b'20250101T000000Z', 'Authorization': b'{AUTHORIZATION}',"
            " 'Content-Length': '3'}",
            [KEY_ID, SIGNATURE, "SignedHeaders"],
            f"'Authorization': b'{MASK}', 'Content-Length': '3'}}",
        ),
        ("Authorization: Bearer eyJhbGciOi.payload", ["eyJhbGciOi"], f"Authorization: {MASK}"),
        (
            "send: b'GET / HTTP/1.1\\r\\nAuthorization: Basic dXNlcjpwdw==\\r\\nHost: x'",
            ["dXNlcjpwdw=="],
            f"Authorization: {MASK}\\r\\nHost: x",
        ),
        (AUTHORIZATION, [KEY_ID, SIGNATURE], f"Credential={MASK}, SignedHeaders=host"),
        (
            f"https://b.s3.amazonaws.com/k?X-Amz-Credential={KEY_ID}%2F2025&X-Amz-Date=1"
            f"&X-Amz-Signature={SIGNATURE}&X-Amz-Security-Token=FQoGZXIvYXdz",
            [KEY_ID, SIGNATURE, "FQoGZXIvYXdz"],
            "&X-Amz-Date=1&",
        ),
        ("broker redis://:hunter2@redis:6379/0", ["hunter2"], f"redis://:{MASK}@redis:6379/0"),
        (
            "catalog postgresql+psycopg://fragjobs:pg%40pw@postgres:5432/fragjobs",
            ["pg%40pw"],
            f"postgresql+psycopg://fragjobs:{MASK}@postgres:5432/fragjobs",
        ),
        ("redis://:p@ss@redis/0", ["p@ss", "ss@"], f"redis://:{MASK}@redis/0"),
        (
            "{'aws_secret_access_key': 'wJalrXUtnFEMI/K7MDENG', 'region_name': 'us-east-1'}",
            ["wJalrXUtnFEMI"],
            "'region_name': 'us-east-1'",
        ),
        (
            "FLOWER_BASIC_AUTH=ops:fl0wer FRAGJOBS_FLOWER_PASSWORD=fl0wer2 password=x1",
            ["fl0wer", "x1"],
            f"FLOWER_BASIC_AUTH={MASK} ",
        ),
        ("http://minio:9000/fragjobs/farm?list-type=2", [], "http://minio:9000/fragjobs/farm"),
        ("prompt truncated to max_tokens=77", [], "max_tokens=77"),
    ],
)
def test_redact_masks_credentials_and_keeps_the_rest(text, secrets, kept):
    masked = redact(text)
    for secret in secrets:
        assert secret not in masked
    assert kept in masked
    assert redact(masked) == masked


def test_the_filter_masks_arguments_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("fragjobs.tests.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connecting to %s", "redis://:hunter2@redis:6379/0")
        logger.warning("malformed %d", "redis://:hunter2@redis:6379/1")
        try:
            raise RuntimeError("cannot reach postgresql://u:pgsecret@db/catalog")
        except RuntimeError:
            logger.exception("catalog down")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "hunter2" not in out and "pgsecret" not in out
    assert f"redis://:{MASK}@redis" in out and f"postgresql://u:{MASK}@db" in out
    assert "Traceback" in out and "RuntimeError" in out
    assert f"'malformed %d' % ('redis://:{MASK}@redis:6379/1',)" in out


PROBE = textwrap.dedent(
    f"""
    import logging, sys
    from fragjobs.cli import main

    @main.command("probe")
    def probe():
        logging.getLogger("fragjobs.storage.s3").debug(
            "PUT headers=%s", {{"Authorization": b"{AUTHORIZATION}"}}
        )
        logging.getLogger("fragjobs.farm").debug("broker redis://:hunter2@redis:6379/0")
        logging.getLogger("botocore.endpoint").debug("botocore debug Authorization: Basic zzz")
        logging.getLogger("urllib3.connectionpool").info("urllib3 info")
        logging.getLogger("botocore.credentials").warning("botocore warning")

    main(sys.argv[1:], prog_name="fragjobs")
    """
)


def _probe(*flags: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *flags, "probe"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    for secret in (KEY_ID, SIGNATURE, "hunter2", "zzz"):
        assert secret not in run.stderr
    return run.stderr


def test_v_shows_fragjobs_debug_lines_masked_but_not_the_libraries():
    err = _probe("-v")
    assert f"DEBUG PUT headers={{'Authorization': b'{MASK}'}}" in err
    assert f"DEBUG broker redis://:{MASK}@redis:6379/0" in err
    assert "botocore debug" not in err and "urllib3 info" not in err
    assert "WARNING botocore warning" in err


def test_vv_shows_the_libraries_debug_lines_masked_too():
    err = _probe("-vv")
    assert f"DEBUG botocore debug Authorization: {MASK}" in err
    assert "INFO urllib3 info" in err
    assert f"DEBUG broker redis://:{MASK}@redis:6379/0" in err


def test_without_v_only_warnings_are_shown():
    assert _probe().strip() == "WARNING botocore warning"
