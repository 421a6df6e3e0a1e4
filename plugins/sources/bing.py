"""``bing``: Bing image results, from the public results pages or the v7 JSON API."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from urllib.parse import urlencode, urlsplit
from urllib.robotparser import RobotFileParser

from harvest.core import (
    Bool,
    Choice,
    Float,
    Int,
    Option,
    PluginConfigError,
    Query,
    Record,
    Secret,
    Source,
    Str,
    hookimpl,
)

# The results pages' `qft` filters, as Bing's own filter menus write them.
HTML_FILTERS = {
    "size": {"small": "imagesize-small", "medium": "imagesize-medium",
             "large": "imagesize-large", "wallpaper": "imagesize-wallpaper"},
    "image_type": {"photo": "photo-photo", "clipart": "photo-clipart",
                   "linedrawing": "photo-linedrawing", "animatedgif": "photo-animatedgif",
                   "transparent": "photo-transparent"},
    "license": {"creative_commons": "licenseType-Any", "public_domain": "license-L1",
                "free_to_share": "license-L2_L3_L4_L5_L6_L7",
                "free_to_share_commercially": "license-L2_L3_L4",
                "free_to_modify": "license-L2_L3_L5_L6",
                "free_to_modify_commercially": "license-L2_L3"},
    "freshness": {"day": "age-lt1440", "week": "age-lt10080", "month": "age-lt43200",
                  "year": "age-lt525600"},
}
# The same filters in the Bing Image Search v7 API's words.
API_FILTERS = {
    "size": {"small": "Small", "medium": "Medium", "large": "Large", "wallpaper": "Wallpaper"},
    "image_type": {"photo": "Photo", "clipart": "Clipart", "linedrawing": "Line",
                   "animatedgif": "AnimatedGif", "transparent": "Transparent"},
    "license": {"creative_commons": "Any", "public_domain": "Public", "free_to_share": "Share",
                "free_to_share_commercially": "ShareCommercially", "free_to_modify": "Modify",
                "free_to_modify_commercially": "ModifyCommercially"},
    "freshness": {"day": "Day", "week": "Week", "month": "Month"},
}
SIZE_TEXT = re.compile(r"(\d+)\s*[×x]\s*(\d+)(?:\s*·\s*(\w+))?")
MAX_EMPTY_PAGES = 2


def _choices(kind: str) -> tuple[str, ...]:
    return ("any", *HTML_FILTERS[kind])


class BingSource(Source):
    """Bing image results: public results pages (default) or the v7 JSON API."""

    options = (
        Option("mode", Choice("html", "api"), "html",
               help="html: the results pages a browser reads; api: Bing Image Search v7 JSON"),
        Option("endpoint", Str(), None, help="base URL (default www.bing.com, or "
                                             "api.bing.microsoft.com in api mode)"),
        Option("api_key", Secret(), None, help="v7 subscription key reference (api mode)"),
        Option("market", Str(), "en-US", help="market and language, e.g. ja-JP"),
        Option("safe_search", Choice("strict", "moderate", "off"), "strict", help="adult filter"),
        Option("size", Choice(*_choices("size")), "any", help="image size"),
        Option("image_type", Choice(*_choices("image_type")), "photo", help="kind of image"),
        Option("license", Choice(*_choices("license")), "any",
               help="Bing's license filter (Creative Commons, public domain...): a hint, "
                    "not a verified license"),
        Option("freshness", Choice(*_choices("freshness")), "any", help="how recent"),
        Option("count", Int(1), None, help="images per term and language"),
        Option("page_size", Int(1, 150), 35, help="results asked per page"),
        Option("delay", Float(0, 60), 1.0, help="seconds between two result pages"),
        Option("respect_robots", Bool(), True, help="honour robots.txt for result pages"),
    )

    @property
    def query_limit(self) -> int | None:
        return self.config["count"]

    def open(self) -> None:
        mode = self.config["mode"]
        self.endpoint = (self.config["endpoint"] or ("https://www.bing.com" if mode == "html"
                         else "https://api.bing.microsoft.com")).rstrip("/")
        if mode == "api":
            if self.config["api_key"] is None:
                raise PluginConfigError(f"{self.context.name}: api mode needs api_key "
                                        "(e.g. api_key: ${BING_KEY})")
            if self.config["freshness"] == "year":
                raise PluginConfigError(f"{self.context.name}: the v7 API has no 'year' freshness")
        self.session = self.context.session()
        self.robots: RobotFileParser | None = None
        self.last_request = 0.0

    # -- shared ------------------------------------------------------------------------------

    def _get(self, url: str, **kwargs):
        wait = self.last_request + self.config["delay"] - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if self.config["delay"] > 0:
            # The same spacing for every shard of a cluster run (a shared token bucket).
            self.context.take(f"bing-pages:{self.endpoint}", 1.0 / self.config["delay"])
        try:
            response = self.session.get(url, **kwargs)
        finally:
            self.last_request = time.monotonic()
        if response.status_code in (401, 403) and self.config["mode"] == "api":
            raise PluginConfigError(f"{self.context.name}: the API refused the key "
                                    f"(HTTP {response.status_code})")
        response.raise_for_status()
        return response

    def _record(self, query: Query, url: str, **fields) -> Record:
        fields = {k: v for k, v in fields.items() if v not in (None, "")}
        fields["host"] = urlsplit(fields.get("page_url") or url).hostname
        if self.config["license"] != "any":
            fields["bing_license_filter"] = self.config["license"]
        return Record(source="bing", source_id=hashlib.sha256(url.encode()).hexdigest()[:20],
                      url=url, query=query, fields=fields)

    def records(self, query: Query | None) -> Iterator[Record]:
        if self.config["mode"] == "api":
            yield from self._api_records(query)
        else:
            yield from self._html_records(query)

    # -- results pages -----------------------------------------------------------------------

    def _allowed(self, url: str) -> bool:
        if not self.config["respect_robots"]:
            return True
        if self.robots is None:
            self.robots = RobotFileParser()
            response = self.session.get(self.endpoint + "/robots.txt")
            if response.status_code == 200:
                self.robots.parse(response.text.splitlines())
            else:
                self.robots.parse([])  # no robots.txt: everything is allowed
        return self.robots.can_fetch(self.session.headers["User-Agent"], url)

    def html_params(self, query: Query, first: int) -> dict:
        c = self.config
        params = {"q": query.text, "first": first, "count": c["page_size"], "mmasync": 1,
                  "adlt": c["safe_search"], "mkt": c["market"],
                  "setlang": c["market"].split("-")[0]}
        filters = [f"+filterui:{HTML_FILTERS[kind][c[kind]]}"
                   for kind in ("size", "image_type", "license", "freshness") if c[kind] != "any"]
        if filters:
            params["qft"] = "".join(filters)
        return params

    def _html_records(self, query: Query) -> Iterator[Record]:
        first, seen, empty_pages = 1, set(), 0
        while empty_pages < MAX_EMPTY_PAGES:
            url = f"{self.endpoint}/images/async?{urlencode(self.html_params(query, first))}"
            if not self._allowed(url):
                raise PluginConfigError(f"{self.context.name}: {self.endpoint}/robots.txt does not "
                                        f"allow harvest to read {urlsplit(url).path}; "
                                        f"respect_robots: false overrides it (your responsibility)")
            results, entries = parse_results_page(self._get(url).text)
            fresh = [r for r in results if r["url"] not in seen]
            empty_pages = 0 if fresh else empty_pages + 1
            for result in fresh:
                seen.add(result["url"])
                yield self._record(query, **result)
            if not entries:
                return
            first += entries

    # -- v7 API ------------------------------------------------------------------------------

    def _api_record(self, query: Query, item: dict, seen: set[str]) -> Record | None:
        url = item.get("contentUrl")
        if not url or url in seen:
            return None
        record = self._record(query, url, title=item.get("name"),
                              page_url=item.get("hostPageUrl"),
                              thumbnail_url=item.get("thumbnailUrl"),
                              image_width=item.get("width"), image_height=item.get("height"),
                              image_format=item.get("encodingFormat"),
                              date_published=item.get("datePublished"))
        seen.add(url)
        return record

    def _api_records(self, query: Query) -> Iterator[Record]:
        c = self.config
        offset, seen = 0, set()
        headers = {"Ocp-Apim-Subscription-Key": c["api_key"].reveal()}
        while True:
            params = {"q": query.text, "count": c["page_size"], "offset": offset,
                      "mkt": c["market"], "safeSearch": c["safe_search"].capitalize()}
            for kind, name in (("size", "size"), ("image_type", "imageType"),
                               ("license", "license"), ("freshness", "freshness")):
                if c[kind] != "any":
                    params[name] = API_FILTERS[kind][c[kind]]
            reply = self._get(f"{self.endpoint}/v7.0/images/search", params=params,
                              headers=headers).json()
            values = reply.get("value") or []
            yield from self.each_item(values, lambda item: self._api_record(query, item, seen),
                                      query)
            next_offset = reply.get("nextOffset", offset + len(values))
            total = reply.get("totalEstimatedMatches", 0)
            if not values or next_offset <= offset or next_offset >= total:
                return
            offset = next_offset


def parse_results_page(html: str) -> tuple[list[dict], int]:
    """Results of one ``images/async`` page: each ``a.iusc`` carries a JSON ``m`` attribute
    (``murl`` image, ``purl`` page, ``turl`` thumbnail, ``t`` title); the size and format
    are in the result's ``img_info`` caption. Entries that do not parse are skipped.
    Returns the results and how many entries the page had (Bing's ``first`` counts them all).
    """
    from bs4 import BeautifulSoup

    results = []
    anchors = BeautifulSoup(html, "html.parser").select("a.iusc[m]")
    for anchor in anchors:
        try:
            meta = json.loads(anchor["m"])
        except (ValueError, TypeError):
            continue
        url = meta.get("murl") if isinstance(meta, dict) else None
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            continue
        width = height = image_format = None
        container = anchor.find_parent("li") or anchor.find_parent("div", class_="imgpt")
        caption = container.select_one(".img_info .nowrap") if container else None
        if caption is not None:
            match = SIZE_TEXT.search(caption.get_text(" ", strip=True))
            if match:
                width, height = int(match.group(1)), int(match.group(2))
                image_format = match.group(3)
        results.append({"url": url, "title": meta.get("t") or meta.get("desc"),
                        "page_url": meta.get("purl"), "thumbnail_url": meta.get("turl"),
                        "image_width": width, "image_height": height,
                        "image_format": image_format})
    return results, len(anchors)


@hookimpl
def harvest_sources():
    return {"bing": BingSource}
