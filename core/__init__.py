"""harvest's public types: everything a plugin needs, and nothing it should not touch."""

from .errors import HarvestError, PluginConfigError, RecordError, UsageError
from .options import (
    BBox,
    Bool,
    Choice,
    Date,
    Float,
    Int,
    ListOf,
    Option,
    OptionType,
    Path,
    Secret,
    SecretValue,
    Size,
    Str,
)
from .plugin import Context, Enricher, Sink, Source, hookimpl
from .record import FileInfo, Query, Record, Term, json_default, license_family

__all__ = [
    "BBox", "Bool", "Choice", "Context", "Date", "Enricher", "FileInfo", "Float", "HarvestError",
    "Int", "ListOf", "Option", "OptionType", "Path", "PluginConfigError", "Query", "Record",
    "RecordError", "Secret", "SecretValue", "Sink", "Size", "Source", "Str", "Term", "Thresholds",
    "UsageError", "hookimpl", "json_default", "license_family",
]
