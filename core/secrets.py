"""Secrets: ``${NAME}`` references resolved from the environment or a credentials file,
and a log filter that keeps resolved values out of every log line."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path
from urllib.parse import quote, quote_plus, urlsplit

from .errors import UsageError

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
PERCENT_ESCAPE = re.compile(r"%[0-9A-F]{2}")
CREDENTIALS_ENV = "HARVEST_CREDENTIALS"
DEFAULT_CREDENTIALS = Path("~/.config/harvest/credentials.json")


# Names accepted for one another: the original project's credentials.json spelled
# Flickr "FLICKER"; people type "FLICKR".
ALIASES = {"FLICKER_KEY": ("FLICKR_KEY",), "FLICKR_KEY": ("FLICKER_KEY",),
           "FLICKER_SECRET": ("FLICKR_SECRET",), "FLICKR_SECRET": ("FLICKER_SECRET",)}


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret-bearing file that others can read: it must be 0600 or stricter."""
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UsageError(f"{path}: {what} is readable by others (mode {mode:04o}); "
                         f"run: chmod 600 {path}")


class SecretResolver:
    """Looks names up in the environment first, then in a JSON credentials file.

    The seed's ``credentials.json`` (``FLICKER_KEY``, ``FLICKER_SECRET``,
    ``GOOGLE_VISION_KEY``) is one accepted form of that file.
    """

    def __init__(self, credentials_file: Path | None = None, environ=None):
        self.environ = os.environ if environ is None else environ
        self.credentials_file = credentials_file
        self._credentials: dict[str, str] | None = None
        self.revealed: set[str] = set()
        self._redactable: list[str] | None = None

    @classmethod
    def carried(cls, revealed: set[str]) -> SecretResolver:
        """The resolver a task carries to another process or machine: it redacts the values
        in ``revealed`` (already resolved into the options it travels with) and looks up
        nothing, neither that machine's environment nor any credentials file there."""
        resolver = cls(environ={})
        resolver._credentials = {}
        resolver.revealed = set(revealed)
        return resolver

    def _load_credentials(self) -> dict[str, str]:
        if self._credentials is not None:
            return self._credentials
        path = self.credentials_file
        if path is None and self.environ.get(CREDENTIALS_ENV):
            path = Path(self.environ[CREDENTIALS_ENV])
        if path is None and DEFAULT_CREDENTIALS.expanduser().is_file():
            path = DEFAULT_CREDENTIALS
        self._credentials = {}
        if path is None:
            return self._credentials
        path = path.expanduser()
        if not path.is_file():
            raise UsageError(f"{path}: credentials file not found")
        check_private_file(path, "credentials file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a JSON credentials file ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}: expected a JSON object of NAME: value")
        self._credentials = {str(k): str(v) for k, v in data.items() if v is not None}
        return self._credentials

    def lookup(self, name: str) -> str | None:
        value = None
        for candidate in (name, *ALIASES.get(name, ())):
            value = self.environ.get(candidate) or self._load_credentials().get(candidate)
            if value:
                break
        if value:
            self._redactable = None
            self.revealed.add(value)
            # Errors quote a URL's parts (a host that does not resolve), not the whole.
            parts = urlsplit(value) if "://" in value else None
            if parts is not None and parts.hostname:
                self.revealed.update({parts.hostname, parts.netloc})
        return value or None

    def secrets(self) -> list[str]:
        """Every value resolved so far that is long enough to redact, in each encoding the
        code writes it in, longest first (so that a secret containing another is replaced
        whole)."""
        if self._redactable is None:  # redact runs on every record: sort once
            self._redactable = sorted({form for s in self.revealed if len(s) >= 4
                                       for form in encodings(s)}, key=len, reverse=True)
        return self._redactable

    def redact(self, text: str) -> str:
        for secret in self.secrets():
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def redact_value(self, value):
        """``value`` with every secret replaced in its strings, however deeply nested."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {key: self.redact_value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.redact_value(item) for item in value]
        return value

    def where(self) -> str:
        path = self.credentials_file or self.environ.get(CREDENTIALS_ENV) or DEFAULT_CREDENTIALS
        return f"the environment or {path}"


def encodings(secret: str) -> set[str]:
    """``secret`` as it is written in a URL (a file:// address, a query: percent-encoded,
    upper or lower case, ``+`` for a space), in JSON (``json.dumps``, ``\\u00e9`` or not)
    and in a Python repr (an exception's message)."""
    percent = {quote(secret), quote(secret, safe=""), quote_plus(secret),
               quote_plus(secret, safe="/")}
    lower_hex = {PERCENT_ESCAPE.sub(lambda escape: escape.group().lower(), form)
                 for form in percent}
    return {secret, *percent, *lower_hex,
            json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
            repr(secret)[1:-1], ascii(secret)[1:-1]}


class RedactingFilter(logging.Filter):
    """Replaces every resolved secret in a log record's final message."""

    def __init__(self, resolver: SecretResolver):
        super().__init__()
        self.resolver = resolver

    def filter(self, record: logging.LogRecord) -> bool:
        if self.resolver.revealed:
            message = record.getMessage()
            redacted = self.resolver.redact(message)
            if redacted != message:
                record.msg, record.args = redacted, None
            # A traceback (-v logs unexpected errors with theirs) quotes the exception's
            # text: formatted here, redacted, and kept where Formatter looks for it first.
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.resolver.redact(record.exc_text)
            if record.stack_info:
                record.stack_info = self.resolver.redact(record.stack_info)
        return True
