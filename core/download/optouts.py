"""Machine-readable opt-outs of the hosts images come from, checked before each download:
robots.txt (RFC 9309, parsed by protego as Scrapy does) and TDMRep (W3C's Text and Data
Mining Reservation Protocol: ``/.well-known/tdmrep.json``; the ``tdm-reservation`` header is
read from each image response).

Each host's files are fetched once, before the first download from it, and cached with a
TTL in ``.harvest/opt-outs.sqlite`` (every download worker shares it). As RFC 9309 says:
a robots.txt that is missing or refused (4xx) allows everything; a server error (5xx), a
429 or no answer disallows everything for now, and the download fails transiently, so
that the next run asks again. A tdmrep.json is read the same way, and one that cannot be
read (cut off, over 512 KiB, not JSON, nested too deep) disallows for now too: a
reservation nobody could read is still a reservation. ``Crawl-delay`` for harvest's
user-agent token becomes that host's request rate when it is slower than the recipe's.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3

from ..errors import RecordError

MAX_FILE_BYTES = 512 * 1024  # RFC 9309: parse at least the first 500 KiB
TTL_SECONDS = 24 * 3600
UNREACHABLE_TTL_SECONDS = 600


@dataclass
class HostRules:
    robots: object | None  # a protego.Protego, or None: allow all
    robots_unreachable: str | None  # why robots.txt could not be read: disallow for now
    tdm: list[tuple[str, int]]  # (location pattern, tdm-reservation)
    tdm_unreadable: str | None = None  # why tdmrep.json could not be read: disallow for now


class OptOuts:
    """``check(url)`` raises RecordError when the URL's host opted out of harvest."""

    def __init__(self, fetch, cache_path, agent: str, *, robots: bool = True,
                 tdmrep: bool = True, on_crawl_delay=None):
        """``fetch(url) -> (status, body bytes)`` gets a small file politely (the
        downloader's own client: rate limits, address checks, timeouts); ``(None, why)``
        when the host did not answer."""
        self.fetch = fetch
        self.agent = agent
        self.robots_on, self.tdmrep_on = robots, tdmrep
        self.on_crawl_delay = on_crawl_delay
        self.cache_path = cache_path
        self.hosts: dict[str, tuple[float, HostRules]] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()
        self.local = threading.local()

    def check(self, url: str) -> None:
        if not (self.robots_on or self.tdmrep_on):
            return
        parts = urlsplit(url)
        origin = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
        rules = self._rules(origin)
        host = parts.hostname or parts.netloc
        if self.robots_on:
            if rules.robots_unreachable:
                raise RecordError(f"robots.txt of {host} could not be read "
                                  f"({rules.robots_unreachable}): disallowed for now",
                                  permanent=False)
            if rules.robots is not None and not rules.robots.can_fetch(url, self.agent):
                raise RecordError(f"robots.txt of {host} disallows it for {self.agent}")
        if self.tdmrep_on:
            if rules.tdm_unreadable:
                raise RecordError(f"tdmrep.json of {host} could not be read "
                                  f"({rules.tdm_unreadable}): disallowed for now",
                                  permanent=False)
            path = parts.path or "/"
            for location, reservation in rules.tdm:
                if location_matches(location, path):
                    if reservation == 1:
                        raise RecordError(f"TDM rights reserved by {host} "
                                          f"(/.well-known/tdmrep.json)")
                    break

    # -- per host -----------------------------------------------------------------------------

    def _rules(self, origin: str) -> HostRules:
        now = time.time()
        with self.lock:
            cached = self.hosts.get(origin)
            if cached is not None and cached[0] > now:
                return cached[1]
            host_lock = self.locks.setdefault(origin, threading.Lock())
        with host_lock:  # one fetch per host, however many threads want it
            with self.lock:
                cached = self.hosts.get(origin)
                if cached is not None and cached[0] > now:
                    return cached[1]
            expires, rules = self._load(origin, now)
            with self.lock:
                self.hosts[origin] = (expires, rules)
            return rules

    def _load(self, origin: str, now: float) -> tuple[float, HostRules]:
        stored = self._cached(origin, now)
        fresh = stored is None
        if fresh:
            robots = self._get(f"{origin}/robots.txt") if self.robots_on else (404, b"")
            tdm = self._get(f"{origin}/.well-known/tdmrep.json") if self.tdmrep_on else (404, b"")
            stored = (now + TTL_SECONDS, robots, tdm)
        expires, (robots_status, robots_body), (tdm_status, tdm_body) = stored
        rules = HostRules(None, None, *_tdm_rules(tdm_status, tdm_body))
        if _unanswered(robots_status):
            rules.robots_unreachable = (robots_body.decode("utf-8", "replace")[:100]
                                        if robots_status is None else f"HTTP {robots_status}")
        elif 200 <= robots_status < 300:
            from protego import Protego

            rules.robots = Protego.parse(robots_body[:MAX_FILE_BYTES].decode("utf-8", "replace"))
            delay = rules.robots.crawl_delay(self.agent)
            if delay and delay > 0 and self.on_crawl_delay is not None:
                self.on_crawl_delay(urlsplit(origin).netloc, float(delay))
        if fresh:
            if rules.robots_unreachable or rules.tdm_unreadable:
                expires = now + UNREACHABLE_TTL_SECONDS  # asked again soon, and by the next run
            else:
                self._store(origin, *stored)
        return expires, rules

    def _get(self, url: str) -> tuple[int | None, bytes]:
        try:
            return self.fetch(url)
        except RecordError as exc:
            return None, exc.reason.encode()
        except urllib3.exceptions.ProtocolError:
            return None, b"connection broken before the end"
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return None, str(exc).splitlines()[0][:100].encode() if str(exc) else b"no answer"

    # -- the cache shared by the workers ------------------------------------------------------

    def _db(self):
        db = getattr(self.local, "db", None)
        if db is None and self.cache_path is not None:
            try:
                db = sqlite3.connect(self.cache_path, timeout=30)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS hosts (origin TEXT PRIMARY KEY, "
                           "expires REAL, robots_status INTEGER, robots BLOB, "
                           "tdm_status INTEGER, tdm BLOB)")
            except sqlite3.Error:
                db = None  # a cache that cannot be written: fetch each run
            self.local.db = db
        return db

    def _cached(self, origin: str, now: float):
        db = self._db()
        if db is None:
            return None
        row = db.execute("SELECT expires, robots_status, robots, tdm_status, tdm FROM hosts "
                         "WHERE origin = ?", (origin,)).fetchone()
        if row is None or row[0] <= now:
            return None
        return row[0], (row[1], bytes(row[2] or b"")), (row[3], bytes(row[4] or b""))

    def _store(self, origin: str, expires: float, robots, tdm) -> None:
        db = self._db()
        if db is None:
            return
        try:
            with db:
                db.execute("INSERT OR REPLACE INTO hosts VALUES (?, ?, ?, ?, ?, ?)",
                           (origin, expires, robots[0], robots[1], tdm[0], tdm[1]))
        except sqlite3.Error:
            pass


