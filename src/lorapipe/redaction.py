"""No credential leaves a lorapipe process: one scrubber where text leaves it.

botocore logs every request's headers at DEBUG (``Authorization: AWS4-HMAC-SHA256
Credential=<key id>/...``, ``X-Amz-Security-Token``, the canonical request), servers echo the key
id in error bodies, and any exception may quote what a library was handed. Rather than trust
every library and every log call, :func:`redacted_output` scrubs text at the boundary:

- every log record, whichever handler takes it (stderr, a file, pytest's capture): its message,
  exception and stack text, through the log record factory;
- everything written to ``sys.stdout`` and ``sys.stderr``: prints, the ``--debug`` traceback,
  warnings, progress bars and the handlers libraries attach to their own loggers.

``lorapipe <command>`` runs inside it, and so do the accelerate workers of ``lorapipe train``,
which are ``lorapipe.cli`` again.

Scrubbed are the values of the credential variables and of the AWS shared credentials/config
files, wherever they stand (also URL-encoded), and whatever stands where a credential goes,
whoever resolved it (an instance role, IRSA): ``Credential=<key id>``, the security token as a
header, header dict entry, canonical-request line or presigned query parameter, ``Signature=``,
``<AWSAccessKeyId>`` and ``Bearer <token>``.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

REDACTED = "***"
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "KFP_TOKEN",
)
SHARED_FILE_KEYS = (
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "aws_security_token",
)
# a shorter value would scrub ordinary words out of every line, and is no real credential
MIN_SECRET_LENGTH = 4

# group 1 is kept, the rest becomes REDACTED
_CREDENTIAL_PLACES = [
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        # Authorization header and presigned URLs: Credential=AKIA.../, X-Amz-Credential=AKIA...%2F
        r"(Credential=)[^/%\s'\",&]+",
        # header, header dict repr (b'...'), canonical request line, presigned query parameter
        r"(x-amz-security-token['\"]?\s*[:=]\s*(?:b?['\"])?)[^\s'\",&}]+",
        r"(Signature[=:]\s*)[0-9a-f]{16,}",
        r"(<AWSAccessKeyId>)[^<]+",
        r"(Bearer\s+)[^\s'\",]+",
    )
]


class Redactor:
    """Text with every known credential value, and anything in a credential's place, replaced
    by ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = {
            form
            for secret in secrets
            if len(secret) >= MIN_SECRET_LENGTH
            for form in (secret, quote(secret, safe=""))
        }
        # longest first, so a value that contains another is replaced whole
        alternatives = "|".join(map(re.escape, sorted(forms, key=len, reverse=True)))
        self._values = re.compile(alternatives) if forms else None

    def __call__(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub(REDACTED, text)
        for place in _CREDENTIAL_PLACES:
            text = place.sub(rf"\g<1>{REDACTED}", text)
        return text


def known_secrets(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The credential values of the environment and of the AWS shared files it points at."""
    values = [environ[name] for name in CREDENTIAL_VARIABLES if environ.get(name)]
    files = (  # as botocore finds them; expanduser, unlike Path.home, works without a home
        environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
        environ.get("AWS_CONFIG_FILE") or "~/.aws/config",
    )
    paths = [Path(os.path.expanduser(name)) for name in files]
    return values + [value for path in paths for value in _shared_file_secrets(path)]


def _shared_file_secrets(path: Path) -> list[str]:
    """Key ids, secrets and tokens of every profile in an AWS credentials/config file. A file
    that is missing or does not parse holds nothing boto3 would send either."""
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, UnicodeDecodeError, configparser.Error):
        return []
    return [
        parser.get(section, key)
        for section in parser.sections()
        for key in SHARED_FILE_KEYS
        if parser.get(section, key, fallback="")
    ]


class RedactingStream(io.TextIOBase):
    """A text stream that passes to ``target`` what ``redact`` leaves of each line. Text waits
    for its line end (or ``flush``), so a credential written in pieces is still seen whole; a
    lock keeps the threads of boto3's transfers from tearing each other's lines."""

    def __init__(self, target: TextIO, redact: Callable[[str], str]) -> None:
        self._target = target
        self._redact = redact
        self._pending = ""
        self._lock = threading.RLock()  # re-entrant: a signal handler may print mid-write

    def write(self, text: str) -> int:
        with self._lock:
            lines, newline, self._pending = (self._pending + text).rpartition("\n")
            if newline:
                self._target.write(self._redact(lines + newline))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._target.write(self._redact(self._pending))
                self._pending = ""
            self._target.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # progress bars and colours ask
        return self._target.isatty()

    def fileno(self) -> int:  # faulthandler and subprocesses write to the descriptor itself
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._target.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._target.errors


def _redacting_record_factory(
    make: Callable[..., logging.LogRecord], redact: Redactor
) -> Callable[..., logging.LogRecord]:
    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        _scrub(record, redact)
        return record

    return make_record


_EXCEPTION_FORMATTER = logging.Formatter()


def _scrub(record: logging.LogRecord, redact: Redactor) -> None:
    """Redact a record's message, exception and stack text in place; a record without a
    credential reaches its handlers untouched."""
    try:
        message = record.getMessage()
    except Exception:  # a malformed log call: logging reports it, through the redacting streams
        return
    scrubbed = redact(message)
    if scrubbed != message:
        record.msg, record.args = scrubbed, ()
    if record.exc_info and not record.exc_text:
        text = _EXCEPTION_FORMATTER.formatException(record.exc_info)
        scrubbed = redact(text)
        if scrubbed != text:
            record.exc_text = scrubbed
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


@contextlib.contextmanager
def redacted_output() -> Iterator[Redactor]:
    """Scrub every log record and everything written to stdout/stderr until the block ends
    (the credentials are read once, at its start); what was there before is restored after."""
    redact = Redactor(known_secrets())
    stdout, stderr, make_record = sys.stdout, sys.stderr, logging.getLogRecordFactory()
    wrapped = RedactingStream(stdout, redact), RedactingStream(stderr, redact)
    sys.stdout, sys.stderr = wrapped
    logging.setLogRecordFactory(_redacting_record_factory(make_record, redact))
    try:
        yield redact
    finally:
        for stream in wrapped:
            stream.flush()
        sys.stdout, sys.stderr = stdout, stderr
        logging.setLogRecordFactory(make_record)
