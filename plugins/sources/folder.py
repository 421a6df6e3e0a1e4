"""``folder``: harvest an image collection that is already on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harvest.core import Bool, Int, ListOf, Option, Query, Record, Source, Str, hookimpl
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
        Option("shard_size", Int(1, None), 10_000,
               help="on a cluster, the folder is read in shards of about this many files, "
                    "side by side"),
    )

    def records(self, query: Query | None) -> Iterator[Record]:
        root = Path(self.config["path"])
        if not root.is_dir():
            raise FileNotFoundError(f"folder not found: {root}")
        if query is not None and query.part is not None:
            for folder, first, last in query.part:
                names = sorted(entry.name for entry in os.scandir(root / folder)
                               if first <= entry.name <= last)
                yield from self._records(root, root / folder, names)
            return
        for folder, names in self._walk(root):
            yield from self._records(root, Path(folder), names)

    def partitions(self, query: Query | None, limit: int | None) -> list[tuple[Any, int | None]]:
        """Runs of about ``shard_size`` files in walk order, so that a cluster's workers
        read a big collection side by side: each part is a list of (folder, first name,
        last name) ranges, a big folder cut into several."""
        if limit is not None:
            return [(None, limit)]
        root = Path(self.config["path"])
        parts: list[list] = [[]]
        count = 0
        for folder, names in self._walk(root):
            relative = Path(folder).relative_to(root).as_posix()
            while names:
                room = self.config["shard_size"] - count
                taken, names = names[:room], names[room:]
                parts[-1].append([relative, taken[0], taken[-1]])
                count += len(taken)
                if count >= self.config["shard_size"]:
                    parts.append([])
                    count = 0
        parts = [part for part in parts if part]
        if len(parts) <= 1:
            return [(None, limit)]
        return [(part, None) for part in parts]

    def _walk(self, root: Path) -> Iterator[tuple[str, list[str]]]:
        for folder, subfolders, files in os.walk(root, followlinks=self.config["follow_links"]):
            subfolders.sort()
            if not self.config["recursive"]:
                subfolders.clear()
            yield folder, sorted(files)

    def _records(self, root: Path, folder: Path, names: list[str]) -> Iterator[Record]:
        extensions = {e.lower().lstrip(".") for e in self.config["extensions"]}
        term = self.config["term"]
        label = Query(term, self.config["language"], term) if term else None
        follow = self.config["follow_links"]
        real_root = root.resolve()
        for name in names:
            path = folder / name
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
