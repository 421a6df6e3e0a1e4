"""``flickr_comments``: comments on Flickr photos (author, date, text, permalink).

Two ways in, one record shape: as a source over photo ids, photo URLs or the records of
an earlier harvest, and as an enricher that attaches comments to this run's Flickr
records. Comments come from ``flickr.photos.comments.getList`` when an API key is set,
else from the photo's page. Comment authors are personal data, like photo owners.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flickrapi
from flickrapi.exceptions import FlickrError

from harvest.core import (
    Enricher,
    ListOf,
    Option,
    PluginConfigError,
    Query,
    Record,
    Secret,
    Source,
    Str,
    hookimpl,
)
from harvest.core import Path as PathOption

logging.getLogger("flickrapi").setLevel(logging.CRITICAL)
PHOTO_URL = re.compile(r"flickr\.com/photos/([^/]+)/(\d+)")
SIZE_ORDER = ("Original", "X-Large 6K", "X-Large 5K", "X-Large 4K", "X-Large 3K", "Large 2048",
              "Large 1600", "Large", "Medium 800", "Medium 640", "Medium")

COMMON_OPTIONS = (
    Option("api_key", Secret(), None, help="Flickr API key reference; without it, pages are read"),
    Option("api_secret", Secret(), None, help="Flickr API secret reference"),
    Option("endpoint", Str(), flickrapi.FlickrAPI.REST_URL, help="REST endpoint URL"),
    Option("site", Str(), "https://www.flickr.com", help="where photo pages are (page mode)"),
)


def _iso(unix) -> str | None:
    try:
        return dt.datetime.fromtimestamp(int(unix), dt.timezone.utc).isoformat()
    except (TypeError, ValueError):
        return None


class CommentReader:
    """One way to read comments and image URLs, whichever mode the options choose."""

    def __init__(self, config: dict[str, Any], context):
        self.config, self.context = config, context
        self.session = context.session(retry_post=True)
        self.api = None
        if config["api_key"] is not None:
            if config["api_secret"] is None:
                raise PluginConfigError(f"{context.name}: api_key needs api_secret as well")
            self.api = flickrapi.FlickrAPI(config["api_key"].reveal(),
                                           config["api_secret"].reveal(),
                                           format="parsed-json", store_token=False)
            self.api.REST_URL = config["endpoint"]
            self.api.flickr_oauth.session = self.session

    def _call(self, method: str, **params) -> dict:
        try:
            return self.api.do_flickr_call(method, **params)
        except FlickrError as exc:
            if exc.code in (95, 96, 97, 98, 99, 100, 111, 112):
                raise PluginConfigError(f"{self.context.name}: the API refused the request: "
                                        f"{exc}") from None
            raise

    def comments(self, photo_id: str, owner: str | None) -> list[dict]:
        if self.api is not None:
            reply = self._call("flickr.photos.comments.getList", photo_id=photo_id)
            return [{"id": c.get("id"), "author": c.get("author"),
                     "author_name": c.get("realname") or c.get("authorname"),
                     "date": _iso(c.get("datecreate")), "text": c.get("_content", ""),
                     "permalink": c.get("permalink")}
                    for c in reply.get("comments", {}).get("comment", [])]
        return self.page(photo_id, owner)["comments"]

    def page(self, photo_id: str, owner: str | None) -> dict:
        """The photo page: its comments and its image (``og:image``)."""
        url = f"{self.config['site'].rstrip('/')}/photos/{owner or 'flickr'}/{photo_id}/"
        response = self.session.get(url)
        response.raise_for_status()
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(response.text, "html.parser")
        comments = []
        for node in soup.select(".comment-container"):
            author = node.select_one(".comment-author")
            date = node.select_one("[data-timestamp]")
            text = node.select_one(".comment-content")
            link = node.select_one("a.comment-permalink")
            comments.append({
                "id": (node.get("id") or "").removeprefix("comment") or None,
                "author": author.get("data-nsid") if author else None,
                "author_name": author.get_text(strip=True) if author else None,
                "date": _iso(date.get("data-timestamp")) if date else None,
                "text": text.get_text("\n", strip=True) if text else "",
                "permalink": link.get("href") if link else None})
        image = soup.select_one('meta[property="og:image"]')
        return {"comments": comments, "image": image.get("content") if image else None}

    def image_url(self, photo_id: str, owner: str | None) -> str | None:
        if self.api is not None:
            sizes = self._call("flickr.photos.getSizes", photo_id=photo_id)["sizes"]["size"]
            by_label = {size["label"]: size["source"] for size in sizes}
            return next((by_label[label] for label in SIZE_ORDER if label in by_label),
                        sizes[-1]["source"] if sizes else None)
        return self.page(photo_id, owner)["image"]


def attach(record: Record, comments: list[dict]) -> None:
    record.fields["comments"] = comments
    record.fields["comment_count"] = len(comments)
    record.personal.add("comments")  # authors' names and ids


class FlickrCommentsSource(Source):
    """Flickr photos with their comments, from ids, URLs or an earlier harvest's records."""

    uses_terms = False
    options = (
        Option("photos", ListOf(Str()), None, help="photo ids or photo page URLs"),
        Option("records", PathOption(), None,
               help="JSONL records of an earlier harvest (its Flickr photos are read)"),
        Option("term", Str(), None, help="term to label the records with"),
        *COMMON_OPTIONS,
    )

    def open(self) -> None:
        if not self.config["photos"] and not self.config["records"]:
            raise PluginConfigError(f"{self.context.name}: give `photos` or `records`")
        self.reader = CommentReader(self.config, self.context)

    def _targets(self) -> Iterator[tuple[str, str | None, str | None, dict]]:
        for item in self.config["photos"] or []:
            match = PHOTO_URL.search(item)
            if match:
                yield match.group(2), match.group(1), None, {}
            elif item.isdigit():
                yield item, None, None, {}
            else:
                self.log.warning("not a Flickr photo id or URL: %r", item)
        if self.config["records"]:
            with Path(self.config["records"]).open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if row.get("source") == "flickr" and row.get("source_id"):
                        keep = {k: row[k] for k in ("title", "license", "page_url") if k in row}
                        yield row["source_id"], row.get("path_alias") or row.get("owner"), \
                            row.get("url"), keep

    def records(self, query: Query | None) -> Iterator[Record]:
        term = self.config["term"]
        label = Query(term, "en", term) if term else None
        for photo_id, owner, url, fields in self._targets():
            url = url or self.reader.image_url(photo_id, owner)
            record = Record(source="flickr", source_id=photo_id, url=url, query=label,
                            fields=dict(fields))
            attach(record, self.reader.comments(photo_id, owner))
            yield record


class FlickrCommentsEnricher(Enricher):
    """Attaches each Flickr record's comments (API, or the photo page without a key)."""

    options = COMMON_OPTIONS

    def open(self) -> None:
        self.reader = CommentReader(self.config, self.context)

    def enrich(self, records: list[Record]) -> None:
        for record in records:
            if record.source == "flickr" and "comments" not in record.fields:
                owner = record.fields.get("path_alias") or record.fields.get("owner")
                attach(record, self.reader.comments(record.source_id, owner))


@hookimpl
def harvest_sources():
    return {"flickr_comments": FlickrCommentsSource}


@hookimpl
def harvest_enrichers():
    return {"flickr_comments": FlickrCommentsEnricher}
