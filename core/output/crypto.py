"""Keys and field-level encryption of personal data (Fernet, from ``cryptography``).

A key file holds one Fernet key per line, newest first; encryption uses the first,
decryption tries all (MultiFernet), which is how rotation works. Each encrypted document
says which fields are encrypted and under which key id (a digest of the key, not the key).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..errors import UsageError
from ..options import Choice, ListOf, Option, Str
from ..options import Path as PathType
from ..record import Record, json_default
from ..secrets import check_private_file

ENCRYPTED = "_encrypted"
DEFAULT_KEY_ENV = "HARVEST_KEY"
# Where `harvest keygen` writes by default, and where every command and sink looks when
# neither a key file nor the key's environment variable is given.
DEFAULT_KEY_FILE = Path("~/.config/harvest/harvest.key")


def key_id(key: bytes) -> str:
    return hashlib.sha256(key.strip()).hexdigest()[:12]


def inside_git_work_tree(path: Path) -> bool:
    for folder in [path.parent, *path.parent.parents]:
        if (folder / ".git").exists():
            return True
    return False


def generate_key_file(path: Path, *, force: bool = False) -> str:
    path = path.expanduser().absolute()
    if path.exists():
        raise UsageError(f"{path}: already exists; refusing to overwrite a key")
    if inside_git_work_tree(path) and not force:
        raise UsageError(f"{path}: inside a git work tree, where a key gets committed by "
                         f"accident; choose another path or pass --force")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key + b"\n")
    return key_id(key)


class Keyring:
    """The keys one cipher may use: the first encrypts, any decrypts."""

    def __init__(self, keys: list[bytes], origin: str):
        if not keys:
            raise UsageError(f"{origin}: no key found")
        try:
            self.fernets = [Fernet(key) for key in keys]
        except (ValueError, TypeError):
            raise UsageError(f"{origin}: not a Fernet key (make one with `harvest keygen`)") from None
        self.keys = [key.strip() for key in keys]
        self.ids = [key_id(key) for key in keys]
        self.origin = origin
        self.multi = MultiFernet(self.fernets)

    @classmethod
    def load(cls, key_file: str | Path | None = None, key_env: str | None = None,
             environ=None) -> Keyring:
        environ = os.environ if environ is None else environ
        if key_file:
            path = Path(key_file).expanduser()
            if not path.is_file():
                raise UsageError(f"{path}: key file not found (make one with `harvest keygen`)")
            check_private_file(path, "key file")
            lines = path.read_bytes().split()
            return cls([line for line in lines if line], str(path))
        name = key_env or DEFAULT_KEY_ENV
        value = environ.get(name)
        if not value:
            default = Path(environ.get("HOME", "~")) / DEFAULT_KEY_FILE.relative_to("~") \
                if environ.get("HOME") else DEFAULT_KEY_FILE.expanduser()
            if default.is_file():
                return cls.load(default, environ=environ)
            raise UsageError(f"no encryption key: set {name}, give a key file, or make one at "
                             f"{DEFAULT_KEY_FILE} with `harvest keygen`")
        return cls([part.encode() for part in value.split(",") if part.strip()], f"${name}")

    @property
    def current_id(self) -> str:
        return self.ids[0]


class FieldCipher:
    def __init__(self, keyring: Keyring):
        self.keyring = keyring

    def encrypt(self, document: dict[str, Any], fields) -> dict[str, Any]:
        encrypted = []
        for name in sorted(fields):
            if name in document and document[name] is not None:
                plain = json.dumps(document[name], ensure_ascii=False, default=json_default)
                document[name] = self.keyring.fernets[0].encrypt(plain.encode("utf-8")).decode()
                encrypted.append(name)
        if encrypted:
            document[ENCRYPTED] = {"fields": encrypted, "key_id": self.keyring.current_id}
        return document

    def decrypt(self, document: dict[str, Any]) -> dict[str, Any]:
        marker = document.get(ENCRYPTED)
        if not marker:
            return document
        document = dict(document)
        for name in marker["fields"]:
            try:
                plain = self.keyring.multi.decrypt(document[name].encode())
            except (InvalidToken, AttributeError, KeyError):
                raise UsageError(f"record {document.get('id')}: field {name} does not decrypt "
                                 f"with {self.keyring.origin} (it was encrypted with key id "
                                 f"{marker.get('key_id')}; keys here: "
                                 f"{', '.join(self.keyring.ids)})") from None
            document[name] = json.loads(plain)
        del document[ENCRYPTED]
        return document

    def round_trip_check(self) -> None:
        """The seed's assert, as a real check: encrypt, decrypt, compare."""
        sample = {"id": "check", "owner_name": "Zoë 猿 قرد", "exif": {"GPS": {"a": [1.5, 2]}}}
        back = self.decrypt(self.encrypt(dict(sample), ["owner_name", "exif"]))
        if back != sample:
            raise UsageError(f"{self.keyring.origin}: encryption round trip failed; "
                             f"refusing to write")


PROTECTION_OPTIONS = (
    Option("personal_fields", Choice("omit", "encrypt", "clear"), "omit",
           help="personal fields (owner, EXIF...): left out, Fernet-encrypted, or in clear text"),
    Option("encrypt_fields", ListOf(Str()), None,
           help="more fields to treat as personal (default: those the plugins mark)"),
    Option("key_file", PathType(), None, help="Fernet key file (chmod 600), for encrypt"),
    Option("key_env", Str(), DEFAULT_KEY_ENV, help="environment variable holding the key"),
)


def check_protection(options) -> None:
    """A sink's ``check_options`` for PROTECTION_OPTIONS: encrypting needs a usable key."""
    from ..options import OptionError

    if options.get("personal_fields") != "encrypt":
        return
    try:
        FieldCipher(Keyring.load(options.get("key_file"), options.get("key_env"))) \
            .round_trip_check()
    except UsageError as exc:
        raise OptionError("key_file" if options.get("key_file") else "key_env", str(exc)) from None


class Protection:
    """What a sink does with personal fields, just before it writes."""

    def __init__(self, config: dict[str, Any]):
        self.mode = config["personal_fields"]
        self.extra = set(config.get("encrypt_fields") or [])
        self.cipher: FieldCipher | None = None
        if self.mode == "encrypt":
            self.cipher = FieldCipher(Keyring.load(config.get("key_file"), config.get("key_env")))
            self.cipher.round_trip_check()

    def document(self, record: Record) -> dict[str, Any]:
        data = record.to_dict()
        personal = (record.personal | self.extra) & set(data)
        if self.mode == "omit":
            omitted = sorted(name for name in personal if data.pop(name, None) is not None)
            if omitted:
                data["omitted_personal_fields"] = omitted
        elif self.mode == "encrypt":
            self.cipher.encrypt(data, personal)
        return data
