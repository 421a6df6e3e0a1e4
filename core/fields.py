"""The record fields that more than one part relies on: the contract between sources,
enrichers, sinks and the commands that read an output (credits, export, review, takedown).

A source or enricher that fills one of these fields with another meaning breaks the parts
that read it, so they are declared here once; the docs' field reference is generated from
this list (``harvest plugins --fields``), and a test checks that every field the credits,
the dataset card and the exports read is declared.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecordField:
    name: str
    type: str
    meaning: str
    written_by: str
    read_by: str
    personal: bool = False


CORE = "core"

RECORD_FIELDS: tuple[RecordField, ...] = (
    # Identity: set by the core from the Record, never by a plugin's fields.
    RecordField("id", "str", "`source:source_id`, unique in an output", CORE,
                "every sink, takedown, review, export"),
    RecordField("source", "str", "the source plugin's name", CORE, "credits, card, export"),
    RecordField("source_id", "str", "the item's id at its source", CORE, "takedown --source-id"),
    RecordField("url", "str", "the image URL that was downloaded", CORE,
                "credits (when no page_url), takedown --url, export --recheck-opt-outs"),
    RecordField("term", "str", "the recipe term that found it", CORE,
                "export --by, review facets, card"),
    RecordField("lang", "str", "the language of the wording that found it", CORE, "export (hf)"),
    RecordField("query", "str", "the wording sent to the source", CORE, "review"),
    RecordField("file", "object", "the stored picture: `path` (relative to the output, "
                "forward slashes), `bytes`, `sha256`, `width`, `height`, `format`", CORE,
                "every reader of an output (paths are resolved inside it)"),
    RecordField("duplicate_of", "str", "id of the record holding the same bytes (an exact "
                "copy; not a training sample)", CORE, "credits, export, review, shard sinks"),
    RecordField("original", "object", "`sha256` of the picture as downloaded, when the "
                "stored file was changed (resized, faces blurred)", CORE, "takedown --sha256"),
    # Description and rights: sources fill them; credits and exports read them.
    RecordField("title", "str", "the picture's title at its source", "sources",
                "credits, license (attribution), export (hf), review"),
    RecordField("description", "str", "free text from the source", "sources", "review"),
    RecordField("page_url", "str", "the picture's page at its source (https)", "sources",
                "credits, license (attribution), export (hf), review"),
    RecordField("author", "str", "the creator's name", "sources",
                "credits, license (attribution), takedown --owner", personal=True),
    RecordField("owner", "str", "the uploader's account id", "sources",
                "license (attribution), takedown --owner", personal=True),
    RecordField("owner_name", "str", "the uploader's display name", "sources",
                "credits, license (attribution), takedown --owner", personal=True),
    RecordField("path_alias", "str", "the uploader's alias (a Flickr URL name)", "sources",
                "credits, takedown --owner", personal=True),
    RecordField("license", "str", "an SPDX id (`CC-BY-4.0`, `CC0-1.0`) or "
                "`LicenseRef-...`; absent or null when unknown", "sources",
                "license (filter), credits, card, export, review, near_duplicates (keep rank)"),
    RecordField("license_url", "str", "the license's deed", "sources",
                "credits, license (attribution), export (hf)"),
    RecordField("attribution", "str", "the credit line to show with the picture", "license",
                "credits, export, card, review", personal=True),
    # Place: from the source or EXIF; names from the offline geocoder.
    RecordField("latitude", "float", "WGS84 degrees", "sources, exif", "geocode",
                personal=True),
    RecordField("longitude", "float", "WGS84 degrees", "sources, exif", "geocode",
                personal=True),
    RecordField("geo_origin", "str", "where the coordinates came from (`flickr`, `exif`)",
                "sources, exif", "review"),
    RecordField("country", "str", "country name (ISO 3166)", "geocode",
                "card, export, review facets"),
    RecordField("country_code", "str", "ISO 3166-1 alpha-2 code", "geocode", "export (hf)"),
    RecordField("city", "str", "nearest GeoNames place", "geocode", "export, review facets"),
    RecordField("exif", "object", "EXIF tags by IFD (`IFD0`, `Exif`, `GPS`)", "exif",
                "review (camera)", personal=True),
    # Cleaning: what enrichers decide; review and export follow it.
    RecordField("keep", "bool", "false when an enricher's `keep_if` failed; enrichers only "
                "ever turn it to false", "vision, quality, safety, relevance", "review, export"),
    RecordField("scores", "object", "a score per term (0..1) from a label scorer",
                "vision", "review, export, keep_if"),
    RecordField("labels", "object", "label -> confidence", "vision", "review"),
    RecordField("quality", "object", "pixel quality scores (blur, exposure, ...)", "quality",
                "review, keep_if"),
    RecordField("safety", "object", "nsfw and face scores", "safety", "review, keep_if"),
    RecordField("matched_in", "list", "where the search's wording appears in the source's "
                "text: `title`, `tags`, `description` (only the description: the likeliest "
                "false positive)", "flickr", "review facets"),
    RecordField("imagenet", "object", "the ImageNet classes EfficientNet-Lite0 sees, with "
                "their probabilities (the top 5)", "embed", "review"),
    RecordField("relevance", "object", "offline relevance scores, 0..1: `imagenet.<term>` "
                "and `typicality.<term>`", "relevance", "review, keep_if"),
    RecordField("near_duplicate_of", "str", "id of the kept picture this one nearly copies "
                "(not a training sample)", "near_duplicates",
                "review, export, takedown --near-duplicates, shard sinks"),
    RecordField("near_duplicate_distance", "int", "Hamming distance to the nearest picture "
                "of its group", "near_duplicates",
                "review"),
    RecordField("near_duplicate_similarity", "float", "cosine similarity of the embeddings "
                "when they, not the hashes, found the copy (with embed)", "near_duplicates",
                "review"),
    RecordField("phash", "str", "64-bit perceptual hash, hex", "near_duplicates",
                "near_duplicates (later runs and shards)"),
    RecordField("dhash", "str", "64-bit difference hash, hex", "near_duplicates",
                "near_duplicates (later runs and shards)"),
    RecordField("blurred_faces", "list", "face boxes blurred before the picture was written",
                CORE, "review"),
)

BY_NAME = {f.name: f for f in RECORD_FIELDS}


def fields_reference() -> str:
    """The docs' record field reference, as Markdown."""
    lines = ["# Record fields", "",
             "Generated by `harvest plugins --fields` from `core/fields.py` (a test keeps "
             "this page equal to that output). These are the fields that more than one part "
             "reads: a plugin that writes one of them keeps its meaning; any other field a "
             "source or enricher adds is stored as it is. Fields marked personal are "
             "protected by the sinks (`personal_fields`: omitted, encrypted or in clear) "
             "when the plugin that writes them names them in `record.personal`.", "",
             "| field | type | meaning | written by | read by | personal |",
             "|---|---|---|---|---|---|"]
    for f in RECORD_FIELDS:
        lines.append(f"| `{f.name}` | {f.type} | {f.meaning} | {f.written_by} | {f.read_by} "
                     f"| {'yes' if f.personal else ''} |")
    return "\n".join(lines) + "\n"
