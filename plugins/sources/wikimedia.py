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
            if not isinstance(answer, dict):
                raise RuntimeError("the API's answer is not a JSON object")
            error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
            if error.get("code") == "maxlag":
                time.sleep(_lag_wait(response.headers.get("Retry-After"), error.get("lag")))
                continue
            if error:
                raise RuntimeError(f"MediaWiki API error {error.get('code')}: "
                                   f"{error.get('info', '')[:200]}")
            return answer
        raise RuntimeError("the API stayed lagged (maxlag) through every retry")

    def _pages(self, generator: dict) -> Iterator[list]:
        """The pages of each answer in turn, in the search's order."""
        params = {**generator, "prop": "imageinfo", "iiprop": "url|size|sha1|mime|extmetadata",
                  "iiextmetadatafilter": EXTMETADATA}
        cont: dict = {}
        while True:
            answer = self._call({**params, **cont})
            yield sorted(_listed(answer, "pages"), key=_index)
            cont = _continuation(answer)
            if cont is None:
                return

    def records(self, query: Query | None) -> Iterator[Record]:
        if self.config["categories"]:
            seen: set[str] = set()
            for category in self._categories():
                for pages in self._pages({"generator": "categorymembers", "gcmtitle": category,
                                          "gcmtype": "file", "gcmlimit": self.config["batch"]}):
                    for record in self.each_item(pages, lambda page: self._record(page, None)):
                        if record.source_id not in seen:
                            seen.add(record.source_id)
                            yield record
            return
        for pages in self._pages({"generator": "search", "gsrsearch": query.text,
                                  "gsrnamespace": 6, "gsrlimit": self.config["batch"]}):
            yield from self.each_item(pages, lambda page: self._record(page, query), query)

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
                cont: dict | None = {}
                while cont is not None:
                    answer = self._call({"list": "categorymembers", "cmtitle": category,
                                         "cmtype": "subcat", "cmlimit": 500, **cont})
                    for member in _listed(answer, "categorymembers"):
                        title = member.get("title") if isinstance(member, dict) else None
                        if not isinstance(title, str):
                            self.context.bad_item("bad item in the answer (a sub-category "
                                                  "without a title)")
                        elif title not in seen:
                            seen.add(title)
                            below.append(title)
                    cont = _continuation(answer)
            level = below

    def _record(self, page: dict, query: Query | None) -> Record | None:
        """Raises (AttributeError, TypeError, ValueError...) on an item that cannot be read."""
        info = (page.get("imageinfo") or [None])[0]
        if not info or not info.get("url") or info.get("mime") not in self.config["mime"]:
            return None
        if not isinstance(info["url"], str):
            raise TypeError(f"url is a {type(info['url']).__name__}")
        sha1 = info.get("sha1")
        if sha1 is not None and not (isinstance(sha1, str) and len(sha1) == 40
                                     and all(c in "0123456789abcdefABCDEF" for c in sha1)):
            raise ValueError("sha1 is not 40 hexadecimal digits")
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
        record.expect_sha1 = sha1
        return record


def _listed(answer: dict, key: str) -> list:
    """``answer.query[key]`` when it is a list; anything else is nothing listed."""
    query = answer.get("query")
    listed = query.get(key) if isinstance(query, dict) else None
    return listed if isinstance(listed, list) else []


def _index(page) -> int:
    """A page's place in the search's order (sorted before each page is read)."""
    index = page.get("index") if isinstance(page, dict) else None
    return index if isinstance(index, int) else 0


def _continuation(answer: dict) -> dict | None:
    """The parameters of the next call, None when the listing is complete."""
    if "continue" not in answer:
        return None
    cont = answer["continue"]
    if not isinstance(cont, dict) or not cont:
        raise RuntimeError("the API's answer has a continue that is not an object")
    return {str(k): v for k, v in cont.items() if isinstance(v, (str, int))}


def _lag_wait(retry_after, lag) -> float:
    """Seconds to wait out a lagged server: its Retry-After, else its lag, within 0 to 60
    s (a lag of -5 made time.sleep raise); 5 s when neither can be read."""
    for value in (retry_after, lag):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            continue
        if seconds == seconds:  # not NaN
            return max(0.0, min(seconds, 60.0))
    return 5.0


@hookimpl
def harvest_sources():
    return {"wikimedia": WikimediaSource}
