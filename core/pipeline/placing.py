"""The files stage: a checked download becomes the output folder's file for its content.

The same bytes are stored once: a second record with them points at the first one's
file (``duplicate_of``). Names come from the record (``storage.image_relpath``); a name
taken by other bytes gets the content's hash as a suffix. On a cluster the content and
the path are claimed on the scheduler first, so two shards never store the same bytes
twice or write one path with two contents. Runs on the engine's thread only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

from ..download.fetch import Fetched
from ..errors import RecordError
from ..output.storage import image_relpath, move_inside, open_inside
from ..record import Record
from .downloading import Download
from .run import RunContext


class ImagePlacer:
    def __init__(self, context: RunContext):
        self.context = context
        self.images_root = context.folders.output
        self.output_root = self.images_root.resolve()
        self.state = context.state
        self.coordinator = context.coordinator

    def place(self, record: Record, download: Download) -> None:
        """Stores the file once per content; a second record with the same bytes points at
        it. ``download.claim``: the content claim the download thread made (cluster shards)."""
        fetched, early = download.fetched, download.claim
        if fetched.file.sha256 in self.state.tombstones:
            fetched.temp_path.unlink(missing_ok=True)
            raise RecordError("taken down: this picture was removed by `harvest takedown`")
        known = self.state.file(fetched.file.sha256)
        if known is not None and (self.images_root / known[0].path).is_file():
            fetched.temp_path.unlink(missing_ok=True)
            record.file, first_id = known
            if first_id != record.id:
                record.duplicate_of = first_id
                self.context.count(record, "duplicate")
        else:
            relpath, owner = self._free_path(record, fetched, early)
            if owner not in (None, record.id):
                # Another shard of the cluster stored these bytes first, at relpath.
                fetched.temp_path.unlink(missing_ok=True)
                record.duplicate_of = owner
                self.context.count(record, "duplicate")
            else:
                try:
                    move_inside(fetched.temp_path, self.output_root, relpath)
                except ValueError as exc:  # a link planted in the output folder during the run
                    raise RecordError(str(exc), permanent=False) from None
                except FileNotFoundError:  # the temporary folder was swapped meanwhile
                    raise RecordError("the download vanished from the temporary folder before "
                                      "it was stored", permanent=False) from None
            record.file = replace(fetched.file, path=relpath)
            self.state.add_file(record.file, owner or record.id)
        if fetched.original is not None:
            record.fields["original"] = fetched.original.content()
        if fetched.faces:
            record.fields["blurred_faces"] = fetched.faces
        record.analyses = fetched.analyses
        self.context.finish(record, "files", "downloaded")

    def _free_path(self, record: Record, fetched: Fetched, early) -> tuple[str, str | None]:
        """Where the file goes, and the record that holds these bytes when another one
        does (then the path is that record's). ``early``: the claim the download thread made."""
        folder = record.term or record.source
        relpath = image_relpath(folder, record.source, record.source_id, fetched.file.format)

        def suffixed() -> str:
            return image_relpath(folder, record.source, record.source_id, fetched.file.format,
                                 suffix="-" + fetched.file.sha256[:8])

        owner = self.state.path_owner(relpath)
        # A file at a path the committed state does not know was left by a batch that
        # never committed; no stored record points at it, so it may be replaced.
        if owner not in (None, fetched.file.sha256) or (
                owner is not None and self._sha256(relpath) not in (None, fetched.file.sha256)):
            relpath = suffixed()
        claim = early[1] if early is not None and early[0] == relpath else \
            self.coordinator.claim_file(fetched.file.sha256, record.id, relpath)
        if claim.path_taken:
            relpath = suffixed()
            claim = self.coordinator.claim_file(fetched.file.sha256, record.id, relpath)
            if claim.path_taken:
                raise RecordError(f"no free path for {relpath}", permanent=False)
        # With an owner, the path is where the owner's file is (a retried shard's own
        # record included: where its first try put it).
        return claim.path or relpath, claim.owner

    def _sha256(self, relpath: str) -> str | None:
        """The hash of the file at ``relpath``; None when there is none."""
        try:
            fd = open_inside(self.output_root, relpath)
        except FileNotFoundError:
            return None
        except ValueError as exc:  # a link planted in the output folder during the run
            raise RecordError(str(exc), permanent=False) from None
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def reuse(self, record: Record, known) -> bool:
        """A record downloaded by an earlier, interrupted run: use its file, skip the network."""
        if known.sha256 is None:
            return False
        stored = self.state.file(known.sha256)
        if stored is None or not (self.images_root / stored[0].path).is_file():
            return False
        record.file, first_id = stored
        if first_id != record.id:
            record.duplicate_of = first_id
        self.context.count(record, "downloaded")  # the run state says so already
        return True

