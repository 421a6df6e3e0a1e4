"""The dataset card of an export: ``README.md`` with Hugging Face front matter, and the
same facts as Croissant JSON-LD (``croissant.json``), which MLCommons' tools and dataset
search engines read. Both are written from what the export actually holds."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# SPDX-style license ids harvest records carry -> Hugging Face's license identifiers.
HF_LICENSES = {"CC0-1.0": "cc0-1.0", "PDM-1.0": "other", "CC-BY-4.0": "cc-by-4.0",
               "CC-BY-SA-4.0": "cc-by-sa-4.0", "CC-BY-NC-4.0": "cc-by-nc-4.0",
               "CC-BY-NC-SA-4.0": "cc-by-nc-sa-4.0", "CC-BY-ND-4.0": "cc-by-nd-4.0",
               "CC-BY-NC-ND-4.0": "cc-by-nc-nd-4.0", "CC-BY-2.0": "cc-by-2.0",
               "CC-BY-3.0": "cc-by-3.0",
               "CC-BY-SA-3.0": "cc-by-sa-3.0"}
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
               "TIFF": "image/tiff", "BMP": "image/bmp", "MPO": "image/jpeg"}
EXTENSIONS = {"JPEG": ["jpg", "jpeg"], "PNG": ["png"], "WEBP": ["webp"], "GIF": ["gif"],
              "TIFF": ["tif", "tiff"], "BMP": ["bmp"], "MPO": ["jpg", "mpo"]}


@dataclass
class Tally:
    """What an export holds, counted while it is written."""

    images: int = 0
    bytes: int = 0
    licenses: Counter = field(default_factory=Counter)
    countries: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    classes: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)

    def add(self, record: dict, label: str) -> None:
        info = record.get("file") or {}
        self.images += 1
        self.bytes += int(info.get("bytes") or 0)
        self.licenses[_text(record.get("license")) or "unknown"] += 1
        self.countries[_text(record.get("country")) or "unknown"] += 1
        self.sources[_text(record.get("source")) or "unknown"] += 1
        self.classes[label] += 1
        if _text(record.get("lang")):
            self.languages[record["lang"]] += 1
        self.formats[_text(info.get("format")) or "unknown"] += 1


def write_card(destination: Path, name: str, tally: Tally, *, fmt: str,
               metadata_file: str, columns: dict[str, str] | None = None) -> None:
    """``metadata_file``: the table of the export (manifest.csv or metadata.jsonl) the
    Croissant record set reads its fields from. ``columns``: the metadata's columns
    besides the image and the label, and their ``datasets`` types (``string``, ``int64``):
    the card then declares the features, the label a ``ClassLabel`` of the classes."""
    (destination / "README.md").write_text(_readme(name, tally, fmt, columns),
                                           encoding="utf-8")
    (destination / "croissant.json").write_text(
        json.dumps(_croissant(destination, name, tally, metadata_file), indent=1,
                   ensure_ascii=False) + "\n", encoding="utf-8")


def _license_summary(tally: Tally) -> str:
    known = [lic for lic in tally.licenses if lic != "unknown"]
    if len(tally.licenses) == 1 and known:
        return HF_LICENSES.get(known[0], "other")
    return "other"


def _size_category(count: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if count < limit:
            return label
    return "10M<n<100M"


def _readme(name: str, tally: Tally, fmt: str, columns: dict[str, str] | None = None) -> str:
    front = {
        "pretty_name": name,
        "license": _license_summary(tally),
        "task_categories": ["image-classification"],
        "size_categories": [_size_category(tally.images)],
        "tags": ["harvest", "image"],
    }
    if columns is not None:
        # What `datasets.load_dataset(FOLDER)` reads the types from: without it the label
        # taken from metadata.jsonl is a string, and a classifier wants a ClassLabel.
        names = {str(index): label for index, label in enumerate(sorted(tally.classes))}
        front["configs"] = [{"config_name": "default", "features": [
            {"name": "image", "dtype": "image"},
            {"name": "label", "dtype": {"class_label": {"names": names}}},
            *({"name": column, "dtype": dtype} for column, dtype in columns.items())]}]
    if tally.languages:
        front["language"] = sorted({lang.split("-")[0] for lang in tally.languages})
    if front["license"] == "other":
        front["license_name"] = "mixed"
        front["license_details"] = "Each image keeps its own license: see the license column " \
                                   "and CREDITS.md."
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {name}", "",
             f"{tally.images:,} images ({tally.bytes / 1e6:,.1f} MB), harvested with "
             f"[harvest](https://github.com/harvest-dataset/harvest) and exported as `{fmt}`.",
             "Each image's license, attribution and source page are in the metadata and in "
             "`CREDITS.md` / `credits.csv`: reusing an image means crediting it as its license "
             "asks.", ""]
    for title, counter in (("Licenses", tally.licenses), ("Classes", tally.classes),
                           ("Sources", tally.sources), ("Countries", tally.countries)):
        lines += [f"## {title}", "", "| | images |", "|---|---:|"]
        lines += [f"| {_cell(key)} | {count:,} |" for key, count in counter.most_common(50)]
        if len(counter) > 50:
            lines.append(f"| ({len(counter) - 50} more) | |")
        lines.append("")
    lines += ["## Personal data", "",
              "Fields harvest marks as personal (owner names and ids, EXIF) are left out of "
              "the export unless it was made with the key of an encrypted harvest.", ""]
    return "\n".join(lines)


def _cell(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _croissant(destination: Path, name: str, tally: Tally, metadata_file: str) -> dict:
    table = destination / metadata_file
    digest = hashlib.sha256(table.read_bytes()).hexdigest()
    table_type = "text/csv" if metadata_file.endswith(".csv") else "application/jsonlines"
    image_sets = []
    for image_format in sorted(f for f in tally.formats if f in MEDIA_TYPES):
        image_sets.append({
            "@type": "cr:FileSet", "@id": f"images-{image_format.lower()}",
            "name": f"images-{image_format.lower()}",
            "encodingFormat": MEDIA_TYPES[image_format],
            "includes": [f"**/*.{ext}" for ext in EXTENSIONS[image_format]]})
    columns = ("path", "class", "id", "source", "term", "license", "attribution", "country",
               "width", "height", "sha256") if metadata_file.endswith(".csv") else (
        "file_name", "label", "id", "source", "term", "license", "attribution", "country",
        "width", "height", "sha256")
    numbers = {"width", "height"}
    fields = [{"@type": "cr:Field", "@id": f"records/{column}", "name": column,
               "dataType": "sc:Integer" if column in numbers else "sc:Text",
               "source": {"fileObject": {"@id": "metadata"}, "extract": {"column": column}}}
              for column in columns]
    licenses = [lic for lic in tally.licenses if lic != "unknown"]
    return {
        "@context": {
            "@language": "en", "@vocab": "https://schema.org/", "sc": "https://schema.org/",
            "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
            "dct": "http://purl.org/dc/terms/", "citeAs": "cr:citeAs", "column": "cr:column",
            "equivalentProperty": "cr:equivalentProperty", "samplingRate": "cr:samplingRate",
            "conformsTo": "dct:conformsTo", "data": {"@id": "cr:data", "@type": "@json"},
            "dataType": {"@id": "cr:dataType", "@type": "@vocab"}, "examples":
                {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract",
            "field": "cr:field", "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject",
            "fileSet": "cr:fileSet", "format": "cr:format", "includes": "cr:includes",
            "isLiveDataset": "cr:isLiveDataset", "jsonPath": "cr:jsonPath", "key": "cr:key",
            "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path",
            "recordSet": "cr:recordSet", "references": "cr:references", "regex": "cr:regex",
            "repeated": "cr:repeated", "replace": "cr:replace", "separator": "cr:separator",
            "source": "cr:source", "subField": "cr:subField", "transform": "cr:transform"},
        "@type": "sc:Dataset",
        "conformsTo": "http://mlcommons.org/croissant/1.0",
        "name": name,
        "description": f"{tally.images} images harvested with harvest; licenses: "
                       + ", ".join(f"{k} ({v})" for k, v in tally.licenses.most_common())
                       + "; credits in CREDITS.md.",
        "url": "https://github.com/harvest-dataset/harvest",
        "license": (licenses if len(licenses) != 1 else licenses[0]) or "unknown: see CREDITS.md",
        "datePublished": dt.date.today().isoformat(),
        "version": "1.0.0",
        "citeAs": f"{name} (images harvested with harvest; credits in CREDITS.md)",
        "distribution": [
            {"@type": "cr:FileObject", "@id": "metadata", "name": "metadata",
             "contentUrl": metadata_file, "encodingFormat": table_type, "sha256": digest},
            *image_sets],
        "recordSet": [{"@type": "cr:RecordSet", "@id": "records", "name": "records",
                       "field": fields}],
    }


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None
