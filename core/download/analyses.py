"""Picture analyses: work an enricher asks to be done in the download workers, on each
picture just checked there, where it is still in the page cache and the cores are many
(the enrichers themselves run on the engine's one thread).

An analysis is named ``"package.module:function"`` by an enricher's
``picture_analyses()``; the function takes the picture's path and returns something that
pickles. Its result reaches the enricher on ``record.analyses[name]``; a failure becomes
the exception's text there, and the download itself is unaffected (the enricher decides).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_FUNCTIONS: dict[str, Callable[[Path], Any]] = {}
_LOCK = threading.Lock()


def _function(name: str) -> Callable[[Path], Any]:
    with _LOCK:
        if name not in _FUNCTIONS:
            module, _, attribute = name.partition(":")
            _FUNCTIONS[name] = getattr(importlib.import_module(module), attribute)
        return _FUNCTIONS[name]


def run_analyses(names: tuple[str, ...], path: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        try:
            results[name] = _function(name)(path)
        except Exception as exc:  # an analysis's failure is its enricher's to judge
            results[name] = f"{type(exc).__name__}: {exc}"
    return results
