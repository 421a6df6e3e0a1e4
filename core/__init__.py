"""harvest's public types: everything a plugin needs, and nothing it should not touch."""

from .crypto import PROTECTION_OPTIONS, FieldCipher, Keyring, Protection, check_protection
from .dataset import rewrite_jsonl
from .errors import HarvestError, PluginConfigError, RecordError, UsageError
from .options import (
    BBox,
    Bool,
    Choice,
    Date,
    Float,
    Int,
    ListOf,
    MapOf,
    Option,
    OptionError,
    OptionType,
    Path,
    Secret,
    SecretValue,
    Size,
    Str,
)
from .plugin import Context, Enricher, Sink, Source, hookimpl
from .record import FileInfo, Query, Record, Term, json_default, license_family
from .scoring import LabelScorer, ScoringError
from .storage import inside, inside_check

__all__ = [
    "rewrite_jsonl", "inside", "inside_check", "check_protection", "OptionError",
    "PROTECTION_OPTIONS", "FieldCipher", "Keyring", "Protection",
    "BBox", "Bool", "Choice", "Context", "Date", "Enricher", "FileInfo", "Float", "HarvestError",
    "hookimpl", "Int", "json_default", "LabelScorer", "license_family", "ListOf", "MapOf", "Option",
    "OptionType", "Path", "PluginConfigError", "Query", "Record", "RecordError", "ScoringError",
    "Secret", "SecretValue", "Sink", "Size", "Source", "Str", "Term", "Thresholds", "UsageError",
]
