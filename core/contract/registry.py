"""Finds plugins: built-ins registered explicitly, third parties through entry points."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

from .. import hookspecs
from ..download.http import HttpClient
from ..errors import PluginConfigError, UsageError
from .plugin import Context, Enricher, Plugin, Sink, Source

if TYPE_CHECKING:
    from .recipe import PluginSpec, Recipe

KINDS = {"sources": Source, "enrichers": Enricher, "sinks": Sink}
ENTRY_POINT_GROUP = "harvest"


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    cls: type[Plugin]
    origin: str  # "built-in" or "<distribution> <version>"


class Registry:
    def __init__(self, plugin_manager: pluggy.PluginManager):
        self.pm = plugin_manager
        self._plugins: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KINDS}
        origins = {id(module): f"{dist.project_name} {dist.version}"
                   for module, dist in plugin_manager.list_plugin_distinfo()}
        for kind, base in KINDS.items():
            caller = getattr(plugin_manager.hook, f"harvest_{kind}")
            for impl in caller.get_hookimpls():
                origin = origins.get(id(impl.plugin), "built-in")
                for name, cls in (impl.function() or {}).items():
                    if not (isinstance(cls, type) and issubclass(cls, base)):
                        raise UsageError(f"plugin {impl.plugin_name}: {kind} entry {name!r} "
                                         f"is not a {base.__name__} subclass")
                    known = self._plugins[kind].get(name)
                    if known is not None and known.cls is not cls:
                        raise UsageError(f"two {kind} are named {name!r}: from {known.origin} "
                                         f"and from {origin}")
                    self._plugins[kind][name] = PluginInfo(kind, name, cls, origin)

    def get(self, kind: str, name: str) -> PluginInfo | None:
        return self._plugins[kind].get(name)

    def names(self, kind: str) -> list[str]:
        return sorted(self._plugins[kind])

    def all(self, kind: str) -> list[PluginInfo]:
        return [self._plugins[kind][name] for name in self.names(kind)]


def load_registry() -> Registry:
    plugin_manager = pluggy.PluginManager("harvest")
    plugin_manager.add_hookspecs(hookspecs)
    builtins = importlib.import_module("harvest.plugins")
    for module_name in builtins.BUILTIN_MODULES:
        plugin_manager.register(importlib.import_module(module_name), name=module_name)
    plugin_manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return Registry(plugin_manager)


def build_plugin(recipe: Recipe, spec: PluginSpec, context: Context | None = None) -> Plugin:
    """One plugin of ``recipe``, built from its spec (not opened). ``context``: what a run
    lends it; without one, the context of a plugin used outside a run (a command opening
    the recipe's sinks, the cluster's client merging parts)."""
    try:
        return spec.cls(spec.options, context or standalone_context(recipe, spec))
    except PluginConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise PluginConfigError(f"{recipe.path}: {spec.key_path}: {exc}") from None


def standalone_context(recipe: Recipe, spec: PluginSpec) -> Context:
    """A plugin's context outside a run: the recipe's output and polite HTTP settings, a
    coordinator of its own."""
    settings = recipe.run
    http = HttpClient(rate_per_host=settings.rate_per_host, timeout=settings.timeout,
                      retries=settings.retries, backoff=settings.backoff,
                      user_agent=settings.user_agent, pool_size=settings.concurrency,
                      max_retry_after=settings.max_retry_after,
                      check_peer=not settings.allow_private_addresses,
                      api_deadline=settings.api_deadline,
                      max_api_answer=settings.max_api_answer)
    return Context(recipe_name=recipe.name, recipe_dir=recipe.directory,
                   output_dir=recipe.output, terms=recipe.terms, http=http,
                   log=logging.getLogger(f"harvest.{spec.kind}.{spec.label}"), name=spec.label)
