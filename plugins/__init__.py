"""harvest's built-in plugins. The core registers exactly these modules; third-party
plugins arrive through the ``harvest`` entry-point group instead."""

BUILTIN_MODULES = (
    "harvest.plugins.sources.bing",
    "harvest.plugins.sources.flickr",
    "harvest.plugins.sources.flickr_comments",
    "harvest.plugins.sources.folder",
    "harvest.plugins.sources.openverse",
    "harvest.plugins.sources.urls",
    "harvest.plugins.sources.wikimedia",
    "harvest.plugins.enrichers.embed",
    "harvest.plugins.enrichers.exif",
    "harvest.plugins.enrichers.geocode",
    "harvest.plugins.enrichers.license",
    "harvest.plugins.enrichers.near_duplicates",
    "harvest.plugins.enrichers.quality",
    "harvest.plugins.enrichers.relevance",
    "harvest.plugins.enrichers.safety",
    "harvest.plugins.enrichers.vision",
    "harvest.plugins.sinks.jsonl",
    "harvest.plugins.sinks.mongodb",
    "harvest.plugins.sinks.parquet",
    "harvest.plugins.sinks.webdataset",
)
