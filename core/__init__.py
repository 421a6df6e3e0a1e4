"""harvest's public types: everything a plugin needs, and nothing it should not touch.

The names are imported on first use (PEP 562): a download worker process imports only
the few core modules it runs, not the crypto, plugin and HTTP stacks behind these names,
which would cost each worker a fifth of a second of start-up.
"""

from importlib import import_module

_HOME = {
    "output.crypto": ["PROTECTION_OPTIONS", "FieldCipher", "Keyring", "Protection", "check_protection"],
    "cleaning.curation": ["set_aside"],
    "output.records": ["filter_jsonl", "rewrite_jsonl"],
    "errors": ["HarvestError", "PluginConfigError", "RecordError", "UsageError"],
    "options": ["BBox", "Bool", "Choice", "Date", "Float", "Int", "ListOf", "MapOf", "Option",
                "OptionError", "OptionType", "Path", "Secret", "SecretValue", "Size", "Str",
                "Thresholds"],
    "contract.plugin": ["Context", "Enricher", "Refusal", "Sink", "Source", "hookimpl"],
    "record": ["FileInfo", "Query", "Record", "Term", "json_default", "license_family"],
    "contract.scoring": ["LabelScorer", "ScoringError", "apply_keep_if"],
    "contract.sharded": ["JsonlAppender", "ShardedSink", "document_batches", "shard_options",
                         "strip_exif"],
    "output.storage": ["inside", "inside_check"],
    "output.embeddings": ["EmbeddingStore", "OutputEmbeddings"],
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'harvest.core' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
