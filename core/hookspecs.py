"""The extension points of harvest.

A plugin module implements any of these hooks with ``@harvest.core.hookimpl``. Each hook
returns a mapping from the name a recipe uses (``use: flickr``) to the plugin class.
Third-party packages expose their module through the ``harvest`` entry-point group::

    [options.entry_points]
    harvest =
        myplugin = myplugin.module
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("harvest")


@hookspec
def harvest_sources() -> dict[str, type]:
    """Return ``{name: Source subclass}`` for the sources this plugin provides.

    A source yields :class:`harvest.core.Record` objects for a query (term + language),
    or once for the whole run when its class sets ``uses_terms = False``.
    """


@hookspec
def harvest_enrichers() -> dict[str, type]:
    """Return ``{name: Enricher subclass}`` for the enrichers this plugin provides.

    An enricher receives batches of downloaded records, in recipe order, and adds fields
    to them or drops them.
    """


@hookspec
def harvest_sinks() -> dict[str, type]:
    """Return ``{name: Sink subclass}`` for the sinks this plugin provides.

    A sink stores batches of finished records idempotently by record id.
    """
