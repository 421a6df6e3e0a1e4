"""``webdataset``: tar shards of samples (``KEY.jpg``, ``KEY.json``, ``KEY.txt``), the
format the ``webdataset`` package streams for training; as img2dataset writes them."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

from harvest.core import ShardedSink, hookimpl, json_default, shard_options


class WebDatasetSink(ShardedSink):
    """Samples in numbered tar shards: the image, its record as JSON, its caption."""

    suffix = ".tar"
    options = shard_options("webdataset", images_default=True)

    def build(self, documents: Iterator[dict], path: Path, shard: int) -> dict:
        count, image_bytes = 0, 0
        licenses: Counter = Counter()
        terms: Counter = Counter()
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for index, document in enumerate(documents):
                key = f"{shard:05d}{index:05d}"
                members: list[tuple[str, bytes]] = []
                if self.config["images"]:
                    image = self.image_bytes(document)
                    if image is None:
                        continue
                    members.append((image[1], image[0]))
                    image_bytes += len(image[0])
                members.append(("json", json.dumps({**document, "key": key}, ensure_ascii=False,
                                                   default=json_default).encode("utf-8")))
                caption = document.get("title")
                if isinstance(caption, str) and caption:
                    members.append(("txt", caption.encode("utf-8")))
                for extension, data in members:
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, BytesIO(data))
                count += 1
                licenses[str(document.get("license") or "unknown")] += 1
                terms[str(document.get("term") or "")] += 1
        return {"shard": f"{shard:05d}{self.suffix}", "count": count, "image_bytes": image_bytes,
                "licenses": dict(licenses), "terms": dict(terms)}

    def documents_in(self, number: int):
        with self._open_shard(number) as handle, tarfile.open(fileobj=handle) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    document = json.load(tar.extractfile(member))
                    document.pop("key", None)
                    yield document

    def ids_in(self, handle) -> set[str]:
        ids = set()
        with tarfile.open(fileobj=handle) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    ids.add(json.load(tar.extractfile(member))["id"])
        return ids


@hookimpl
def harvest_sinks():
    return {"webdataset": WebDatasetSink}
