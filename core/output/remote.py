"""Object storage and other remote folders, through fsspec (``s3://``, ``gs://``,
``az://``, ``hf://``..., each with its fsspec package installed: s3fs for S3).

What goes there is whole files that are final when written: shards of the sharded sinks
and exports. The run state, the lock and the image folder stay local, because exactly-once
needs a POSIX folder (atomic renames, flock, SQLite); an object store's PUT makes an object
visible only once complete, which is what a finished shard needs.

Credentials never come from the recipe: fsspec's packages read them from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles...).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import PluginConfigError

# storage_options that would put a credential in the recipe.
SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def is_url(text: str | None) -> bool:
    return bool(text) and "://" in text and not text.startswith("file://")


CREDENTIALS_IN_URL = ("credentials never go in a URL (user:password@); set them in the "
                      "environment (AWS_ACCESS_KEY_ID, AWS_PROFILE...)")


def without_credentials(url: str) -> str | None:
    """``url`` with its ``user:password@`` replaced by ``***@``; None when it has none.
    A secret key often holds a ``/`` that nobody percent-encodes (``KEY:ab/cd@bucket``):
    a colon in the host part not followed by a port counts as credentials too."""
    scheme, separator, rest = url.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if not separator:
        return None
    if "@" in authority:
        return f"{scheme}://***@{rest[len(authority.rpartition('@')[0]) + 1:]}"
    port = authority.rpartition(":")[2]
    if ":" in authority and not port.isdigit() and not authority.endswith("]"):
        return f"{scheme}://***@{rest.rpartition('@')[2]}" if "@" in rest else f"{scheme}://***"
    return None


def check_storage_options(options: Mapping[str, Any]) -> str | None:
    """The name of a storage option that is a credential (refused), else None."""
    for name in options or {}:
        lowered = name.lower()
        if any(word in lowered for word in SECRET_WORDS) and lowered != "endpoint_url":
            return name
    return None


class Remote:
    """A remote folder: ``put`` files into it, list, open and remove what is there."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 label: str = "upload_to"):
        shown = without_credentials(url)
        if shown is not None:
            raise PluginConfigError(f"{label} {shown}: {CREDENTIALS_IN_URL}")
        self.url = url.rstrip("/")
        self.label = label
        try:
            import fsspec

            options = dict(storage_options or {})
            if "endpoint_url" in options:  # the one setting every S3 client needs by name
                options.setdefault("client_kwargs", {})["endpoint_url"] = \
                    options.pop("endpoint_url")
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as exc:
            raise PluginConfigError(f"{label} {url}: needs {exc.name or 'an fsspec package'} "
                                    f"(for s3:// URLs: pip install s3fs)") from None
        except ValueError as exc:
            raise PluginConfigError(f"{label} {url}: {exc}") from None

    def check(self) -> None:
        """Fails in one line when the bucket is missing, the credentials are refused or
        the folder cannot be written: a probe object is written and removed."""
        probe = posixpath.join(self.root, ".harvest-write-check")
        try:
            with self.fs.open(probe, "wb") as handle:
                handle.write(b"harvest")
            self.fs.rm_file(probe)
        except FileNotFoundError:
            raise PluginConfigError(f"{self.label} {self.url}: the bucket or folder does not "
                                    f"exist") from None
        except PermissionError:
            raise PluginConfigError(f"{self.label} {self.url}: access refused (check the "
                                    f"credentials in the environment)") from None
        except Exception as exc:  # botocore and friends raise their own kinds
            reason = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
            raise PluginConfigError(f"{self.label} {self.url}: cannot write: {reason}") from None

    def put(self, local: Path, name: str) -> None:
        self.fs.put_file(str(local), posixpath.join(self.root, name))

    def put_tree(self, local: Path) -> int:
        count = 0
        for path in sorted(local.rglob("*")):
            if path.is_file():
                self.put(path, path.relative_to(local).as_posix())
                count += 1
        return count

    def names(self) -> list[str]:
        try:
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def open(self, name: str):
        return self.fs.open(posixpath.join(self.root, name), "rb")

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(posixpath.join(self.root, name))
        except FileNotFoundError:
            pass
