"""``flickr``: photos from Flickr's ``flickr.photos.search``, through the flickrapi library."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import flickrapi
from flickrapi.exceptions import FlickrError
from flickrapi.shorturl import encode as base58

from harvest.core import (
    BBox,
    Bool,
    Choice,
    Date,
    Int,
    ListOf,
    Option,
    PluginConfigError,
    Query,
    Record,
    Secret,
    Source,
    Str,
    hookimpl,
    license_family,
)

# flickrapi logs whole error bodies at ERROR; harvest reports the failure itself, once.
logging.getLogger("flickrapi").setLevel(logging.CRITICAL)

FLICKR_LAUNCH = int(dt.datetime(2004, 2, 1, tzinfo=dt.timezone.utc).timestamp())
RESULT_CAP = 4000  # Flickr repeats results past this many per query
MIN_SLICE_SECONDS = 3600
MIN_TILE_DEGREES = 0.02
PROBE_THREADS = 8  # planning a cluster run: probes of one level of splits go out together
GRID = 1e-6  # Flickr stores positions to six decimals: tiles on this grid never overlap
SIZES = ("o", "6k", "5k", "4k", "3k", "k", "h", "l", "c", "z", "m", "n")
SAFE_SEARCH = {"safe": 1, "moderate": 2, "restricted": 3}
CONTENT_TYPES = {"photos": 1, "screenshots": 2, "other": 3, "photos_and_screenshots": 4,
                 "screenshots_and_other": 5, "photos_and_other": 6, "all": 7}
SORTS = ("relevance", "date-posted-desc", "date-posted-asc", "date-taken-desc", "date-taken-asc",
         "interestingness-desc", "interestingness-asc")
# Error codes that mean "your key or request is wrong", not "try later".
CONFIG_ERROR_CODES = {3, 4, 95, 96, 97, 98, 99, 100, 111, 112, 114, 115, 116}
PERSONAL = {"owner", "owner_name", "path_alias"}
# flickr.photos.licenses.getInfo, as Flickr documents it; refreshed from the API at start.
FLICKR_LICENSES = {
    0: ("All Rights Reserved", ""),
    1: ("Attribution-NonCommercial-ShareAlike License",
        "https://creativecommons.org/licenses/by-nc-sa/2.0/"),
    2: ("Attribution-NonCommercial License", "https://creativecommons.org/licenses/by-nc/2.0/"),
    3: ("Attribution-NonCommercial-NoDerivs License",
        "https://creativecommons.org/licenses/by-nc-nd/2.0/"),
    4: ("Attribution License", "https://creativecommons.org/licenses/by/2.0/"),
    5: ("Attribution-ShareAlike License", "https://creativecommons.org/licenses/by-sa/2.0/"),
    6: ("Attribution-NoDerivs License", "https://creativecommons.org/licenses/by-nd/2.0/"),
    7: ("No known copyright restrictions", "https://www.flickr.com/commons/usage/"),
    8: ("United States Government Work", "http://www.usa.gov/copyright.shtml"),
    9: ("Public Domain Dedication (CC0)", "https://creativecommons.org/publicdomain/zero/1.0/"),
    10: ("Public Domain Mark", "https://creativecommons.org/publicdomain/mark/1.0/"),
}


def spdx_style(name: str, url: str) -> str:
    """An SPDX-style short id from a license's URL (or name, for those without one)."""
    cc = re.search(r"creativecommons\.org/licenses/([a-z-]+)/(\d+(?:\.\d+)*)", url)
    if cc:
        return f"CC-{cc.group(1).upper()}-{cc.group(2)}"
    public_domain = re.search(r"creativecommons\.org/publicdomain/(zero|mark)/(\d+(?:\.\d+)*)", url)
    if public_domain:
        return ("CC0-" if public_domain.group(1) == "zero" else "PDM-") + public_domain.group(2)
    lowered = name.lower()
    if "no known copyright" in lowered:
        return "NKCR"
    if "government" in lowered:
        return "US-GOV-WORK"
    if "all rights reserved" in lowered:
        return "ARR"
    return "LicenseRef-" + re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


_LICENSE_TABLES: dict[tuple[str, str], dict] = {}

EXTRAS = ("description", "license", "date_upload", "date_taken", "owner_name", "path_alias",
          "geo", "tags", "machine_tags", "views", "media", "original_format")


