"""``wikimedia``: files from Wikimedia Commons through the MediaWiki Action API, each with
the license, author and attribution terms its description page states.

A term is searched in the File namespace (``generator=search``), or the recipe names
categories, whose files are listed (``generator=categorymembers``, sub-categories to
``depth``). ``prop=imageinfo`` with ``extmetadata`` gives each file's URL, size, SHA-1
(the download is checked against it), LicenseShortName, LicenseUrl, Artist (HTML, made
text) and AttributionRequired. As Wikimedia's API etiquette asks: requests one at a time,
``maxlag`` sent (a lagged server's answer is waited out and asked again), and a
User-Agent with a way to contact you (``contact``, required).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html import unescape

from harvest.core import (
    Float,
    Int,
    ListOf,
    Option,
    OptionError,
    PluginConfigError,
    Query,
    Record,
    Source,
    Str,
    hookimpl,
)

EXTMETADATA = "LicenseShortName|LicenseUrl|Artist|AttributionRequired|ImageDescription|UsageTerms"
MAXLAG_WAITS = 5
# Commons' license short names -> the SPDX-style ids harvest records carry.
LICENSE_NAME = re.compile(r"^(CC)[ -](BY(?:[ -](?:SA|NC|ND))*)[ -]?(\d(?:\.\d)?)?", re.I)


def license_id(short_name: str | None) -> str | None:
    if not short_name:
        return None
    name = short_name.strip()
    lowered = name.lower()
    if lowered.startswith("cc0"):
        return "CC0-1.0"
    if lowered in ("public domain", "pd") or lowered.startswith("pd-") or "public domain" in lowered:
        return "PDM-1.0"
    match = LICENSE_NAME.match(name)
    if match:
        parts = re.split(r"[ -]", match.group(2).upper())
        base = "CC-" + "-".join(parts)
        return f"{base}-{match.group(3)}" if match.group(3) else base
    return name  # GFDL, FAL...: kept as Commons names it


def html_text(value: str | None) -> str | None:
    if not value:
        return None
    text = unescape(re.sub(r"<[^>]+>", " ", value))
    return re.sub(r"\s+", " ", text).strip() or None


class WikimediaSource(Source):
    """Wikimedia Commons files (search or categories), with license and author."""

    options = (
        Option("contact", Str(), None, required=True,
               help="an e-mail or URL for your User-Agent, as Wikimedia's policy requires"),
        Option("endpoint", Str(), "https://commons.wikimedia.org/w/api.php", help="the MediaWiki API's URL"),
        Option("categories", ListOf(Str()), None,
               help="list these categories' files instead of searching, e.g. [Macaca]"),
        Option("depth", Int(0, 10), 0, help="sub-category levels to descend into"),
        Option("count", Int(1), None, help="files per term and language (or per category list)"),
        Option("batch", Int(1, 50), 50, help="files per API request (50 without a bot flag)"),
        Option("maxlag", Int(1, 60), 5, help="seconds of replication lag the API may have"),
        Option("requests_per_second", Float(0.01, 50), 2.0, help="pace of API requests"),
        Option("mime", ListOf(Str()), ["image/jpeg", "image/png", "image/webp", "image/gif",
                                       "image/tiff"], help="file types to keep"),
    )

    @classmethod
    def check_options(cls, options) -> None:
        contact = (options.get("contact") or "").strip()
        if "@" not in contact and "://" not in contact:
            raise OptionError("contact", "an e-mail address or a URL, so that Wikimedia can "
                                         "reach you about your requests")

    @property
    def uses_terms(self) -> bool:  # type: ignore[override]
        return not self.config["categories"]

    @classmethod
    def needs_terms(cls, options) -> bool:
        return not options.get("categories")

    @property
    def query_limit(self) -> int | None:
        return self.config["count"]

    def open(self) -> None:
        self.session = self.context.session()
        agent = self.session.headers.get("User-Agent", "harvest")
        self.session.headers["User-Agent"] = f"{agent} ({self.config['contact']})"

    def _call(self, params: dict) -> dict:
        params = {"action": "query", "format": "json", "formatversion": "2",
                  "maxlag": self.config["maxlag"], **params}
        for _ in range(MAXLAG_WAITS + 1):
            self.context.take(f"wikimedia:{self.config['endpoint']}",
                              self.config["requests_per_second"])
            response = self.session.get(self.config["endpoint"], params=params)
            if response.status_code == 403:
                raise PluginConfigError(f"{self.context.name}: the API refused the request "
                                        "(HTTP 403): check the contact in the User-Agent")
            response.raise_for_status()
            answer = response.json()
            error = answer.get("error") or {}
            if error.get("code") == "maxlag":
                wait = float(response.headers.get("Retry-After") or error.get("lag") or 5)
                time.sleep(min(wait, 60))
                continue
            if error:
                raise RuntimeError(f"MediaWiki API error {error.get('code')}: "
                                   f"{error.get('info', '')[:200]}")
            return answer
        raise RuntimeError("the API stayed lagged (maxlag) through every retry")

    def _pages(self, generator: dict) -> Iterator[dict]:
        params = {**generator, "prop": "imageinfo", "iiprop": "url|size|sha1|mime|extmetadata",
                  "iiextmetadatafilter": EXTMETADATA}
        cont: dict = {}
        while True:
            answer = self._call({**params, **cont})
            pages = sorted((answer.get("query") or {}).get("pages") or [],
                           key=lambda p: p.get("index", 0))
            yield from pages
            if "continue" not in answer:
                return
            cont = answer["continue"]

    def records(self, query: Query | None) -> Iterator[Record]:
        if self.config["categories"]:
            seen: set[str] = set()
            for category in self._categories():
                for page in self._pages({"generator": "categorymembers", "gcmtitle": category,
                                         "gcmtype": "file", "gcmlimit": self.config["batch"]}):
                    record = self._record(page, None)
                    if record is not None and record.source_id not in seen:
                        seen.add(record.source_id)
                        yield record
            return
        for page in self._pages({"generator": "search", "gsrsearch": query.text,
                                 "gsrnamespace": 6, "gsrlimit": self.config["batch"]}):
            record = self._record(page, query)
            if record is not None:
                yield record

    def _categories(self) -> Iterator[str]:
        """The recipe's categories and their sub-categories to ``depth``, each once."""
        level = [c if c.startswith("Category:") else f"Category:{c}"
                 for c in self.config["categories"]]
        seen = set(level)
        for depth in range(self.config["depth"] + 1):
            yield from level
            if depth == self.config["depth"]:
                return
            below = []
            for category in level:
                cont: dict = {}
                while True:
                    answer = self._call({"list": "categorymembers", "cmtitle": category,
                                         "cmtype": "subcat", "cmlimit": 500, **cont})
                    for member in (answer.get("query") or {}).get("categorymembers") or []:
                        if member["title"] not in seen:
                            seen.add(member["title"])
                            below.append(member["title"])
                    if "continue" not in answer:
                        break
                    cont = answer["continue"]
            level = below

    def _record(self, page: dict, query: Query | None) -> Record | None:
        info = (page.get("imageinfo") or [None])[0]
        if not info or not info.get("url") or info.get("mime") not in self.config["mime"]:
            return None
        meta = {k: (v or {}).get("value") for k, v in (info.get("extmetadata") or {}).items()}
        fields = {
            "title": re.sub(r"^File:|\.\w+$", "", page.get("title", "")),
            "license": license_id(meta.get("LicenseShortName")),
            "license_name": meta.get("LicenseShortName"),
            "license_url": meta.get("LicenseUrl"),
            "author": html_text(meta.get("Artist")),
            "attribution_required": str(meta.get("AttributionRequired", "")).lower() == "true",
            "description": html_text(meta.get("ImageDescription")),
            "page_url": info.get("descriptionurl"),
            "source_width": info.get("width"),
            "source_height": info.get("height"),
        }
        fields = {k: v for k, v in fields.items() if v not in (None, "")}
        record = Record(source="wikimedia", source_id=str(page.get("pageid") or page["title"]),
                        url=info["url"], query=query, fields=fields, personal={"author"})
        record.expect_sha1 = info.get("sha1")
        return record


@hookimpl
def harvest_sources():
    return {"wikimedia": WikimediaSource}
