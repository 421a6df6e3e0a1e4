"""``folder``: harvest an image collection that is already on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from harvest.core import Bool, ListOf, Option, Query, Record, Source, Str, hookimpl
from harvest.core import Path as PathOption

# Leading bytes of the formats Pillow reads that cameras and the web use.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
          b"BM")


def looks_like_image(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError:
        return False
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head.startswith(_MAGIC)


class FolderSource(Source):
    """Images already on disk, found by extension and by content."""

    uses_terms = False
    reads_local_files = True
    options = (
        Option("path", PathOption(exists="dir"), required=True,
               help="folder to read (relative to the recipe)"),
        Option("recursive", Bool(), True, help="descend into sub-folders"),
        Option("extensions", ListOf(Str()), ["jpg", "jpeg", "png", "gif", "webp", "tif", "tiff",
                                             "bmp"], help="file extensions taken as images"),
        Option("sniff", Bool(), True,
               help="also take files with other extensions whose content is an image"),
        Option("term", Str(), None, help="term to label every record with (default: none)"),
        Option("language", Str(), "en", help="language of `term`"),
        Option("follow_links", Bool(), False,
               help="follow symbolic links that lead out of the folder"),
    )

    def records(self, query: Query | None) -> Iterator[Record]:
        root = Path(self.config["path"])
        if not root.is_dir():
            raise FileNotFoundError(f"folder not found: {root}")
        extensions = {e.lower().lstrip(".") for e in self.config["extensions"]}
        term = self.config["term"]
        label = Query(term, self.config["language"], term) if term else None
        follow = self.config["follow_links"]
        real_root = root.resolve()
        for folder, subfolders, files in os.walk(root, followlinks=follow):
            subfolders.sort()
            if not self.config["recursive"]:
                subfolders.clear()
            for name in sorted(files):
                path = Path(folder) / name
                if not path.is_file():
                    continue
                if not follow and path.is_symlink() \
                        and not path.resolve().is_relative_to(real_root):
                    self.log.info("%s: a link out of the folder; skipped (follow_links "
                                  "follows it)", path.relative_to(root).as_posix())
                    continue
                extension = path.suffix.lower().lstrip(".")
                if extension not in extensions and not (self.config["sniff"] and looks_like_image(path)):
                    continue
                relative = path.relative_to(root).as_posix()
                yield Record(source="folder", source_id=relative, url=path.resolve().as_uri(),
                             query=label, fields={"relative_path": relative, "title": path.stem})


@hookimpl
def harvest_sources():
    return {"folder": FolderSource}
