"""``mongodb``: records upserted into a MongoDB collection, personal fields encrypted."""

from __future__ import annotations

from typing import Any

from harvest.core import (
    PROTECTION_OPTIONS,
    Int,
    Option,
    PluginConfigError,
    Protection,
    Record,
    Sink,
    Str,
    check_protection,
    hookimpl,
)

DUPLICATE_KEY = 11000
INDEXED = ("term", "lang", "source", "country_code", "license", "file.sha256")


class MongoSink(Sink):
    """Records upserted by id into MongoDB (bulk writes, indexes, field encryption)."""

    shared = True  # every worker of a cluster writes here; the unique id index dedups

    options = (
        Option("uri", Str(), "mongodb://127.0.0.1:27017",
               help="connection URI; write ${MONGODB_URI} when it holds a password"),
        Option("database", Str(), "harvest", help="database name"),
        Option("collection", Str(), None, help="collection name (default: the recipe's name)"),
        Option("timeout_ms", Int(100, 600_000), 5000,
               help="how long to wait for the server before a batch counts as pending"),
        *[option if option.name != "personal_fields" else
          Option("personal_fields", option.type, "encrypt", help=option.help)
          for option in PROTECTION_OPTIONS],
    )

    @classmethod
    def check_options(cls, options) -> None:
        check_protection(options)

    def open(self) -> None:
        import pymongo  # here, not at import: recipes without this sink should not load it
        from pymongo.errors import ConfigurationError

        self.protection = Protection(self.config)
        timeout = self.config["timeout_ms"]
        try:
            self.client = pymongo.MongoClient(self.config["uri"], serverSelectionTimeoutMS=timeout,
                                              connectTimeoutMS=timeout, socketTimeoutMS=timeout * 4,
                                              tz_aware=True)
        except ConfigurationError as exc:
            raise PluginConfigError(f"{self.context.name}: bad MongoDB URI: {exc}") from None
        self.name = self.config["collection"] or self.context.recipe_name
        self._indexed = False

    def _collections(self) -> None:
        """Made at the first write, once the server is known: writes are acknowledged
        only once journaled (a server killed -9 right after loses none of them), and on a
        replica set only once a majority has them."""
        from pymongo import WriteConcern

        replica_set = self.client.topology_description.topology_type_name == \
            "ReplicaSetWithPrimary"
        concern = WriteConcern(w="majority" if replica_set else 1, j=True)
        database = self.client.get_database(self.config["database"], write_concern=concern)
        self.collection = database[self.name]
        # One document per image content, keyed by sha256: its unique _id index decides
        # which record holds the content, however many writers race (cluster workers,
        # separate runs sharing the collection).
        self.contents = database[f"{self.name}.contents"]

    def _ensure_indexes(self) -> None:
        from pymongo import ASCENDING

        if self._indexed:
            return
        self.client.admin.command("ping")  # learn the topology before choosing a concern
        self._collections()
        self.collection.create_index([("id", ASCENDING)], unique=True, name="id_unique")
        for field in INDEXED:
            self.collection.create_index([(field, ASCENDING)])
        for term in self.context.terms:
            self.collection.create_index([(f"scores.{term.key}", ASCENDING)])
        self._indexed = True

    def write(self, records: list[Record]) -> Any:
        # Indexes are made at the first write, not at open: a server that is down at start
        # leaves the run going, with batches pending, instead of stopping it.
        from pymongo import ReplaceOne
        from pymongo.errors import OperationFailure

        self._ensure_indexes()
        documents = [self.protection.document(record) for record in records]
        self._claim_contents(records, documents)
        operations = [ReplaceOne({"id": record.id}, document, upsert=True)
                      for record, document in zip(records, documents, strict=True)]
        try:
            self.collection.bulk_write(operations, ordered=False)
        except OperationFailure as exc:
            if exc.code in (13, 18):  # Unauthorized, AuthenticationFailed
                raise PluginConfigError(f"{self.context.name}: MongoDB refused: "
                                        f"{exc.details.get('errmsg', exc)}") from None
            raise
        return None

    def _claim_contents(self, records: list[Record], documents: list[dict]) -> None:
        """Marks a record whose image content another record holds with ``duplicate_of``."""
        from pymongo.errors import BulkWriteError

        originals = [(record, document) for record, document in zip(records, documents, strict=True)
                     if record.file is not None and not record.duplicate_of]
        if not originals:
            return
        try:
            self.contents.insert_many([{"_id": record.file.sha256, "record": record.id}
                                       for record, _ in originals], ordered=False)
            return
        except BulkWriteError as exc:
            if any(error.get("code") != DUPLICATE_KEY for error in exc.details["writeErrors"]):
                raise
        owners = {claim["_id"]: claim["record"] for claim in self.contents.find(
            {"_id": {"$in": [record.file.sha256 for record, _ in originals]}})}
        for record, document in originals:
            owner = owners.get(record.file.sha256)
            if owner is not None and owner != record.id:
                document["duplicate_of"] = owner

    def remove(self, record_ids: set[str]) -> int:
        self._ensure_indexes()
        ids = sorted(record_ids)
        removed = 0
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            removed += self.collection.delete_many({"id": {"$in": chunk}}).deleted_count
            self.contents.delete_many({"record": {"$in": chunk}})
        return removed

    def missing(self, record_ids: list[str]) -> set[str]:
        self._ensure_indexes()
        found = {document["id"] for document in self.collection.find(
            {"id": {"$in": record_ids}}, {"id": 1, "_id": 0})}
        return set(record_ids) - found

    def rekey(self, rotate) -> int:
        self._ensure_indexes()
        changed = 0
        # Each document is rotated and replaced on its own: an interrupted rekey leaves
        # every document readable, and a rerun skips those already under the new key.
        for document in self.collection.find({"_encrypted": {"$exists": True}}):
            rotated = rotate(document)
            if rotated is not None:
                self.collection.replace_one({"_id": document["_id"]}, rotated)
                changed += 1
        return changed

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


@hookimpl
def harvest_sinks():
    return {"mongodb": MongoSink}
