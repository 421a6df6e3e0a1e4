"""``near_duplicates``: the same picture resized, re-encoded, lightly cropped or brightened
by another site is found by its perceptual hashes, across sources, terms and runs.

Each stored image gets a pHash and a dHash (64 bits each, via ``imagehash``, from a small
decode: JPEGs are read at 1/8 scale, which is all a 32x32 hash needs). Two images are
near-duplicates when their pHashes differ in at most ``max_distance`` bits and their
dHashes in at most ``max_dhash_distance`` (two views of the picture must agree, which keeps
distinct pictures of similar colours apart). The hashes live in the output folder
(``.harvest/near-duplicates.sqlite``), so later runs compare against earlier ones, and in
memory in a multi-index (``near_duplicates_hamming.HammingIndex``) that never compares all
pairs. The decisions are the ``CopyRegistry``'s (``near_duplicates_registry``), a shared
service of the pipeline's coordinator: on a cluster it lives on the scheduler, so copies
are found across every worker.

With the ``embed`` enricher before it, a picture is also a copy of one whose embedding is
at least ``min_similarity`` alike (cosine): crops, borders and small rotations, which the
hashes miss. Pictures whose hashes match are copies whatever the embeddings say. A higher
``min_similarity`` keeps more same-scene shots apart; 1 turns the embeddings off.

Which copy is kept: the largest (width x height), then the one with the most reusable
license (public domain, then CC BY, CC BY-SA, other licenses, unknown), then the earliest.
A copy found later is marked (``near_duplicate_of``, ``near_duplicate_distance``) or, with
``action: drop``, dropped. When the later copy is the better one, it is kept, and the
earlier one (already stored) is set aside: ``harvest export`` leaves it out.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from harvest.core import (
    Bool,
    Choice,
    EmbeddingStore,
    Enricher,
    Float,
    Int,
    Option,
    Record,
    hookimpl,
    inside,
    set_aside,
)

from .near_duplicates_registry import STORE_NAME, CopyRegistry, CopyStore

SERVICE = "near_duplicates"  # the registry's name among the coordinator's shared services

LICENSE_RANK = (("CC0", 5), ("PDM", 5), ("CC-BY-SA", 3), ("CC-BY-ND", 2), ("CC-BY-NC", 2),
                ("CC-BY", 4))


def license_rank(license_id: str | None) -> int:
    if not license_id:
        return 0
    for prefix, rank in LICENSE_RANK:
        if license_id.upper().startswith(prefix):
            return rank
    return 1


VIEWS = {"mirrored": ImageOps.mirror,
         "rotated 90": lambda image: image.transpose(Image.Transpose.ROTATE_270),
         "rotated 180": lambda image: image.transpose(Image.Transpose.ROTATE_180),
         "rotated 270": lambda image: image.transpose(Image.Transpose.ROTATE_90)}


def perceptual_hashes(path, views=()) -> tuple[int, int, list[tuple[str, int, int]]]:
    """(pHash, dHash) of an image file as displayed (EXIF orientation applied), as
    unsigned 64-bit integers, then (name, pHash, dHash) of each of
    ``views`` (names of ``VIEWS``: the picture mirrored, rotated...)."""
    import imagehash

    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("L", (64, 64))
        image.load()
        # The picture as displayed: a camera or phone stores it sideways and says so in
        # its EXIF orientation, and the same picture saved upright must hash the same.
        grey = ImageOps.exif_transpose(image).convert("L")

    def hashes(picture) -> tuple[int, int]:
        return int(str(imagehash.phash(picture)), 16), int(str(imagehash.dhash(picture)), 16)

    phash, dhash = hashes(grey)
    return phash, dhash, [(name, *hashes(VIEWS[name](grey))) for name in views]


class NearDuplicateEnricher(Enricher):
    """Marks or drops near-duplicate pictures (perceptual hashes), across runs."""

    options = (
        Option("max_distance", Int(0, 11), 9,
               help="most pHash bits (of 64) two copies may differ in"),
        Option("max_dhash_distance", Int(0, 64), 14,
               help="most dHash bits two copies may differ in (a second opinion)"),
        Option("mirrored", Bool(), True,
               help="also find copies flipped left to right (as blogs and ads do)"),
        Option("rotated", Bool(), True,
               help="also find copies turned by 90, 180 or 270 degrees"),
        Option("min_similarity", Float(0.5, 1.0), 0.85,
               help="with embed before it: pictures whose embeddings are at least this alike "
                    "(cosine) are copies too (crops, borders, small rotations); higher keeps "
                    "same-scene shots apart, 1 turns it off"),
        Option("action", Choice("mark", "drop"), "mark",
               help="mark later copies (near_duplicate_of) or drop them"),
    )

    def open(self) -> None:
        # Opened while a cluster's client plans too: the registry is loaded from every
        # store of the output there, once, before any worker asks for it.
        self.context.coordinator.service(SERVICE, CopyRegistry.from_stores,
                                         self.context.output_state_dirs)
        self.store: CopyStore | None = None  # what this pipeline placed, made when first used
        self.context.declare_derived(STORE_NAME, "hashes", "id", key="record_id")
        self.embeddings = None
        if self.config["min_similarity"] < 1 and self._embedded_before():
            self.embeddings = EmbeddingStore(self.context.state_dir)
        self.views = (("mirrored",) if self.config["mirrored"] else ()) + (
            ("rotated 90", "rotated 180", "rotated 270") if self.config["rotated"] else ())

    def _embedded_before(self) -> bool:
        """Whether an embedding enricher opened before this one writes this output's
        embeddings (so each picture's is stored by the time it gets here)."""
        try:
            from .efficientnet_lite import EMBEDDING_WRITERS
        except ImportError:
            return False
        return self.context.state_dir.resolve() in EMBEDDING_WRITERS

    def close(self) -> None:
        if self.embeddings is not None:
            self.embeddings.close()
            self.embeddings = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def enrich(self, records: list[Record]) -> None:
        output = self.context.output_dir.resolve()
        work = []
        for record in records:
            if record.file is None or record.duplicate_of:
                continue  # an exact copy: its original carries the hashes
            phash, dhash, views = perceptual_hashes(inside(output, record.file.path),
                                                    self.views)
            record.fields["phash"], record.fields["dhash"] = f"{phash:016x}", f"{dhash:016x}"
            work.append((record, [record.id, phash, dhash, record.file.width
                                  * record.file.height,
                                  license_rank(record.fields.get("license")), views,
                                  record.file.sha256, None]))
        if not work:
            return
        if self.embeddings is not None:
            vectors = self.embeddings.vectors([record.file.sha256 for record, _ in work])
            for record, item in work:
                vector = vectors.get(record.file.sha256)
                item[7] = None if vector is None else vector.astype(np.float16)
        batch = [tuple(item) for _, item in work]
        work = [record for record, _ in work]
        decisions, changed = self.context.coordinator.call(
            SERVICE, "place", batch, self.config["max_distance"],
            self.config["max_dhash_distance"], self.config["min_similarity"])
        if self.store is None:
            self.store = CopyStore(self.context.state_dir)
        self.store.save(changed)
        for record, decision in zip(work, decisions, strict=True):
            if "copy_of" in decision:
                first_id, distance = decision["copy_of"], decision["distance"]
                record.fields["near_duplicate_of"] = first_id
                record.fields["near_duplicate_distance"] = distance
                if decision.get("similarity") is not None:
                    record.fields["near_duplicate_similarity"] = decision["similarity"]
                if decision.get("view") == "mirrored":
                    record.fields["near_duplicate_mirrored"] = True
                elif decision.get("view"):
                    record.fields["near_duplicate_view"] = decision["view"]
                if self.config["action"] == "drop":
                    record.drop(f"near duplicate of {first_id} (distance {distance})")
            for earlier_id, distance, kept_id in decision["set_aside"]:
                why = ("which is larger or better licensed" if kept_id == record.id else
                       f"through {record.id}, which links their groups")
                set_aside(self.context.output_dir, earlier_id,
                          f"near duplicate of {kept_id} (distance {distance}), {why}",
                          self.context.name, copy_of=kept_id)


@hookimpl
def harvest_enrichers():
    return {"near_duplicates": NearDuplicateEnricher}