def _unanswered(status: int | None) -> bool:
    """No answer, a 429 or a server error: the host's file is not known, not absent."""
    return status is None or status == 429 or status >= 500


def _tdm_rules(status: int | None, body: bytes) -> tuple[list[tuple[str, int]], str | None]:
    """TDMRep's JSON: ``[{"location": "/images/*", "tdm-reservation": 1, ...}, ...]``;
    the first matching location wins, as in the specification. Returns the rules and
    why the file could not be read (None when it was, or when there is none)."""
    if _unanswered(status):
        return [], body.decode("utf-8", "replace")[:100] if status is None else f"HTTP {status}"
    if not 200 <= status < 300:
        return [], None  # missing or refused: no reservation declared
    if len(body) > MAX_FILE_BYTES:
        return [], f"larger than {MAX_FILE_BYTES // 1024} KiB"
    try:
        entries = json.loads(body.decode("utf-8", "replace"))
    except RecursionError:
        return [], "nested too deep"
    except ValueError:
        return [], "not JSON"
    rules = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
            continue
        try:
            reservation = int(entry.get("tdm-reservation", 0))
        except (TypeError, ValueError):
            reservation = 0
        rules.append((entry["location"], reservation))
    return rules, None


def location_matches(location: str, path: str) -> bool:
    """Whether ``path`` starts with TDMRep's ``location`` pattern (``*``: any characters;
    a final ``$``: the path ends there). Not a regular expression built from the host's
    text: a pattern such as forty ``*`` then ``x$`` made the regex engine backtrack for
    hours, holding the GIL. Each literal piece is placed leftmost with ``str.find``
    (placing it any later never helps the pieces after it), so this is linear time."""
    anchored = location.endswith("$")
    first, *rest = (location[:-1] if anchored else location).split("*")
    if not path.startswith(first):
        return False
    if not rest:
        return path == first or not anchored
    position = len(first)
    for piece in rest[:-1]:
        found = path.find(piece, position)
        if found < 0:
            return False
        position = found + len(piece)
    if anchored:
        return len(path) - len(rest[-1]) >= position and path.endswith(rest[-1])
    return path.find(rest[-1], position) >= 0


def tdm_reserved(headers) -> bool:
    """The ``tdm-reservation: 1`` response header (TDMRep's HTTP form)."""
    return str(headers.get("tdm-reservation", "")).strip() == "1"


def noindex(header: str, agent: str) -> str | None:
    """``noindex``/``noimageindex`` in an X-Robots-Tag header, unscoped or scoped to us."""
    for part in header.split(","):
        directive = part.strip().lower()
        if ":" in directive:
            scope, _, directive = directive.partition(":")
            if scope.strip() not in (agent, "*"):
                continue
        if directive.strip() in ("noindex", "noimageindex", "none"):
            return directive.strip()
    return None