class FlickrSource(Source):
    """Photos from the Flickr API (flickr.photos.search), largest size available."""

    options = (
        Option("api_key", Secret(), "${FLICKER_KEY}", help="Flickr API key reference"),
        Option("api_secret", Secret(), "${FLICKER_SECRET}", help="Flickr API secret reference"),
        Option("endpoint", Str(), flickrapi.FlickrAPI.REST_URL, help="REST endpoint URL"),
        Option("match", Choice("text", "tags"), "text",
               help="search the term in title/description/tags (text) or in tags only"),
        Option("tags", ListOf(Str()), None, help="extra tags every photo must carry (see tag_mode)"),
        Option("tag_mode", Choice("any", "all"), "any", help="match any or all tags"),
        Option("bbox", BBox(), None, help="min_lon,min_lat,max_lon,max_lat"),
        Option("min_taken_date", Date(), None, help="taken on or after"),
        Option("max_taken_date", Date(), None, help="taken on or before"),
        Option("min_upload_date", Date(), None, help="uploaded on or after"),
        Option("max_upload_date", Date(), None, help="uploaded on or before"),
        Option("licenses", ListOf(Int(0, 20)), None, help="Flickr license ids to accept"),
        Option("safe_search", Choice(*SAFE_SEARCH), "safe", help="Flickr safe-search level"),
        Option("content_type", Choice(*CONTENT_TYPES), "photos", help="kind of content"),
        Option("sort", Choice(*SORTS), "relevance", help="result order"),
        Option("geotagged_only", Bool(), False, help="only photos with a location"),
        Option("count", Int(1), None, help="photos per term and language (default: run.limit_per_term)"),
        Option("per_page", Int(1, 500), 250, help="results per API call"),
        Option("sizes", ListOf(Choice(*SIZES)), list(SIZES),
               help="image sizes to ask for; the largest one present is downloaded"),
        Option("slice_dates", Bool(), True,
               help="split the upload-date range to get past Flickr's 4,000-results cap"),
        Option("refresh_licenses", Bool(), True,
               help="read Flickr's license table (licenses.getInfo) at start; else built-in"),
        Option("calls_per_hour", Int(1), 3600,
               help="API calls per hour for this key (Flickr allows 3,600); on a cluster, "
                    "for all workers together"),
        Option("shard_size", Int(1, RESULT_CAP), RESULT_CAP,
               help="on a cluster, photos per shard at most, where splitting keeps the same "
                    "results (date slices, and bbox tiles when bbox is set)"),
    )

    @property
    def query_limit(self) -> int | None:
        return self.config["count"]

    def open(self) -> None:
        key_digest = hashlib.sha256(self.config["api_key"].reveal().encode()).hexdigest()[:12]
        self.quota_key = f"flickr-calls:{key_digest}"
        self.api = flickrapi.FlickrAPI(self.config["api_key"].reveal(),
                                       self.config["api_secret"].reveal(),
                                       format="parsed-json", store_token=False)
        self.api.REST_URL = self.config["endpoint"]
        # Polite session: shared per-host rate limit, retries with backoff (searches are
        # read-only, so retrying their POSTs is safe).
        self.api.flickr_oauth.session = self.context.session(retry_post=True)
        self.licenses = {i: (name, url, spdx_style(name, url))
                         for i, (name, url) in FLICKR_LICENSES.items()}
        if self.config["refresh_licenses"]:
            self._refresh_licenses()
        self.license_ids = self.config["licenses"] or self._hinted_license_ids()

    def _take_quota(self) -> None:
        # A bucket of a sixtieth of the hourly allowance, refilled at the rest of it: no
        # window of an hour ever sees more than calls_per_hour calls.
        per_hour = self.config["calls_per_hour"]
        burst = max(1.0, per_hour / 60)
        self.context.take(self.quota_key, (per_hour - burst) / 3600 or per_hour / 3600, burst)

    def _refresh_licenses(self) -> None:
        # Once per process and endpoint: a cluster worker runs many shards, and each call
        # spends the key's hourly quota.
        cache_key = (self.config["endpoint"], self.quota_key)
        if cache_key in _LICENSE_TABLES:
            self.licenses = _LICENSE_TABLES[cache_key]
            return
        try:
            self._take_quota()
            reply = self.api.photos.licenses.getInfo()
            table = {int(item["id"]): (item["name"], item.get("url") or "")
                     for item in reply["licenses"]["license"]}
        except FlickrError as exc:
            if exc.code in CONFIG_ERROR_CODES:
                raise PluginConfigError(f"flickr: the API refused the request: {exc} "
                                        f"(check the api_key/api_secret)") from None
            self.log.warning("flickr license table not reachable (%s); using the built-in copy",
                             exc)
            return
        except Exception as exc:
            self.log.warning("flickr license table not reachable (%s); using the built-in copy",
                             exc.__class__.__name__)
            return
        self.licenses = {i: (name, url, spdx_style(name, url)) for i, (name, url) in table.items()}
        _LICENSE_TABLES[cache_key] = self.licenses

    def _hinted_license_ids(self) -> list[int] | None:
        families = self.context.hints.get("license_families")
        ids = self.context.hints.get("license_ids")
        if families is None and ids is None:
            return None
        wanted = [number for number, (_, _, spdx) in self.licenses.items()
                  if license_family(spdx) in set(families or ()) or spdx in set(ids or ())]
        return wanted

    def base_params(self) -> dict[str, Any]:
        c = self.config
        params: dict[str, Any] = {
            "safe_search": SAFE_SEARCH[c["safe_search"]],
            "content_type": CONTENT_TYPES[c["content_type"]],
            "sort": c["sort"],
            "media": "photos",
            "per_page": c["per_page"],
            "extras": ",".join(EXTRAS + tuple(f"url_{s}" for s in c["sizes"])),
        }
        if c["bbox"]:
            params["bbox"] = _bbox_param(c["bbox"])
        for key in ("min_taken_date", "max_taken_date"):
            if c[key]:
                params[key] = c[key].astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        if self.license_ids is not None:
            params["license"] = ",".join(str(i) for i in self.license_ids) or "-1"
        if c["geotagged_only"]:
            params["has_geo"] = 1
        return params

    def _query_params(self, query: Query) -> dict[str, Any]:
        params = self.base_params()
        tags = list(self.config["tags"] or [])
        if self.config["match"] == "tags":
            tags.insert(0, query.text)
        else:
            params["text"] = query.text
        if tags:
            params["tags"] = ",".join(tags)
            params["tag_mode"] = self.config["tag_mode"]
        return params

    def _date_range(self) -> tuple[int, int]:
        low = int(self.config["min_upload_date"].timestamp()) if self.config["min_upload_date"] \
            else FLICKR_LAUNCH
        high = int(self.config["max_upload_date"].timestamp()) if self.config["max_upload_date"] \
            else int(time.time())
        return low, high

    def records(self, query: Query | None) -> Iterator[Record]:
        params = self._query_params(query)
        low, high = self._date_range()
        if query.part is not None:
            piece = Piece.from_part(query.part)
            low, high = piece.low, piece.high
            if piece.bbox:
                params["bbox"] = _bbox_param(piece.bbox)
        seen: set[str] = set()

        def fresh(photo: dict) -> Record | None:
            if photo["id"] in seen:
                return None
            record = self._record(photo, query)
            seen.add(photo["id"])
            return record

        yield from self.each_item(self._search(params, low, high), fresh, query)

    def partitions(self, query: Query, limit: int | None) -> list[tuple[Any, int | None]]:
        """Date slices (and bbox tiles) that together give what ``records`` gives.

        Where the count binds, only the slices past Flickr's 4,000-result cap that
        ``records`` makes anyway, with the count handed to them in the order ``records``
        reads them. Where every photo is wanted, also smaller slices and tiles of at most
        ``shard_size`` photos each, so that more workers can share one query.
        """
        if limit is not None and limit <= self.config["shard_size"]:
            return [(None, limit)]  # one shard is enough, and it reads what one machine reads
        params = self._query_params(query)
        low, high = self._date_range()
        bbox = list(self.config["bbox"]) if self.config["bbox"] else None
        pieces = self._refine(params, [Piece(low, high, bbox)], self._past_cap)
        total = sum(piece.total for piece in pieces)
        if limit is not None and total > limit:
            parts, remaining = [], limit
            for piece in pieces:
                share = min(piece.total, remaining)
                if share > 0:
                    parts.append((piece.part(), share))
                remaining -= share
            return parts or [(None, limit)]
        small = self._refine(params, pieces, self._too_big, probed=True)
        small = [leaf for leaf in small if leaf.total > 0] or small[:1]
        slack = None if limit is None else limit - total
        return [(leaf.part(), None if slack is None else leaf.total + (slack if i == 0 else 0))
                for i, leaf in enumerate(small)]

    def _probe(self, params: dict, piece: Piece) -> int:
        probe = dict(params, per_page=1)
        if piece.bbox:
            probe["bbox"] = _bbox_param(piece.bbox)
        return int(self._call(probe, piece.low, piece.high, page=1).get("total") or 0)

    def _refine(self, params: dict, pieces: list[Piece], children_of,
                probed: bool = False) -> list[Piece]:
        """Splits pieces level by level while ``children_of`` returns halves, probing each
        level's new pieces at once (``probed``: the given pieces' totals are known
        already); keeps the order in which ``records`` would read them."""
        def counted(piece: Piece) -> Piece:
            return piece._replace(total=self._probe(params, piece))

        with ThreadPoolExecutor(PROBE_THREADS) as pool:
            if not probed:
                pieces = list(pool.map(counted, pieces))
            while True:
                expanded = [(piece, children_of(params, piece)) for piece in pieces]
                todo = [child for _, children in expanded for child in children or ()]
                if not todo:
                    return pieces
                counted_children = iter(list(pool.map(counted, todo)))
                refined = []
                for piece, children in expanded:
                    if children:
                        refined.extend(next(counted_children) for _ in children)
                    else:
                        refined.append(piece)
                pieces = refined

    def _past_cap(self, params: dict, piece: Piece) -> list[Piece] | None:
        """The date halves ``_search`` reads a piece in, when Flickr would cap it."""
        if (piece.total > RESULT_CAP and self.config["slice_dates"]
                and piece.high - piece.low > MIN_SLICE_SECONDS):
            return [Piece(a, b, piece.bbox) for a, b in self._halves(params, piece.low, piece.high)]
        return None

    def _too_big(self, params: dict, piece: Piece) -> list[Piece] | None:
        """Halves of a piece over ``shard_size``: map tiles first, then dates."""
        low, high, bbox = piece.low, piece.high, piece.bbox
        if piece.total <= self.config["shard_size"]:
            return None
        if bbox and max(bbox[2] - bbox[0], bbox[3] - bbox[1]) >= MIN_TILE_DEGREES:
            return [Piece(low, high, tile) for tile in _tiles(bbox)]
        if high - low > MIN_SLICE_SECONDS:
            return [Piece(a, b, bbox) for a, b in self._halves(params, low, high)]
        return None

    def _halves(self, params: dict, low: int, high: int) -> list[tuple[int, int]]:
        middle = (low + high) // 2
        halves = [(middle + 1, high), (low, middle)]
        return halves if params["sort"] != "date-posted-asc" else halves[::-1]

    def _search(self, params: dict, low: int, high: int) -> Iterator[dict]:
        first = self._call(params, low, high, page=1)
        total = int(first.get("total") or 0)
        halves = self._past_cap(params, Piece(low, high, None, total))
        if halves:
            for half in halves:
                yield from self._search(params, half.low, half.high)
            return
        reachable = min(total, RESULT_CAP)
        pages = min(int(first.get("pages") or 1), -(-reachable // params["per_page"]))
        yield from first.get("photo", [])
        for page in range(2, pages + 1):
            photos = self._call(params, low, high, page).get("photo", [])
            if not photos:
                return
            yield from photos

    def _call(self, params: dict, low: int, high: int, page: int) -> dict:
        try:
            self._take_quota()
            reply = self.api.photos.search(min_upload_date=low, max_upload_date=high, page=page,
                                           **params)
        except FlickrError as exc:
            if exc.code in CONFIG_ERROR_CODES:
                raise PluginConfigError(f"flickr: the API refused the request: {exc} "
                                        f"(check the api_key/api_secret and options)") from None
            raise
        return reply["photos"]

    def _record(self, photo: dict, query: Query) -> Record:
        url, width, height = _largest(photo, self.config["sizes"])
        description = photo.get("description")
        if isinstance(description, dict):
            description = description.get("_content")
        latitude, longitude = _number(photo.get("latitude")), _number(photo.get("longitude"))
        has_geo = latitude is not None and longitude is not None and (latitude, longitude) != (0, 0)
        fields = {
            "title": photo.get("title") or "",
            "description": description or "",
            **self._license(photo.get("license")),
            "date_taken": None if str(photo.get("datetakenunknown", "0")) == "1"
            else photo.get("datetaken"),
            "date_upload": _iso(photo.get("dateupload")),
            "owner": photo.get("owner"),
            "owner_name": photo.get("ownername"),
            "path_alias": photo.get("pathalias") or None,
            "latitude": latitude if has_geo else None,
            "longitude": longitude if has_geo else None,
            "geo_accuracy": int(photo["accuracy"]) if has_geo and photo.get("accuracy") else None,
            "geo_origin": "flickr" if has_geo else None,
            "tags": (photo.get("tags") or "").split(),
            "machine_tags": (photo.get("machine_tags") or "").split(),
            "views": int(photo["views"]) if str(photo.get("views", "")).isdigit() else None,
            "page_url": "https://flic.kr/p/" + base58(photo["id"]),
            "image_width": width,
            "image_height": height,
        }
        fields["matched_in"] = matched_in(query.text, fields["title"], fields["description"],
                                          fields["tags"])
        return Record(source="flickr", source_id=str(photo["id"]), url=url, query=query,
                      fields=fields, personal=set(PERSONAL))

    def _license(self, raw) -> dict[str, Any]:
        number = _int(raw)
        if number is None:
            return {"license": None}
        name, url, spdx = self.licenses.get(number, (f"Flickr license {number}", "", None))
        return {"license": spdx or f"LicenseRef-flickr-{number}", "license_name": name,
                "license_url": url or None, "flickr_license": number}


def matched_in(text: str, title: str, description: str, tags: list[str]) -> list[str]:
    """Where the search's wording appears: ``title``, ``tags``, ``description`` (none:
    Flickr matched it otherwise, a stem or a translation). A picture that has it only in
    its description is the likeliest not to show it (a cage "near the monkeys"). Plain
    case-insensitive comparison: no pattern is built from the answer's text."""
    wanted = " ".join(text.casefold().split())
    if not wanted:
        return []
    squashed = wanted.replace(" ", "")  # Flickr's tag form: "spider monkey" -> spidermonkey
    words = set(wanted.split())
    tag_set = {tag.casefold() for tag in tags}
    where = []
    if wanted in " ".join(title.casefold().split()):
        where.append("title")
    if squashed in tag_set or words <= tag_set:
        where.append("tags")
    if wanted in " ".join(str(description).casefold().split()):
        where.append("description")
    return where


class Piece(NamedTuple):
    """Upload dates from ``low`` to ``high`` (Unix times), within ``bbox`` if set, and the
    number of photos Flickr finds there (0 until probed)."""

    low: int
    high: int
    bbox: list[float] | None
    total: int = 0

    def part(self) -> dict[str, Any]:
        """The piece as ``Query.part``: JSON, as cluster workers receive it."""
        part: dict[str, Any] = {"min_upload_date": self.low, "max_upload_date": self.high}
        if self.bbox:
            part["bbox"] = self.bbox
        return part

    @classmethod
    def from_part(cls, part: dict[str, Any]) -> Piece:
        return cls(part["min_upload_date"], part["max_upload_date"], part.get("bbox") or None)


def _bbox_param(bbox) -> str:
    return ",".join(f"{round(v, 6):.6f}".rstrip("0").rstrip(".") for v in bbox)


def _tiles(bbox) -> list[list[float]]:
    """Two halves of a bbox along its longer side, on Flickr's 1e-6 degree grid: every
    position in the bbox lies in exactly one of them."""
    west, south, east, north = bbox
    if east - west >= north - south:
        middle = round((west + east) / 2, 6)
        return [[west, south, middle, north], [round(middle + GRID, 6), south, east, north]]
    middle = round((south + north) / 2, 6)
    return [[west, south, east, middle], [west, round(middle + GRID, 6), east, north]]


def _largest(photo: dict, sizes) -> tuple[str | None, int | None, int | None]:
    best = (None, None, None)
    best_area = -1
    for size in sizes:
        url = photo.get(f"url_{size}")
        if not url:
            continue
        width, height = _int(photo.get(f"width_{size}")), _int(photo.get(f"height_{size}"))
        area = (width or 0) * (height or 0)
        if best[0] is None or area > best_area:
            best, best_area = (url, width, height), area
    return best


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _iso(unix) -> str | None:
    try:
        return dt.datetime.fromtimestamp(int(unix), dt.timezone.utc).isoformat()
    except (TypeError, ValueError):
        return None


@hookimpl
def harvest_sources():
    return {"flickr": FlickrSource}
