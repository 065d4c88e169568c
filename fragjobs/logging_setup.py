"""Log output: who logs at which level, and credentials masked in every line.

``verbosity`` counts ``-v`` flags: 0 prints warnings, 1 adds fragjobs' own DEBUG messages
while the libraries (botocore, urllib3, celery, kombu, sqlalchemy, diffusers, transformers,
...) stay at WARNING, 2 adds everybody's DEBUG messages. Whatever the level,
:class:`RedactingFilter` on the root logger's handlers masks what would let a reader of the
log in: ``Authorization`` headers, AWS signature fields, passwords in URLs
(``redis://:pw@host``, ``postgresql://user:pw@host``) and ``password=``/``secret``-like values.

Example::

    configure_logging(1)
    logging.getLogger("fragjobs.farm").debug("broker %s", "redis://:hunter2@redis:6379/0")
    # DEBUG broker redis://:***@redis:6379/0
"""

from __future__ import annotations

import logging
import os
import re

OWN_LOGGERS = ("fragjobs", "tasks")
"""The loggers ``-v`` turns to DEBUG; every other logger follows the root (WARNING)."""
MASK = "***"

# The names of values that are secrets (an access key id is masked too: with it a log line
# names the account).
_SECRET_NAME = (
    r"[\w.-]*(?:password|passwd|secret|basic[_-]?auth|api[_-]?key|access[_-]?key"
    r"|(?:access|auth|session|security|refresh)[_-]?token)[\w.-]*"
)
_VALUE = r"""(?:b?(?P<quote>['"]).*?(?P=quote)|[^\s,;&'"}\])]+)"""
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # The user info of a URL: scheme://user:password@host (greedy up to the last '@').
    (re.compile(r"""(\b[a-z][a-z0-9+.-]*://[^\s:/?#@'"]*:)[^\s/?#'"]*(@)""", re.I), rf"\1{MASK}\2"),
    # Authorization headers, quoted (botocore's header dicts, b'...') or up to the line's end.
    (
        re.compile(r"""((?:proxy-)?authorization['"]?\s*[:=]\s*b?)(['"]).*?\2""", re.I),
        rf"\1\2{MASK}\2",
    ),
    (
        re.compile(r"""((?:proxy-)?authorization\s*[:=]\s*)(?!\s|b?['"])[^\r\n'"\\]+""", re.I),
        rf"\1{MASK}",
    ),
    # AWS signature version 4 fields, in headers and presigned URLs.
    (re.compile(r"""((?:x-amz-)?credential=)[^\s,&'"]+""", re.I), rf"\1{MASK}"),
    (re.compile(r"""((?:x-amz-)?signature['"]?\s*[:=]\s*)[0-9a-f]{16,}""", re.I), rf"\1{MASK}"),
    # NAME=value (environment, keyword arguments, query strings) and 'NAME': value (reprs, JSON).
    (re.compile(rf"""(\b{_SECRET_NAME}=){_VALUE}""", re.I), rf"\1{MASK}"),
    (re.compile(rf"""(['"]{_SECRET_NAME}['"]\s*:\s*){_VALUE}""", re.I), rf"\1{MASK}"),
)


def redact(text: str) -> str:
    """``text`` with every credential :data:`MASK`-ed (see the module docstring)."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Masks credentials in a record's message and traceback (see :func:`redact`).

    Put on a *handler*: it then sees the records of every logger that reaches the handler.
    The record is changed in place, so every handler after this one prints the masked text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: shown unformatted, and still masked
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Put a :class:`RedactingFilter` on every handler of ``logger`` (default: the root).

    Call it again after something adds handlers (Celery's ``after_setup_logger`` signal).
    """
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def configure_logging(verbosity: int = 0) -> None:
    """Levels for ``verbosity`` ``-v`` flags, on stderr, with credentials masked.

    Diffusers and transformers read their verbosity from the environment when first
    imported, so this sets ``DIFFUSERS_VERBOSITY`` / ``TRANSFORMERS_VERBOSITY`` unless the
    user did.
    """
    logging.basicConfig(format="%(levelname)s %(message)s")
    logging.getLogger().setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 1 else logging.NOTSET)
    install_redaction()
    library_verbosity = ("error", "warning", "debug")[min(verbosity, 2)]
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, library_verbosity)
