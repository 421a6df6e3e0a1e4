"""``harvest get URLS OUTPUT``: a URL list downloaded in one line, as img2dataset does it.

The command writes the recipe it runs into the output (``OUTPUT/recipe.yml``), so that the
same command again, or ``harvest run OUTPUT/recipe.yml``, resumes exactly where it stopped,
and so that what it did can be read, edited and run as any other recipe.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..download.shaping import RESIZE_MODES
from ..errors import UsageError

RECIPE_NAME = "recipe.yml"

# --format NAME: the sinks that write it (records.jsonl beside the images in every case,
# the record of what is stored).
FORMATS = {
    "files": ["jsonl"],
    "jsonl": ["jsonl"],
    "webdataset": ["jsonl", "webdataset"],
    "parquet": ["jsonl", {"use": "parquet", "options": {"images": True}}],
}
# img2dataset's other output formats, named so that asking for one says what to do.
NOT_AVAILABLE = {
    "tfrecord": "export a webdataset and convert it, or read the parquet files",
    "dummy": "harvest always stores what it downloads",
    "arrow": "the parquet files are Arrow's on-disk format (pyarrow.parquet reads them)",
}
INPUT_FORMATS = ("auto", "txt", "csv", "tsv", "jsonl", "parquet", "arrow")


def add_parser(commands) -> None:
    get = commands.add_parser(
        "get", help="download the images of a URL list into OUTPUT, no recipe needed "
                    "(writes OUTPUT/recipe.yml; the same command again resumes)")
    get.add_argument("urls", type=Path, help="the URL list: text (a URL a line), CSV, TSV, "
                     "JSONL, Parquet or Arrow")
    get.add_argument("output", type=Path, help="the output folder")
    get.add_argument("--format", default="files", metavar="FORMAT",
                     help="files (images and records.jsonl, the default), jsonl (the same), "
                          "webdataset (also tar shards) or parquet (also Parquet files "
                          "with the image bytes)")
    get.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                     help="the list's format (default: from its extension)")
    get.add_argument("--url-col", default="url", metavar="NAME",
                     help="column holding the URL (default url)")
    get.add_argument("--caption-col", default="caption", metavar="NAME",
                     help="column holding a caption, stored as title (default caption)")
    get.add_argument("--save-additional-columns", default="", metavar="A,B",
                     help="more columns carried into each record, comma-separated")
    get.add_argument("--image-size", type=int, metavar="N",
                     help="resize to N pixels (with --resize-mode; border when not given)")
    get.add_argument("--resize-mode", choices=RESIZE_MODES,
                     help="no (the default without --image-size), border (the default with "
                          "it), keep_ratio, keep_ratio_largest or center_crop")
    get.add_argument("--min-image-size", type=int, metavar="N",
                     help="drop images whose shortest side is smaller")
    get.add_argument("--concurrency", type=int, metavar="N",
                     help="downloads in flight at once (img2dataset: processes x threads)")
    get.add_argument("--workers", type=int, metavar="N",
                     help="processes that check and resize images (default one per core)")
    get.add_argument("--allow-private-addresses", action="store_true",
                     help="let URLs on loopback or private addresses be fetched")
    get.add_argument("--no-progress", action="store_true", help="no progress bar or lines")


def recipe_text(args) -> str:
    """The recipe these flags describe, as the YAML written to OUTPUT/recipe.yml."""
    if args.format in NOT_AVAILABLE:
        raise UsageError(f"--format {args.format}: not available in harvest "
                         f"({NOT_AVAILABLE[args.format]}); expected one of "
                         f"{', '.join(FORMATS)}")
    if args.format not in FORMATS:
        raise UsageError(f"--format {args.format}: expected one of {', '.join(FORMATS)}")
    if not args.urls.is_file():
        raise UsageError(f"{args.urls}: no such URL list")
    for flag, value in (("--image-size", args.image_size), ("--concurrency", args.concurrency),
                        ("--min-image-size", args.min_image_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: expected a positive number")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers {args.workers}: expected 0 or more")
    options = {"path": str(args.urls.resolve())}
    if args.input_format != "auto":
        options["format"] = args.input_format
    if args.url_col != "url":
        options["url_column"] = args.url_col
    if args.caption_col != "caption":
        options["caption_column"] = args.caption_col
    extra = [name.strip() for name in args.save_additional_columns.split(",") if name.strip()]
    if extra:
        options["save_additional_columns"] = extra
    run = {key: value for key, value in (("concurrency", args.concurrency),
                                         ("workers", args.workers)) if value is not None}
    if args.allow_private_addresses:
        run["allow_private_addresses"] = True
    images = {}
    mode = args.resize_mode or ("border" if args.image_size else "no")
    if mode != "no":
        images["resize_mode"] = mode
        if args.image_size:
            images["image_size"] = args.image_size
    if args.min_image_size:
        images["min_image_size"] = args.min_image_size
    recipe = {"name": _name(args.output), "output": "."}
    if run:
        recipe["run"] = run
    if images:
        recipe["images"] = images
    recipe["sources"] = [{"use": "urls", "options": options}]
    recipe["sinks"] = FORMATS[args.format]
    header = ("# Written by `harvest get`. The same command again, or `harvest run` on this\n"
              "# file, resumes; edit it (docs/recipe.md) and run it with `harvest run`.\n")
    return header + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True,
                                   default_flow_style=None)


def prepare_recipe(args) -> tuple[Path, bool]:
    """Writes OUTPUT/recipe.yml, or finds the one an earlier ``harvest get`` with the same
    flags wrote; (its path, whether it is new). A recipe there that says something else (it
    was edited, or other flags wrote it) is never overwritten: that run goes on with
    ``harvest run``."""
    from ..output.storage import check_output

    text = recipe_text(args)
    output = args.output
    check_output(output)
    path = output / RECIPE_NAME
    if path.is_file():
        try:
            existing = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: cannot read it ({exc})") from None
        if existing == text:
            return path, False
        raise UsageError(f"{path}: says something other than these flags (it was edited, or "
                         f"another harvest get wrote it): `harvest run {path}` goes on with "
                         f"it as it is, or give another OUTPUT")
    if path.exists() or path.is_symlink():
        raise UsageError(f"{path}: is in the way (not a file)")
    if (output / ".harvest").is_dir():
        raise UsageError(f"{output}: holds another recipe's harvest (no {RECIPE_NAME}); give "
                         f"another OUTPUT")
    output.mkdir(parents=True, exist_ok=True)
    temporary = output / f".{RECIPE_NAME}.{os.getpid()}.tmp"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path, True


def forget_recipe(path: Path, made_output: bool) -> None:
    """A recipe that did not load (a column the list lacks) is not left behind to be
    refused as 'something other' when the corrected command comes."""
    path.unlink(missing_ok=True)
    if made_output:
        try:
            path.parent.rmdir()
        except OSError:
            pass


def _name(output: Path) -> str:
    return output.resolve().name or "harvest"
